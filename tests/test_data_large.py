"""ImageNet (ImageFolder) and Multi30k (text) from tiny files in their real formats; the Transformer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from large_data import write_imagefolder, write_multi30k

from gmix_curvature.data_large import (
    BOS,
    EOS,
    LARGE_DATASETS,
    PAD,
    UNK,
    load_imagefolder,
    load_imagenet,
    load_multi30k,
    random_resized_crop_box,
    subset_indices,
)
from gmix_curvature.transformer import build_transformer

# ------------------------------------------------------------------------------------------- ImageNet


@pytest.fixture
def imagenet_dir(tmp_path):
    return write_imagefolder(tmp_path / "imagenet")


def test_imagefolder_splits_labels_and_shapes(imagenet_dir):
    train = LARGE_DATASETS["imagenet"]("train", imagenet_dir)
    val = load_imagenet("test", imagenet_dir, image_size=16)
    assert (len(train), len(val), train.num_classes, train.input_shape) == (12, 6, 3, (3, 224, 224))
    assert train.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    x, y = val.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32 and y.tolist() == [0, 2]


def test_imagefolder_augmentation_follows_the_generator(imagenet_dir):
    ds = load_imagenet("train", imagenet_dir, image_size=16)
    idx = torch.arange(6)
    a, _ = ds.get_batch(idx, torch.Generator().manual_seed(1), train=True)
    b, _ = ds.get_batch(idx, torch.Generator().manual_seed(1), train=True)
    c, _ = ds.get_batch(idx, torch.Generator().manual_seed(2), train=True)
    before = torch.get_rng_state()
    e1, _ = ds.get_batch(idx)
    e2, _ = ds.get_batch(idx, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(e1, e2)  # evaluation is deterministic
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is never touched


def test_imagefolder_batch_is_independent_of_the_decoding_threads(tmp_path):
    root = write_imagefolder(tmp_path / "imagenet", per_class=(6, 2), size=(40, 52))
    idx = torch.tensor([3, 0, 17, 8, 8, 11, 5])
    for train in (True, False):
        batches = [
            load_imagenet("train", root, image_size=24, workers=w).get_batch(
                idx, torch.Generator().manual_seed(4), train=train
            )
            for w in (1, 3, 8)
        ]
        for x, y in batches[1:]:
            assert torch.equal(x, batches[0][0]) and torch.equal(y, batches[0][1])
    with pytest.raises(ValueError, match="workers must be at least 1"):
        load_imagenet("train", root, workers=0)


def test_random_resized_crop_box_stays_in_bounds():
    g = torch.Generator().manual_seed(0)
    for h, w in [(20, 28), (100, 30), (7, 200), (224, 224)]:
        for _ in range(200):
            top, left, ch, cw = random_resized_crop_box(h, w, g)
            assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0


def test_imagefolder_errors(tmp_path, imagenet_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_imagenet("train", tmp_path / "nope")
    with pytest.raises(ValueError, match="splits train, val and test"):
        load_imagenet("fit", imagenet_dir)
    (imagenet_dir / "val" / "n99").mkdir()
    with pytest.raises(ValueError, match="class folder 'n99' .* is not a training class"):
        load_imagenet("val", imagenet_dir)
    bad = write_imagefolder(tmp_path / "bad", classes=("a",), per_class=(1, 1))
    (bad / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = load_imagenet("train", bad)
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        ds.get_batch(torch.arange(2))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="has no class folders"):
        load_imagenet("train", tmp_path / "empty")


def test_imagefolder_subset_is_an_evaluation_view_drawn_from_the_generator(imagenet_dir):
    ds = load_imagenet("train", imagenet_dir, image_size=16)
    sub = ds.subset(5, torch.Generator().manual_seed(7))
    idx = subset_indices(len(ds), 5, torch.Generator().manual_seed(7))
    assert len(sub) == 5 and len(ds) == 12 and sub.classes == ds.classes
    x, y = sub.get_batch(torch.arange(5))
    want_x, want_y = ds.get_batch(idx)  # evaluation transform: the same pixels, no augmentation
    assert torch.equal(x, want_x) and torch.equal(y, want_y) and torch.equal(sub.y, ds.y[idx])
    assert not torch.equal(idx, torch.arange(5)) and len(ds.subset(None)) == len(ds.subset(50)) == 12
    with pytest.raises(ValueError, match="at least one sample"):
        ds.subset(0)


def test_any_imagefolder_in_imagenet_layout_or_flat(tmp_path, imagenet_dir):
    split = LARGE_DATASETS["imagefolder"]("val", imagenet_dir, image_size=8)
    assert (split.name, len(split), split.classes, split.input_shape) == ("imagefolder", 6, ["n01", "n02", "n03"],
                                                                           (3, 8, 8))  # fmt: skip
    flat = load_imagefolder("train", imagenet_dir / "train", image_size=12)
    x, y = flat.get_batch(torch.tensor([0, 11]))
    assert x.shape == (2, 3, 12, 12) and y.tolist() == [0, 2] and flat.ignore_index == -100
    with pytest.raises(ValueError, match="its one split is train, not 'val'"):
        load_imagefolder("val", imagenet_dir / "train")


# ------------------------------------------------------------------------------------------- Multi30k


@pytest.fixture
def multi30k_dir(tmp_path):
    return write_multi30k(tmp_path)


def test_multi30k_tokenizer_from_training_text(multi30k_dir):
    train = load_multi30k("train", multi30k_dir)
    tok = train.tokenizer
    assert tok.itos[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert "hund" in tok.stoi and "dog" in tok.stoi and "mit" not in tok.stoi  # "mit" occurs once
    test = LARGE_DATASETS["multi30k"]("test", multi30k_dir)
    assert test.tokenizer.itos == tok.itos  # val/test reuse the vocabulary of the training text
    assert (len(train), len(test), train.num_classes) == (8, 3, len(tok))


def test_multi30k_batch_layout(multi30k_dir):
    ds = load_multi30k("train", multi30k_dir)
    x, y = ds.get_batch(torch.tensor([0, 2]))
    tok = ds.tokenizer
    assert x.shape == (2, 2, 8) and y.shape == (2, 8)  # L = 7 words of sentence 2 + <eos>
    assert x[0, 0].tolist() == tok.encode("ein hund läuft .") + [PAD] * 4
    assert x[0, 1].tolist() == [BOS, *tok.encode("a dog runs ."), PAD, PAD, PAD]
    assert y[0].tolist() == [*tok.encode("a dog runs ."), EOS, PAD, PAD, PAD]
    assert y[1].tolist() == [*tok.encode("two dogs play in the snow ."), EOS]
    assert x[1, 1, 1:].tolist() == y[1, :-1].tolist()  # teacher forcing: input shifted by one
    assert ds.count(y) == 5 + 8


def test_multi30k_sentence_loss_and_token_accuracy(multi30k_dir):
    ds = load_multi30k("train", multi30k_dir)
    x, y = ds.get_batch(torch.tensor([0, 2, 7]))
    out = torch.randn(*y.shape, ds.num_classes, dtype=torch.float64)
    losses = ds.per_sample_losses(out, y, label_smoothing=0.1)
    for b in range(3):
        n = int((y[b] != PAD).sum())
        want = F.cross_entropy(out[b, :n], y[b, :n], label_smoothing=0.1)
        torch.testing.assert_close(losses[b], want)
    perfect = F.one_hot(y, ds.num_classes).double()
    assert int(ds.correct(perfect, y)) == ds.count(y)


def test_multi30k_errors(tmp_path, multi30k_dir):
    with pytest.raises(ValueError, match="splits train, val and test"):
        load_multi30k("fit", multi30k_dir)
    (multi30k_dir / "multi30k" / "val.en").write_text("one line\n", encoding="utf-8")
    with pytest.raises(ValueError, match="val.de has 3 lines but .*val.en has 1"):
        load_multi30k("val", multi30k_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks train.de and train.en"):
        load_multi30k("train", tmp_path / "empty")


def test_multi30k_subset_keeps_the_vocabulary_and_pads_per_batch(multi30k_dir):
    ds = load_multi30k("train", multi30k_dir)
    sub = ds.subset(3, torch.Generator().manual_seed(1))
    idx = subset_indices(len(ds), 3, torch.Generator().manual_seed(1))
    assert len(sub) == 3 and sub.tokenizer is ds.tokenizer and sub.ignore_index == PAD
    x, y = sub.tensors()
    want_x, want_y = ds.get_batch(idx)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_unknown_words_map_to_unk(multi30k_dir):
    tok = load_multi30k("train", multi30k_dir).tokenizer
    assert tok.encode("Ein Zebra läuft!") == [tok.stoi["ein"], UNK, tok.stoi["läuft"], UNK]


# ---------------------------------------------------------------------------------------- Transformer


def small_transformer(vocab=30):
    torch.manual_seed(0)
    return build_transformer(vocab, (2, 12), d_model=16, nhead=2, num_layers=2, dim_feedforward=32).eval()


def test_transformer_is_causal_and_ignores_padding():
    net = small_transformer()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(4, 30, (2, 2, 6), generator=g)
    out = net(x)
    changed = x.clone()
    changed[:, 1, 4:] = torch.randint(4, 30, (2, 2), generator=g)
    torch.testing.assert_close(net(changed)[:, :4], out[:, :4])  # position t sees decoder inputs ≤ t only
    padded = torch.zeros(2, 2, 9, dtype=torch.int64)
    padded[:, :, :6] = x
    torch.testing.assert_close(net(padded)[:, :6], out, atol=1e-5, rtol=1e-5)  # padding changes nothing


def test_transformer_base_sizes_and_tied_weights():
    net = build_transformer(1000)
    assert net.out.weight is net.embed.weight
    assert (net.d_model, len(net.encoder.layers), len(net.decoder.layers)) == (512, 6, 6)
    assert net.encoder.layers[0].linear1.out_features == 2048 and net.encoder.layers[0].self_attn.num_heads == 8
    with pytest.raises(ValueError, match=r"expected token ids of shape \(B, 2, L\)"):
        small_transformer()(torch.zeros(2, 5, dtype=torch.int64))
