"""Data sets, all local: the embedded digits, CIFAR-10/100 from a directory, and synthetic data.

Nothing is downloaded. Every data set is an :class:`ArrayDataset` whose :meth:`~ArrayDataset.get_batch`
returns the (x, y) of a tensor of indices; augmentation, where there is any, draws from the
``torch.Generator`` it is given, so a training run is reproducible and resumable bit for bit.

``digits`` (the default, embedded): scikit-learn's bundled copy of the UCI optical digits, 1,797 real
8×8 grey images in 10 classes. Fixed split, stratified by class with ``random_state=0``:
``train`` 1,437 images and ``test`` 360 (20 %); ``train`` is further split, stratified with
``random_state=0``, into ``fit`` (1,149) and ``val`` (288) for choosing hyperparameters without
looking at ``test``. Pixels are scaled to [0, 1] and standardised with the train split's mean and std.

``cifar10`` / ``cifar100``: the standard python-pickle format (``cifar-10-batches-py/`` with
``data_batch_1..5`` and ``test_batch``; ``cifar-100-python/`` with ``train`` and ``test``) under
``data_dir``. torchvision's loader insists on the official files' MD5 sums, so the (equally standard)
pickle files are read here directly; the training split gets the usual augmentation (random 32×32
crop of the image zero-padded by 4, horizontal flip with probability 1/2), then per-channel
normalisation.

``imagenet`` (an ImageFolder tree) and ``multi30k`` (its text files) are read from disk on demand by
:mod:`gmix_curvature.data_large`.

``synthetic``: CIFAR-shaped standard-normal images with uniformly random labels from a fixed seed
(2,048 train, 512 test), for benchmarks and smoke runs.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = ["ArrayDataset", "load_dataset", "DATASETS", "SPLITS"]

DATASETS = ("digits", "cifar10", "cifar100", "synthetic", "imagenet", "multi30k")
SPLITS = ("train", "test", "fit", "val")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass
class ArrayDataset:
    """An in-memory data set: inputs ``x`` (N, C, H, W), integer labels ``y`` (N,).

    With ``augment=True`` the inputs are uint8 images that :meth:`get_batch` crops, flips and
    normalises; otherwise ``x`` is the finished float input.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    augment: bool = False
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x.shape[1:])

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (x - mean) / std

    def get_batch(
        self, indices: torch.Tensor, generator: torch.Generator | None = None, *, train: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs and labels at ``indices``; augmented when ``train`` and the set augments."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        x, y = self.x[indices], self.y[indices]
        if self.mean:
            if train and self.augment:
                x = _crop_flip(x, generator)
            x = self._normalise(x)
        return x, y

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole set, unaugmented: (x, y)."""
        return self.get_batch(torch.arange(len(self)))

    def subset(self, n: int, generator: torch.Generator | None = None) -> ArrayDataset:
        """A random subset of n samples (the first n when no generator is given)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=generator)[:n] if generator is not None else torch.arange(n)
        return ArrayDataset(self.name, self.x[idx], self.y[idx], self.num_classes, self.augment, self.mean, self.std)


def _crop_flip(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image and random horizontal flip, batched, from ``generator``."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1)
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)
    cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
    return padded[batch, chan, rows, cols]


def _digits(split: str) -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(idx, test_size=360, random_state=0, stratify=y)
    fit_idx, val_idx = train_test_split(train_idx, test_size=0.2, random_state=0, stratify=y[train_idx])
    mean, std = x[train_idx].mean(), x[train_idx].std()
    chosen = {"train": train_idx, "test": test_idx, "fit": fit_idx, "val": val_idx}[split]
    xs = torch.from_numpy((x[chosen] - mean) / std).view(-1, 1, 8, 8)
    return ArrayDataset("digits", xs, torch.from_numpy(y[chosen]), 10)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except FileNotFoundError:
        raise FileNotFoundError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a CIFAR pickle file ({exc})") from None
    if not isinstance(obj, dict) or "data" not in obj:
        raise ValueError(f"{path} is not a CIFAR pickle file (no 'data' entry)")
    return obj


def _cifar(name: str, split: str, data_dir: str | os.PathLike | None) -> ArrayDataset:
    if data_dir is None:
        raise ValueError(f"{name} needs --data-dir, the directory holding the CIFAR python files")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    if name == "cifar10":
        folder, files, label_key, classes = (
            root / "cifar-10-batches-py",
            {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
            "labels",
            10,
        )
    else:
        folder, files, label_key, classes = (
            root / "cifar-100-python",
            {"train": ["train"], "test": ["test"]},
            "fine_labels",
            100,
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} not found: expected the folder {folder}")
    if split not in files:
        raise ValueError(f"{name} has splits train and test, not {split!r}")
    xs, ys = [], []
    for fname in files[split]:
        batch = _unpickle(folder / fname)
        if label_key not in batch:
            raise ValueError(f"{folder / fname} has no {label_key!r} entry")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / fname}: 'data' must be N×3072 uint8, got shape {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[label_key], dtype=np.int64))
    x = torch.from_numpy(np.concatenate(xs))
    y = torch.from_numpy(np.concatenate(ys))
    if len(y) != len(x):
        raise ValueError(f"{name}: {len(x)} images but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise ValueError(f"{name}: labels must lie in 0..{classes - 1}")
    return ArrayDataset(name, x, y, classes, augment=split == "train", mean=CIFAR_MEAN, std=CIFAR_STD)


def _synthetic(split: str, num_classes: int = 10) -> ArrayDataset:
    n = {"train": 2048, "test": 512}.get(split)
    if n is None:
        raise ValueError(f"synthetic has splits train and test, not {split!r}")
    g = torch.Generator().manual_seed(1234 if split == "train" else 4321)
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return ArrayDataset("synthetic", x, y, num_classes)


def load_dataset(
    name: str,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> ArrayDataset:
    """Load a data set split (see the module docstring); ``num_samples`` keeps a subset.

    >>> ds = load_dataset("digits", "test")
    >>> len(ds), ds.input_shape, ds.num_classes
    (360, (1, 8, 8), 10)
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")
    if name in ("imagenet", "multi30k"):  # read from disk on demand: gmix_curvature.data_large
        from gmix_curvature.data_large import LARGE_DATASETS

        ds = LARGE_DATASETS[name](split, data_dir)
        if num_samples is not None:
            raise ValueError(f"num_samples is not supported for {name}")
        return ds
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    if name == "digits":
        ds = _digits(split)
    elif name == "synthetic":
        ds = _synthetic(split)
    else:
        ds = _cifar(name, split, data_dir)
    if num_samples is not None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        ds = ds.subset(num_samples, generator)
    return ds
