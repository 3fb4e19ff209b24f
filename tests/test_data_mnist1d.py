"""MNIST-1D as the toolkit reads it: mnist1d's make_dataset() with the default arguments, pinned, cached."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch

from gmix_curvature import data as data_mod
from gmix_curvature.data import MNIST1D_SHA256, load_dataset, mnist1d_arrays


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and no arrays held in memory (restored after)."""
    monkeypatch.setenv("GMIX_CACHE", str(tmp_path / "cache"))
    data_mod._mnist1d_cached.cache_clear()
    yield tmp_path / "cache"
    data_mod._mnist1d_cached.cache_clear()


def test_equals_make_dataset_with_default_arguments_and_is_pinned(fresh_cache):
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(7)
    random.seed(7)
    before = (np.random.get_state()[1].copy(), random.getstate())
    x, y = mnist1d_arrays()  # generation 1: into the empty cache
    # the package reseeds numpy's and Python's global generators; the toolkit puts them back
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    d = make_dataset(get_dataset_args())  # generation 2, by the package directly
    assert get_dataset_args().seed == 42 and get_dataset_args().num_samples == 5000
    assert x.shape == (5000, 40) and x.dtype == np.float32 and y.dtype == np.int64
    assert np.array_equal(x, np.concatenate([d["x"], d["x_test"]]).astype(np.float32))
    assert np.array_equal(y, np.concatenate([d["y"], d["y_test"]]))
    digest = hashlib.sha256(x.astype("<f4").tobytes() + y.astype("<i8").tobytes()).hexdigest()
    assert digest == MNIST1D_SHA256 == "f7e6b4ae1766612049bfa012eb07881b5a4d2a1f4c0fd4cc7ce4b79fb0853cdb"
    # 500 signals per class before the split
    assert np.bincount(y).tolist() == [500] * 10
    # cached as a plain .npz (no pickled objects), readable without pickle, and equal
    files = list(fresh_cache.iterdir())
    assert [f.name for f in files] == ["mnist1d-v1.npz"]
    with np.load(files[0], allow_pickle=False) as f:
        assert np.array_equal(f["x"], x) and np.array_equal(f["y"], y)


def test_splits_shapes_and_class_balance(fresh_cache):
    sets = {s: load_dataset("mnist1d", s) for s in ("train", "test", "fit", "val")}
    assert {s: len(ds) for s, ds in sets.items()} == {"train": 4000, "test": 1000, "fit": 3200, "val": 800}
    x, y = mnist1d_arrays()
    assert torch.equal(sets["train"].x.view(-1, 40), torch.from_numpy(x[:4000]))
    assert torch.equal(sets["test"].y, torch.from_numpy(y[4000:]))
    for s, ds in sets.items():
        assert ds.input_shape == (1, 40) and ds.num_classes == 10 and ds.x.dtype == torch.float32
        counts = torch.bincount(ds.y, minlength=10)
        assert counts.min() >= 0.85 * len(ds) / 10 and counts.max() <= 1.15 * len(ds) / 10, (s, counts)
    # fit and val partition train (stratified: val's classes within one signal of 80 each)
    fit = {tuple(r) for r in sets["fit"].x.view(-1, 40).tolist()}
    val = {tuple(r) for r in sets["val"].x.view(-1, 40).tolist()}
    assert not fit & val and len(fit | val) == 4000
    assert torch.bincount(sets["val"].y).sub(80).abs().max() <= 2


def test_a_corrupt_cache_is_generated_again(fresh_cache):
    fresh_cache.mkdir(parents=True)
    path = fresh_cache / "mnist1d-v1.npz"
    np.savez(path, x=np.zeros((5000, 40), np.float32), y=np.zeros(5000, np.int64))  # wrong bytes
    x, _ = mnist1d_arrays()
    assert data_mod._mnist1d_checksum(*mnist1d_arrays()) == MNIST1D_SHA256 and x.std() > 0.5
    with np.load(path, allow_pickle=False) as f:  # replaced atomically by the right arrays
        assert np.array_equal(f["x"], x)
    assert [p.name for p in fresh_cache.iterdir()] == ["mnist1d-v1.npz"]  # no temporary file left behind


def test_mnist1d_model_trains_a_step(fresh_cache):
    from gmix_curvature.models import build_model

    ds = load_dataset("mnist1d", "train")
    net = build_model("mnist1d_cnn", num_classes=10, input_shape=ds.input_shape, width=4)
    x, y = ds.get_batch(torch.arange(16))
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    assert net(x).shape == (16, 10) and all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match="mnist1d_cnn needs inputs of shape"):
        build_model("mnist1d_cnn", num_classes=10, input_shape=(1, 8, 8))
