"""Writers of tiny data sets in their real on-disk formats (CIFAR pickle, ImageFolder JPEGs, Multi30k text)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

SENTENCES = [
    ("ein hund läuft .", "a dog runs ."),
    ("ein mann sitzt .", "a man sits ."),
    ("zwei hunde spielen im schnee .", "two dogs play in the snow ."),
    ("ein kind läuft im park .", "a child runs in the park ."),
    ("ein mann spielt mit einem hund .", "a man plays with a dog ."),
    ("zwei kinder sitzen im park .", "two children sit in the park ."),
    ("ein hund spielt im schnee .", "a dog plays in the snow ."),
    ("ein kind sitzt .", "a child sits ."),
]


def write_imagefolder(root: Path, classes=("n01", "n02", "n03"), per_class=(4, 2), size=(20, 28)) -> Path:
    """``root/train/<class>/*.JPEG`` and ``root/val/<class>/*.JPEG`` with random colour images."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{c}_{i}.JPEG", quality=90)
    return root


def write_multi30k(root: Path, train=SENTENCES, val=SENTENCES[:3], test=SENTENCES[3:6]) -> Path:
    """``train.de/.en``, ``val.de/.en``, ``test_2016_flickr.de/.en`` in ``root/multi30k``."""
    d = root / "multi30k"
    d.mkdir(parents=True, exist_ok=True)
    for stem, pairs in (("train", train), ("val", val), ("test_2016_flickr", test)):
        (d / f"{stem}.de").write_text("".join(de + "\n" for de, _ in pairs), encoding="utf-8")
        (d / f"{stem}.en").write_text("".join(en + "\n" for _, en in pairs), encoding="utf-8")
    return root


def write_cifar(root: Path, name: str = "cifar10", n_train: int = 8, n_test: int = 4) -> Path:
    """The python-pickle layout of CIFAR-10 (five data batches + test batch) or CIFAR-100."""
    rng = np.random.default_rng(0)

    def batch(n: int, key: str, classes: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}

    if name == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(1, 6):
            (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(max(1, n_train // 5), "labels", 10)))
        (d / "test_batch").write_bytes(pickle.dumps(batch(n_test, "labels", 10)))
    else:
        d = root / "cifar-100-python"
        d.mkdir(parents=True, exist_ok=True)
        (d / "train").write_bytes(pickle.dumps(batch(n_train, "fine_labels", 100)))
        (d / "test").write_bytes(pickle.dumps(batch(n_test, "fine_labels", 100)))
    return root
