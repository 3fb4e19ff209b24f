"""CIFAR's python-pickle files are read by an unpickler that allows only what the format holds (dicts, lists,
bytes, numbers, numpy arrays): a file naming anything else is refused before it runs, real-format files
(numpy 1's ``numpy.core`` names, numpy 2's, pickle protocols 2, 4 and 5) still load."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from gmix_curvature.data import load_dataset


class ShellPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def write_cifar10(root, batch_of, protocol=2):
    """The cifar-10-batches-py folder, each file the pickle of ``batch_of(i)`` (i = 0..5)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(batch_of(i, protocol))
    return folder


def real_batch(i, protocol):
    rng = np.random.default_rng(i)
    batch = {"batch_label": f"training batch {i + 1} of 5", "labels": rng.integers(0, 10, 4).tolist(),
             "data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "filenames": [b"a.png", b"b.png", b"c", b"d"]}
    return pickle.dumps(batch, protocol=protocol)


def numpy1_batch(i, protocol):
    """What numpy 1 wrote (the official files' module names): numpy.core, not numpy._core."""
    return real_batch(i, 2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.mark.parametrize("writer,protocol", [(real_batch, 2), (real_batch, 4), (real_batch, 5), (numpy1_batch, 2)],
                         ids=["protocol-2", "protocol-4", "protocol-5", "numpy1-names"])
def test_real_format_loads(tmp_path, writer, protocol):
    write_cifar10(tmp_path, writer, protocol)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert len(train) == 20 and len(test) == 4
    expected = np.random.default_rng(5).integers(0, 256, (4, 3072), dtype=np.uint8)
    assert test.get_batch(np.arange(4))[0].shape == (4, 3, 32, 32)
    assert test.y.tolist() == np.random.default_rng(5).integers(0, 10, 4).tolist() and expected.any()


def _payload_in_data(marker):
    def batch_of(i, protocol):
        return pickle.dumps({"data": ShellPayload(marker), "labels": [0]}, protocol=protocol)

    return batch_of


def _payload_in_label(marker):
    def batch_of(i, protocol):
        return pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": ShellPayload(marker)},
                            protocol=protocol)

    return batch_of


@pytest.mark.parametrize("make", [_payload_in_data, _payload_in_label], ids=["as-data", "beside-the-data"])
@pytest.mark.parametrize("protocol", [2, 5])
def test_a_malicious_cifar_pickle_is_refused_and_never_runs(tmp_path, make, protocol):
    marker = tmp_path / "PAYLOAD-RAN"
    folder = write_cifar10(tmp_path, make(marker), protocol)
    with open(folder / "test_batch", "rb") as f:  # the control: a plain unpickle runs the payload
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ValueError, match=r"test_batch is not a CIFAR pickle file \(it names posix\.system") as e:
        load_dataset("cifar10", "test", tmp_path)
    assert "\n" not in str(e.value)
    assert not marker.exists()
