"""MNIST (IDX files) and CIFAR-10 (pickle batches): small files in the real formats, the shared
real data when present, checksum and offline errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers.net import closed_port_url

import lehi.data as data
from lehi.data import cifar10, mnist
from lehi.data.files import DataUnavailableError

SHARED = Path(
    os.environ.get("LEHI_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """Write a uint8 array as an IDX file (magic 0x00 0x00 0x08 ndim, big-endian dims)."""
    payload = (
        bytes([0, 0, 8, array.ndim])
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )
    if compress:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def make_mnist(
    root: Path, n_train: int = 50, n_test: int = 20
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    raw = root / "mnist" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    out = {}
    for split, n, prefix, gz in (("train", n_train, "train", False), ("val", n_test, "t10k", True)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[split] = (images, labels)
    return out


def test_mnist_small_files_raw_and_gz(tmp_path):
    arrays = make_mnist(tmp_path)
    bundle = data.build("mnist", data_dir=tmp_path, batch_size=10)
    assert bundle.input_shape == (784,) and bundle.num_outputs == 10
    assert bundle.task == "classification"
    images, labels = arrays["train"]
    expected = (images.reshape(50, -1).astype(np.float32) / 255.0 - 0.1307) / 0.3081
    assert np.allclose(bundle.train.inputs.numpy(), expected, atol=1e-6)
    assert bundle.train.targets.tolist() == labels.tolist()
    assert bundle.val.targets.tolist() == arrays["val"][1].tolist()  # read from the .gz files
    x, y = next(bundle.train.iter_epoch(0, 0))
    assert x.shape == (10, 784) and y.dtype == torch.int64

    shaped = data.build(
        "mnist", data_dir=tmp_path, batch_size=10, flatten=False, train_subset=30, val_subset=5
    )
    assert shaped.input_shape == (1, 28, 28) and shaped.train.inputs.shape == (30, 1, 28, 28)
    assert shaped.val.targets.tolist() == arrays["val"][1][:5].tolist()
    with pytest.raises(ValueError, match="train_subset=51 exceeds"):
        data.build("mnist", data_dir=tmp_path, train_subset=51)
    with pytest.raises(ValueError, match="md5"):
        data.build("mnist", data_dir=tmp_path, verify_checksums=True)


def test_mnist_truncated_idx_names_the_file(tmp_path):
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: IDX header promises"):
        data.build("mnist", data_dir=tmp_path)


def test_mnist_offline_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [closed_port_url()])
    target = tmp_path / "data"
    with pytest.raises(DataUnavailableError) as err:
        data.build("mnist", data_dir=target)
    message = str(err.value)
    assert "\n" not in message and str(target / "mnist" / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "download failed" in message
    assert not target.exists()  # nothing left behind


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """A batch as Python 3 would write it (str keys; the originals have bytes keys)."""
    entry = {
        "batch_label": "test",
        "labels": labels.tolist(),
        "data": images.reshape(len(images), -1),
    }
    path.write_bytes(pickle.dumps(entry, protocol=2))


def make_cifar(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    arrays = {}
    for name, n in (("data_batch_1", 30), ("data_batch_2", 30), ("test_batch", 20)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, n)
        write_cifar_batch(folder / name, images, labels)
        arrays[name] = images
        arrays[name + "_labels"] = labels
    return arrays


def test_cifar_small_pickles(tmp_path):
    arrays = make_cifar(tmp_path)
    bundle = data.build(
        "cifar10",
        data_dir=tmp_path,
        batch_size=8,
        eval_batch_size=8,
        train_subset=50,
        val_subset=20,
    )
    assert bundle.input_shape == (3, 32, 32) and bundle.train.num_examples == 50
    train = (
        np.concatenate([arrays["data_batch_1"], arrays["data_batch_2"][:20]]).astype(np.float64)
        / 255
    )
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True)
    assert np.allclose(bundle.train.inputs.numpy(), (train - mean) / std, atol=1e-5)
    val = (arrays["test_batch"].astype(np.float64) / 255 - mean) / std
    assert np.allclose(bundle.val.inputs.numpy(), val, atol=1e-5)
    labels = np.concatenate([arrays["data_batch_1_labels"], arrays["data_batch_2_labels"][:20]])
    assert bundle.train.targets.tolist() == labels.tolist()

    x1 = [x for x, _ in bundle.train.iter_epoch(0, 5)]
    x2 = [x for x, _ in bundle.train.iter_epoch(0, 5)]
    assert all(torch.equal(a, b) for a, b in zip(x1, x2))
    plain = data.build(
        "cifar10", data_dir=tmp_path, batch_size=8, train_subset=50, val_subset=20, augment=False
    )
    _, y_plain = next(plain.train.iter_epoch(0, 5))
    x_aug, y_aug = next(bundle.train.iter_epoch(0, 5))
    assert torch.equal(y_plain, y_aug) and not torch.equal(
        next(plain.train.iter_epoch(0, 5))[0], x_aug
    )
    vx, _ = next(bundle.val.iter_epoch(0, 5))
    assert torch.equal(vx, bundle.val.inputs[:8])  # no augmentation, no shuffling for validation

    with pytest.raises(ValueError, match="data_batch_1: md5 .* complete CIFAR-10 original"):
        data.build(
            "cifar10", data_dir=tmp_path, train_subset=50, val_subset=20, verify_checksums=True
        )


def test_cifar_insufficient_offline_is_one_clear_error(tmp_path, monkeypatch):
    make_cifar(tmp_path)
    monkeypatch.setattr(
        torchvision.datasets.CIFAR10, "url", closed_port_url() + "cifar-10-python.tar.gz"
    )
    folder = tmp_path / "cifar10"
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))
    with pytest.raises(DataUnavailableError) as err:
        data.build("cifar10", data_dir=tmp_path, train_subset=100, val_subset=20)
    message = str(err.value)
    assert (
        "\n" not in message
        and "supplies 60 training / 20 test images, 100/20 are needed" in message
    )
    assert str(folder / "cifar-10-batches-py") in message
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before


def test_cifar_bad_pickle_names_the_file(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 pickle batch"):
        cifar10.load_arrays(tmp_path, train_subset=10, val_subset=10)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="shared MNIST not available")
def test_shared_mnist_full():
    arrays = mnist.load_arrays(SHARED, verify_checksums=True)
    images, labels = arrays["train"]
    assert images.shape == (60000, 28, 28) and arrays["val"][0].shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(arrays["val"][1]).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    bundle = data.build("mnist", data_dir=SHARED)
    assert (
        bundle.train.inputs.shape == (60000, 784) and bundle.train.steps_per_epoch == 60000 // 128
    )
    # 0.1307 / 0.3081 are the training set's pixel mean / std
    assert (
        abs(float(bundle.train.inputs.mean())) < 1e-3
        and abs(float(bundle.train.inputs.std()) - 1) < 1e-3
    )


@pytest.mark.skipif(
    not (SHARED / "cifar10").is_dir(), reason="shared CIFAR-10 subset not available"
)
def test_shared_cifar_subset():
    bundle = data.build("cifar10", data_dir=SHARED, train_subset=4000, val_subset=1000)
    assert bundle.train.inputs.shape == (4000, 3, 32, 32) and bundle.val.inputs.shape == (
        1000,
        3,
        32,
        32,
    )
    assert np.bincount(bundle.train.targets.numpy()).tolist() == [
        396,
        366,
        420,
        384,
        422,
        393,
        414,
        385,
        407,
        413,
    ]
    assert np.bincount(bundle.val.targets.numpy()).tolist() == [
        103,
        89,
        100,
        103,
        90,
        86,
        112,
        102,
        106,
        109,
    ]
    assert bundle.train.targets[:5].tolist() == [6, 9, 9, 4, 1] and bundle.val.targets[
        :5
    ].tolist() == [3, 8, 8, 0, 6]
    with pytest.raises(ValueError, match="md5"):
        cifar10.load_arrays(SHARED, train_subset=4000, val_subset=1000, verify_checksums=True)


class _MakeDir:
    """A pickle payload: unpickling it creates the folder `path` (os.mkdir runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


@pytest.mark.parametrize("inside_valid_dict", [False, True])
def test_cifar_pickle_payload_does_not_run(tmp_path, inside_valid_dict):
    make_cifar(tmp_path)
    path = tmp_path / "cifar10" / "cifar-10-batches-py" / "test_batch"
    marker = tmp_path / "payload-ran"
    payload = _MakeDir(marker)
    if inside_valid_dict:
        images = np.zeros((20, 3072), dtype=np.uint8)
        payload = {"batch_label": payload, "labels": [0] * 20, "data": images}
    hostile = pickle.dumps(payload, protocol=2)
    path.write_bytes(hostile)
    with pytest.raises(data.DataFileError) as err:
        data.build("cifar10", data_dir=tmp_path, train_subset=60, val_subset=20)
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and message.startswith(f"{path}: not a CIFAR-10 pickle batch")
    assert "refers to posix.mkdir" in message or "refers to os.mkdir" in message
    # the payload is live: plain pickle runs it
    pickle.loads(hostile)
    assert marker.is_dir()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_read(tmp_path, protocol):
    images = np.random.default_rng(2).integers(0, 256, (7, 3, 32, 32), dtype=np.uint8)
    path = tmp_path / "data_batch_1"
    entry = {"batch_label": "x", "labels": [1, 2, 3, 4, 5, 6, 7], "data": images.reshape(7, -1)}
    path.write_bytes(pickle.dumps(entry, protocol=protocol))
    x, y = cifar10.read_batch(path)
    assert np.array_equal(x, images) and y.tolist() == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ([1, 2], "holds a list, not a dict"),
        ({"data": np.zeros((2, 3072), np.uint8)}, "needs 'data' and 'labels' keys"),
        ({"data": np.zeros((2, 3072), np.float32), "labels": [0, 1]}, "got float32 (2, 3072)"),
        ({"data": np.zeros((2, 1024), np.uint8), "labels": [0, 1]}, "got (2, 1024)"),
        ({"data": [[0] * 3072] * 2, "labels": [0, 1]}, "got list"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0.0, 1.5]}, "list of integers"),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [0]}, "1 labels for 2 images"),
        (
            {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]},
            "labels must be 0..9, found 10",
        ),
        ({"data": np.zeros((2, 3072), np.uint8), "labels": [-1, 0]}, "found -1"),
    ],
)
def test_cifar_malformed_batches_name_the_file(tmp_path, entry, expected):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(data.DataFileError) as err:
        cifar10.read_batch(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


def test_mnist_wrong_image_shape_is_refused(tmp_path):
    make_mnist(tmp_path)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    images = np.zeros((50, 14, 56), dtype=np.uint8)  # as many bytes as (50, 28, 28)
    write_idx(raw / "train-images-idx3-ubyte", images, compress=False)
    with pytest.raises(data.DataFileError) as err:
        data.build("mnist", data_dir=tmp_path)
    assert str(err.value) == (
        f"{raw / 'train-images-idx3-ubyte'}: expected MNIST images of shape (N, 28, 28), "
        "got (50, 14, 56)"
    )


@pytest.mark.parametrize(
    ("name", "array", "expected"),
    [
        (
            "train-labels-idx1-ubyte",
            np.zeros((50, 1), np.uint8),
            "says 2 dimensions, expected 0x00000801",
        ),
        (
            "train-images-idx3-ubyte",
            np.zeros((50, 784), np.uint8),
            "says 2 dimensions, expected 0x00000803",
        ),
        ("train-labels-idx1-ubyte", np.zeros(49, np.uint8), "49 labels for the 50 images"),
        ("train-labels-idx1-ubyte", np.full(50, 10, np.uint8), "labels must be 0..9, found 10"),
        ("train-images-idx3-ubyte", np.zeros((0, 28, 28), np.uint8), "got (0, 28, 28)"),
    ],
)
def test_mnist_inconsistent_files_name_the_file(tmp_path, name, array, expected):
    make_mnist(tmp_path)
    path = tmp_path / "mnist" / "MNIST" / "raw" / name
    write_idx(path, array, compress=False)
    with pytest.raises(data.DataFileError) as err:
        mnist.load_arrays(tmp_path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_mnist_bad_magic_and_corrupt_gzip_name_the_file(tmp_path):
    make_mnist(tmp_path)
    raw = tmp_path / "mnist" / "MNIST" / "raw"
    plain = raw / "train-images-idx3-ubyte"
    plain.write_bytes(b"\x00\x00\x0d\x03" + plain.read_bytes()[4:])  # float IDX type code
    with pytest.raises(data.DataFileError, match="bad magic number, expected 0x00000803"):
        mnist.load_arrays(tmp_path)
    make_mnist(tmp_path / "again")
    gz = tmp_path / "again" / "mnist" / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    blob = bytearray(gz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    gz.write_bytes(bytes(blob))
    with pytest.raises(data.DataFileError) as err:
        mnist.load_arrays(tmp_path / "again")
    assert str(err.value).startswith(f"{gz}: unreadable IDX file") and "\n" not in str(err.value)
