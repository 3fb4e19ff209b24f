"""Local data sets: the embedded digits split, CIFAR in its real pickle format, synthetic data."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from gmix_curvature.data import load_dataset


def write_cifar(root, name="cifar10", n_per_file=6, seed=0):
    """A tiny CIFAR directory in the standard python-pickle format."""
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, files, key, classes = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + [
            "test_batch"], "labels", 10
    else:
        folder, files, key, classes = root / "cifar-100-python", ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True)
    for f in files:
        batch = {"data": rng.integers(0, 256, (n_per_file, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, n_per_file).tolist(), "batch_label": f}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh)
    return root


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    fit, val = load_dataset("digits", "fit"), load_dataset("digits", "val")
    assert (len(train), len(test), len(fit), len(val)) == (1437, 360, 1149, 288)
    assert len(fit) + len(val) == len(train)
    # the split is stratified: every class is in every split
    for ds in (train, test, fit, val):
        assert set(ds.y.tolist()) == set(range(10))
    # no test image appears in train
    tr = {tuple(r) for r in train.x.flatten(1).tolist()}
    assert sum(tuple(r) in tr for r in test.x.flatten(1).tolist()) <= 2  # the raw digits hold a few duplicates
    assert torch.equal(load_dataset("digits", "test").x, test.x)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_format(tmp_path, name, classes):
    write_cifar(tmp_path, name)
    train = load_dataset(name, "train", tmp_path)
    test = load_dataset(name, "test", tmp_path)
    assert len(train) == (30 if name == "cifar10" else 6) and len(test) == 6
    assert train.num_classes == classes and train.input_shape == (3, 32, 32)
    x, y = test.get_batch(torch.arange(3))
    assert x.dtype == torch.float32 and x.shape == (3, 3, 32, 32)


def test_cifar_augmentation_is_a_crop_and_flip_from_the_generator(tmp_path):
    write_cifar(tmp_path)
    ds = load_dataset("cifar10", "train", tmp_path)
    idx = torch.arange(8)
    a, _ = ds.get_batch(idx, torch.Generator().manual_seed(0), train=True)
    b, _ = ds.get_batch(idx, torch.Generator().manual_seed(0), train=True)
    plain, _ = ds.get_batch(idx)
    assert torch.equal(a, b)
    assert not torch.equal(a, plain)
    # every augmented image is a shifted (and maybe mirrored) copy: its centre 24×24 patch occurs in the
    # zero-padded original at the drawn offset; check the pixel multiset of one row of the centre
    raw = ds.x[idx].float()
    for i in range(8):
        aug = a[i] * torch.tensor(ds.std).view(3, 1, 1) * 255 + torch.tensor(ds.mean).view(3, 1, 1) * 255
        centre_row = aug[:, 16, 4:28].round()
        ok = any(
            torch.equal(centre_row.sort(-1).values, raw[i, :, r, c : c + 24].sort(-1).values)
            for r in range(12, 21) for c in range(0, 9)
        )
        assert ok


def test_synthetic_is_fixed():
    a, b = load_dataset("synthetic", "train"), load_dataset("synthetic", "train")
    assert torch.equal(a.x, b.x) and len(a) == 2048 and a.input_shape == (3, 32, 32)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (("imagenet21k", "train"), ValueError, "unknown data set 'imagenet21k'"),
        (("digits", "dev"), ValueError, "unknown split 'dev'"),
        (("cifar10", "train", None), ValueError, "cifar10 needs --data-dir"),
        (("cifar10", "train", "/nonexistent/dir"), FileNotFoundError, "data directory /nonexistent/dir does not exist"),
    ],
)
def test_bad_input(args, exc, match):
    with pytest.raises(exc, match=match):
        load_dataset(*args)


def test_missing_cifar_folder_and_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar10 not found: expected the folder"):
        load_dataset("cifar10", "train", tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a CIFAR pickle file"):
        load_dataset("cifar10", "train", tmp_path)
