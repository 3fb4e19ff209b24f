"""The paper's large data sets, read from local files (nothing is downloaded): ImageNet and Multi30k.

``imagenet`` (Section 5.3): an ImageFolder directory, ``DATA_DIR/train/<class>/<image>`` and
``DATA_DIR/val/<class>/<image>`` (``test`` reads ``val``); the classes are the sorted folder names of
``train``. Images are decoded on demand, by a pool of threads (``workers``; PIL and torch release the GIL while
they decode and resize), the random crops drawn beforehand in the batch's order so that a batch depends on the
generator alone, never on the number of threads. Training batches get the standard Inception-style augmentation
(random resized crop, scale 0.08–1, aspect 3/4–4/3, to 224×224 and a horizontal flip with probability
1/2), drawn from the ``torch.Generator`` given to :meth:`ImageFolderDataset.get_batch`; evaluation
batches are resized to 256 on the short side and centre-cropped to 224. Then ImageNet normalisation.

``multi30k`` (Section 5.2; Elliott et al. 2016): German→English translation from the plain-text files
``train.de``/``train.en``, ``val.de``/``val.en``, ``test_2016_flickr.de``/``.en`` (or ``test.de``/
``test.en``), one sentence per line, in ``DATA_DIR/multi30k`` or ``DATA_DIR`` itself. The tokenizer is
built from the training text of both languages (:class:`WordTokenizer`: lower-cased words and
punctuation, one shared vocabulary, words seen fewer than twice map to ``<unk>``). A batch is
``x`` of shape (B, 2, L) — source ids in ``x[:, 0]``, decoder input ``<bos> w₁ … w_n`` in ``x[:, 1]`` —
and ``y`` of shape (B, L), the target ``w₁ … w_n <eos>``; 0 pads. The per-sample loss ℓ_b is sentence
b's mean token cross-entropy (each sentence is one sample of Eq. 1), accuracy counts target tokens.

``imagefolder``: any ImageFolder tree of the user's, in ImageNet's layout (``DATA_DIR/train``, ``DATA_DIR/val``)
or flat (``DATA_DIR/<class>/<image>``, one split, ``train``), read as ``imagenet`` is.

For evaluation (``gmix trace``, ``--trace-every``) :meth:`~ImageFolderDataset.subset` and
:meth:`~Multi30kDataset.subset` draw a random subset of the samples from a generator without decoding
anything; :meth:`get_batch` without ``train`` applies the evaluation transform (no augmentation).
``ignore_index`` names the label that marks padding (Multi30k's ``<pad>``; -100, PyTorch's default, where
there is none).

``LARGE_DATASETS`` maps each name to ``loader(split, data_dir) -> dataset``.
"""

from __future__ import annotations

import copy
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = [
    "ImageFolderDataset",
    "WordTokenizer",
    "Multi30kDataset",
    "load_imagenet",
    "load_imagefolder",
    "load_multi30k",
    "subset_indices",
    "LARGE_DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _root(data_dir: str | os.PathLike | None, name: str) -> Path:
    if data_dir is None:
        raise ValueError(f"{name} needs --data-dir, the directory holding its files")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    return root


def subset_indices(length: int, n: int | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """The indices of a random subset of ``n`` of ``length`` samples, drawn from ``generator`` (the first
    ``n`` without one); all of them, in order, when ``n`` is None or at least ``length``.

    >>> subset_indices(10, 3, torch.Generator().manual_seed(0)).tolist()
    [4, 1, 7]
    >>> subset_indices(4, None).tolist()
    [0, 1, 2, 3]
    """
    if n is not None and n < 1:
        raise ValueError(f"a subset needs at least one sample, got {n}")
    if n is None or n >= length:
        return torch.arange(length)
    return torch.randperm(length, generator=generator)[:n] if generator is not None else torch.arange(n)


# --------------------------------------------------------------------------------------------- ImageNet


def random_resized_crop_box(
    height: int,
    width: int,
    generator: torch.Generator | None,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop with area fraction in ``scale`` and aspect in ``ratio`` —
    torchvision's ``RandomResizedCrop.get_params`` drawing from ``generator`` instead of the global RNG.

    >>> top, left, h, w = random_resized_crop_box(100, 100, torch.Generator().manual_seed(0))
    >>> 0.08 <= h * w / 100**2 <= 1 and 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05 and top + h <= 100
    True
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the clamped aspect
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageFolderDataset:
    """Images in ``root/<class>/<file>`` decoded on demand (see the module docstring).

    ``classes`` fixes the label order (the train split's, so that val labels agree).
    """

    prefetch = True  # the training loop decodes the next micro-batch while the current one computes
    ignore_index = -100  # no padding: every label counts

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        classes: Sequence[str] | None = None,
        image_size: int = 224,
        resize_size: int = 256,
        name: str = "imagenet",
        workers: int | None = None,
    ) -> None:
        root = Path(root)
        self.workers = int(workers) if workers is not None else min(8, os.cpu_count() or 1)
        if self.workers < 1:
            raise ValueError(f"{name}: workers must be at least 1, not {workers}")
        if not root.is_dir():
            raise FileNotFoundError(f"{name}: missing image folder {root}")
        self.name, self.root, self.image_size, self.resize_size = name, root, int(image_size), int(resize_size)
        self.classes = list(classes) if classes is not None else sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{name}: {root} has no class folders (expected {root}/<class>/<image>)")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            if d.name not in index:
                raise ValueError(f"{name}: class folder {d.name!r} of {root} is not a training class")
            for f in sorted(d.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((f, index[d.name]))
        if not self.samples:
            raise ValueError(f"{name}: no images under {root}")
        self.num_classes = len(self.classes)
        self.y = torch.tensor([c for _, c in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def _open(self, path: Path):
        from PIL import Image, UnidentifiedImageError

        try:
            return Image.open(path)
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{self.name}: cannot read image {path} ({exc.__class__.__name__})") from None

    def _plan(self, path: Path, generator: torch.Generator | None) -> tuple[tuple[int, int, int, int], bool]:
        """The random crop box and flip of one training image, from its header's size (no decoding)."""
        with self._open(path) as img:
            width, height = img.size
        box = random_resized_crop_box(height, width, generator)
        return box, float(torch.rand(1, generator=generator)) < 0.5

    def _decode(self, path: Path, plan: tuple[tuple[int, int, int, int], bool] | None) -> torch.Tensor:
        """Decode one image and apply its training plan (crop box, flip) or the evaluation transform."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms.functional import pil_to_tensor

        try:
            with self._open(path) as img:
                x = pil_to_tensor(img.convert("RGB"))
        except OSError as exc:  # a truncated file fails at decoding, after its header was read
            raise ValueError(f"{self.name}: cannot read image {path} ({exc.__class__.__name__})") from None
        size = [self.image_size, self.image_size]
        if plan is None:
            return TF.center_crop(TF.resize(x, [self.resize_size], antialias=True), size)
        (top, left, h, w), flip = plan
        x = TF.resized_crop(x, top, left, h, w, size, antialias=True)
        return x.flip(-1) if flip else x

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, *, train: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded, (augmented,) normalised images (B, 3, S, S) and their labels (B,).

        The augmentation of every image is drawn from ``generator`` first, in the batch's order; then
        ``workers`` threads decode, so the batch is the same for any number of workers.
        """
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        paths = [self.samples[int(i)][0] for i in indices]
        plans = [self._plan(p, generator) for p in paths] if train else [None] * len(paths)
        if self.workers > 1 and len(paths) > 1:
            with ThreadPoolExecutor(min(self.workers, len(paths))) as pool:
                imgs = list(pool.map(self._decode, paths, plans))
        else:
            imgs = [self._decode(p, plan) for p, plan in zip(paths, plans)]
        x = torch.stack(imgs).to(torch.float32) / 255.0
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return (x - mean) / std, self.y[indices]

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split, unaugmented (small folders only: it decodes everything)."""
        return self.get_batch(torch.arange(len(self)))

    def subset(self, n: int | None, generator: torch.Generator | None = None) -> ImageFolderDataset:
        """The same folder restricted to a random subset of ``n`` images (:func:`subset_indices`); nothing is
        decoded until :meth:`get_batch`."""
        idx = subset_indices(len(self), n, generator)
        sub = copy.copy(self)
        sub.samples = [self.samples[int(i)] for i in idx]
        sub.y = self.y[idx]
        return sub


def load_imagenet(
    split: str, data_dir: str | os.PathLike | None, *, image_size: int = 224, workers: int | None = None
) -> ImageFolderDataset:
    """ImageNet (or any ImageFolder tree with ``train`` and ``val``) from ``data_dir``; ``workers`` decoding
    threads (default: the CPU count, at most 8). Evaluation resizes the short side to ``image_size`` × 256/224
    (256 for 224) and centre-crops ``image_size``.

    >>> load_imagenet("train", None)
    Traceback (most recent call last):
    ...
    ValueError: imagenet needs --data-dir, the directory holding its files
    """
    root = _root(data_dir, "imagenet")
    folders = {"train": "train", "val": "val", "test": "val"}
    if split not in folders:
        raise ValueError(f"imagenet has splits train, val and test (= val), not {split!r}")
    train_dir = root / "train"
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir()) if train_dir.is_dir() else None
    resize = max(image_size, round(image_size * 256 / 224))
    return ImageFolderDataset(root / folders[split], classes=classes, image_size=image_size, resize_size=resize,
                              workers=workers)  # fmt: skip


def load_imagefolder(
    split: str, data_dir: str | os.PathLike | None, *, image_size: int = 224, workers: int | None = None
) -> ImageFolderDataset:
    """Any ImageFolder tree: ImageNet's layout (``train``/``val`` folders, read as :func:`load_imagenet` reads
    them) or a flat ``data_dir/<class>/<image>`` (one split, ``train``). Evaluation resizes the short side to
    ``image_size`` × 256/224 and centre-crops ``image_size``.

    >>> load_imagefolder("train", None)
    Traceback (most recent call last):
    ...
    ValueError: imagefolder needs --data-dir, the directory holding its files
    """
    root = _root(data_dir, "imagefolder")
    resize = max(image_size, round(image_size * 256 / 224))
    if (root / "train").is_dir():
        folders = {"train": "train", "val": "val", "test": "val"}
        if split not in folders:
            raise ValueError(f"imagefolder has splits train, val and test (= val), not {split!r}")
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        return ImageFolderDataset(root / folders[split], classes=classes, image_size=image_size,
                                  resize_size=resize, name="imagefolder", workers=workers)  # fmt: skip
    if split != "train":
        raise ValueError(f"imagefolder: {root} has no train/ folder, so its one split is train, not {split!r}")
    return ImageFolderDataset(root, image_size=image_size, resize_size=resize, name="imagefolder", workers=workers)


# --------------------------------------------------------------------------------------------- Multi30k

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>")
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


class WordTokenizer:
    """Lower-cased words and punctuation marks; the vocabulary comes from the training text.

    Ids 0–3 are ``<pad> <unk> <bos> <eos>``; then the words seen at least ``min_freq`` times, most
    frequent first (ties alphabetical), so the vocabulary is a pure function of the text.

    >>> tok = WordTokenizer.build(["A dog runs.", "a dog sits."], min_freq=2)
    >>> tok.itos
    ['<pad>', '<unk>', '<bos>', '<eos>', '.', 'a', 'dog']
    >>> tok.encode("A cat runs.")
    [5, 1, 1, 4]
    """

    def __init__(self, itos: Sequence[str]) -> None:
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _TOKEN.findall(text.lower())

    @classmethod
    def build(cls, texts: Sequence[str], min_freq: int = 2) -> WordTokenizer:
        counts = Counter(tok for t in texts for tok in cls.split(t))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(tok, UNK) for tok in self.split(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (PAD, BOS, EOS))


class Multi30kDataset:
    """Sentence pairs as token ids, batched as in the module docstring; defines the sequence loss."""

    def __init__(
        self, src: list[list[int]], tgt: list[list[int]], tokenizer: WordTokenizer, max_len: int = 128
    ) -> None:
        if len(src) != len(tgt):
            raise ValueError(f"multi30k: {len(src)} source sentences but {len(tgt)} target sentences")
        self.name, self.tokenizer, self.max_len = "multi30k", tokenizer, int(max_len)
        self.src = [s[: self.max_len] for s in src]
        self.tgt = [[BOS, *t[: self.max_len - 1], EOS] for t in tgt]  # decoder input and target: max_len each
        self.num_classes = len(tokenizer)

    ignore_index = PAD  # padded target positions count in no loss, accuracy or curvature

    def __len__(self) -> int:
        return len(self.src)

    @property
    def input_shape(self) -> tuple[int, int]:
        return (2, self.max_len)

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, *, train: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 2, L): source and decoder input; ``y`` (B, L): the target; L the batch's longest."""
        idx = [int(i) for i in torch.as_tensor(indices).reshape(-1)]
        length = max(max(len(self.src[i]), len(self.tgt[i]) - 1) for i in idx)
        x = torch.full((len(idx), 2, length), PAD, dtype=torch.int64)
        y = torch.full((len(idx), length), PAD, dtype=torch.int64)
        for row, i in enumerate(idx):
            s, t = self.src[i], self.tgt[i]
            x[row, 0, : len(s)] = torch.tensor(s, dtype=torch.int64)
            x[row, 1, : len(t) - 1] = torch.tensor(t[:-1], dtype=torch.int64)
            y[row, : len(t) - 1] = torch.tensor(t[1:], dtype=torch.int64)
        return x, y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All sentence pairs as one batch, padded to the longest (small sets only)."""
        return self.get_batch(torch.arange(len(self)))

    def subset(self, n: int | None, generator: torch.Generator | None = None) -> Multi30kDataset:
        """The same vocabulary and sentences restricted to a random subset of ``n`` pairs (:func:`subset_indices`)."""
        idx = subset_indices(len(self), n, generator)
        sub = copy.copy(self)
        sub.src = [self.src[int(i)] for i in idx]
        sub.tgt = [self.tgt[int(i)] for i in idx]
        return sub

    def per_sample_losses(self, output: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
        """ℓ_b: the mean (label-smoothed) cross-entropy over sentence b's target tokens, shape (B,)."""
        tok = F.cross_entropy(
            output.reshape(-1, output.shape[-1]),
            y.reshape(-1),
            ignore_index=PAD,
            reduction="none",
            label_smoothing=label_smoothing,
        ).view(y.shape)
        return tok.sum(1) / self.count_per_sample(y).to(tok.dtype)

    @staticmethod
    def count_per_sample(y: torch.Tensor) -> torch.Tensor:
        return (y != PAD).sum(1).clamp(min=1)

    def correct(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correctly predicted target tokens (padding excluded)."""
        return ((output.argmax(-1) == y) & (y != PAD)).sum()

    def count(self, y: torch.Tensor) -> int:
        """Target tokens in ``y`` (the denominator of the token accuracy)."""
        return int((y != PAD).sum())


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"multi30k: {path} is not UTF-8 text") from None
    return text.rstrip("\n").split("\n") if text.strip() else []


def load_multi30k(
    split: str,
    data_dir: str | os.PathLike | None,
    *,
    src_lang: str = "de",
    tgt_lang: str = "en",
    min_freq: int = 2,
    max_len: int = 128,
) -> Multi30kDataset:
    """Multi30k from its local text files; the tokenizer is built from the training text.

    >>> load_multi30k("train", None)
    Traceback (most recent call last):
    ...
    ValueError: multi30k needs --data-dir, the directory holding its files
    """
    root = _root(data_dir, "multi30k")
    if (root / "multi30k").is_dir():
        root = root / "multi30k"
    stems = {"train": ["train"], "val": ["val"], "test": ["test_2016_flickr", "test"]}
    if split not in stems:
        raise ValueError(f"multi30k has splits train, val and test, not {split!r}")

    def pair(s: str) -> tuple[list[str], list[str]]:
        for stem in stems[s]:
            fs, ft = root / f"{stem}.{src_lang}", root / f"{stem}.{tgt_lang}"
            if fs.is_file() and ft.is_file():
                a, b = _read_lines(fs), _read_lines(ft)
                if len(a) != len(b):
                    raise ValueError(f"multi30k: {fs} has {len(a)} lines but {ft} has {len(b)}")
                if not a:
                    raise ValueError(f"multi30k: {fs} is empty")
                return a, b
        want = " or ".join(f"{stem}.{src_lang} and {stem}.{tgt_lang}" for stem in stems[s])
        raise FileNotFoundError(f"multi30k: {root} lacks {want}")

    train_src, train_tgt = pair("train")
    tok = WordTokenizer.build(train_src + train_tgt, min_freq=min_freq)
    src, tgt = (train_src, train_tgt) if split == "train" else pair(split)
    return Multi30kDataset([tok.encode(s) for s in src], [tok.encode(t) for t in tgt], tok, max_len=max_len)


LARGE_DATASETS: dict[str, Callable[..., object]] = {
    "imagenet": load_imagenet,
    "imagefolder": load_imagefolder,
    "multi30k": load_multi30k,
}
