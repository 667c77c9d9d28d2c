"""CIFAR-10 from the python pickle batches, read directly.

Files live in <data_dir>/cifar10/cifar-10-batches-py/ (the layout of the official archive and of
torchvision). The loader reads the pickle batches itself instead of through
torchvision.datasets.CIFAR10, because torchvision md5-checks all six original files and so
refuses a folder holding a subset (such as the shared 4,000/1,000-image copy). Decision:

- Training images are taken from data_batch_1, data_batch_2, ... in order until
  `train_subset` images (all 50,000 when None) are available; validation images from
  test_batch (first `val_subset`, all 10,000 when None). Subset batch files are fine as long as
  they hold enough images.
- verify_checksums=True checks every batch file read against torchvision's md5s of the
  complete originals (so a subset file is rejected); the default False only validates the
  pickle's structure (uint8 (N, 3072) data, N labels in 0..9).
- When the files present cannot supply the images asked for, the official archive is
  downloaded with torchvision (download=True; it checks the archive's md5) into a temporary
  folder and the batch files are moved into place; a failed download leaves nothing behind
  and raises one clear error.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lehi.data.augment import RandomCropFlip
from lehi.data.bundle import DataBundle, TensorBatches
from lehi.data.files import (
    DataFileError,
    DataUnavailableError,
    file_digest,
    missing_dirs,
    one_line,
    remove_empty_dirs,
    resolve_data_dir,
)

BATCH_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
FULL_TRAIN, FULL_TEST = 50_000, 10_000


def batch_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the pickle batches: <data_dir>/cifar10/cifar-10-batches-py."""
    return resolve_data_dir(data_dir) / "cifar10" / BATCH_FOLDER


def _latin1_encode(text: str, encoding: str) -> bytes:
    """The only use of `_codecs.encode` in these pickles: Python 3 protocols 0-2 store bytes so."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# What the CIFAR-10 python format (and the same dict written by Python 3) needs to rebuild:
# ndarray reconstruction (protocols 0-4), its buffer form (protocol 5), dtypes, and bytes
# written as latin-1 text or as bytes(). Taken from numpy's own reductions so the names of
# every numpy version (numpy.core vs numpy._core) resolve to the same functions.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    # protocols 0-2 write an empty bytes object (the buffer of an empty array) as bytes()
    ("__builtin__", "bytes"): bytes,
    ("builtins", "bytes"): bytes,
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of _ALLOWED_GLOBALS, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}; only numpy arrays, lists, dicts, numbers and strings "
                "are allowed"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("uses persistent ids")


def read_batch(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickle batch: images uint8 (N, 3, 32, 32) and labels int64 (N,).

    The file is untrusted: it is unpickled by _BatchUnpickler (no global outside numpy's array
    reconstruction is resolved, so a hostile pickle cannot run code) and every field is
    checked; any fault is a DataFileError naming the file.
    """
    path = Path(path)
    what = "not a CIFAR-10 pickle batch"
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataFileError(path, f"unreadable ({one_line(exc)})") from None
    except (pickle.UnpicklingError, EOFError, MemoryError) as exc:
        raise DataFileError(path, f"{what}: the pickle {exc or 'is truncated'}") from None
    except Exception as exc:  # malformed opcodes raise ValueError, TypeError, IndexError, ...
        raise DataFileError(path, f"{what} ({one_line(exc)})") from None
    if not isinstance(entry, dict):
        raise DataFileError(path, f"{what} (holds a {type(entry).__name__}, not a dict)")
    # the originals are Python-2 pickles (bytes keys here); files written by Python 3 have str keys
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or "labels" not in entry:
        raise DataFileError(path, f"{what} (needs 'data' and 'labels' keys)")
    data, labels = entry["data"], entry["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataFileError(path, f"'data' must be a uint8 array (N, 3072), got {got}")
    if data.shape[1] != 3 * 32 * 32:
        raise DataFileError(path, f"'data' must be a uint8 array (N, 3072), got {data.shape}")
    if isinstance(labels, np.ndarray):
        integral = labels.dtype.kind in "iu" and labels.ndim == 1
    else:
        integral = isinstance(labels, list) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in labels
        )
    if not integral:
        raise DataFileError(path, "'labels' must be a list of integers")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except OverflowError:
        raise DataFileError(path, "labels must be 0..9, found a label beyond int64") from None
    if len(labels) != len(data):
        raise DataFileError(path, f"{len(labels)} labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        bad = labels[(labels < 0) | (labels > 9)][0]
        raise DataFileError(path, f"labels must be 0..9, found {bad}")
    return data.reshape(-1, 3, 32, 32), labels


def _verify(path: Path) -> None:
    from torchvision.datasets import CIFAR10

    expected = dict(CIFAR10.train_list + CIFAR10.test_list)[path.name]
    actual = file_digest(path, "md5")
    if actual != expected:
        raise DataFileError(
            path,
            f"md5 {actual} does not match the complete CIFAR-10 original {expected} "
            "(a subset copy?); pass verify_checksums=False to use it",
        )


def _gather(
    directory: Path, names: tuple[str, ...], need: int, verify: bool
) -> tuple[np.ndarray, np.ndarray] | int:
    """The first `need` images of the batch files `names`, or how many the present files hold."""
    xs, ys, count = [], [], 0
    for name in names:
        if count >= need:
            break
        path = directory / name
        if not path.is_file():
            break
        if verify:
            _verify(path)
        x, y = read_batch(path)
        xs.append(x)
        ys.append(y)
        count += len(x)
    if count < need:
        return count
    return np.concatenate(xs)[:need], np.concatenate(ys)[:need]


def download(root: Path) -> None:
    """Download the official archive with torchvision into a temp folder, move batches to `root`."""
    from torchvision.datasets import CIFAR10

    created = missing_dirs(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=root))
    try:
        CIFAR10(root=str(tmp), train=True, download=True)
        target = root / BATCH_FOLDER
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted((tmp / BATCH_FOLDER).iterdir()):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_empty_dirs(created)


def load_arrays(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train_subset: int | None = None,
    val_subset: int | None = None,
    verify_checksums: bool = False,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (uint8 (N, 3, 32, 32), int64 (N,)), "val": (...)} with the sizes asked for."""
    for name, value in (("train_subset", train_subset), ("val_subset", val_subset)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive integer or null, got {value}")
    need_train = train_subset or FULL_TRAIN
    need_val = val_subset or FULL_TEST
    if need_train > FULL_TRAIN or need_val > FULL_TEST:
        raise ValueError(
            f"CIFAR-10 has {FULL_TRAIN} training / {FULL_TEST} test images; asked for {need_train}/{need_val}"
        )
    directory = batch_dir(data_dir)

    def gather() -> tuple[tuple[np.ndarray, np.ndarray] | int, tuple[np.ndarray, np.ndarray] | int]:
        return (
            _gather(directory, TRAIN_FILES, need_train, verify_checksums),
            _gather(directory, (TEST_FILE,), need_val, verify_checksums),
        )

    train, val = gather()
    if isinstance(train, int) or isinstance(val, int):
        have = f"{train if isinstance(train, int) else need_train} training / {val if isinstance(val, int) else need_val} test images"
        try:
            download(directory.parent)
        except Exception as exc:  # torchvision raises URLError/OSError/RuntimeError when offline
            raise DataUnavailableError(
                f"CIFAR-10 in {directory} supplies {have}, {need_train}/{need_val} are needed "
                f"(expected {', '.join(TRAIN_FILES)}, {TEST_FILE}; set train_subset/val_subset to "
                f"use fewer), and the torchvision download failed ({one_line(exc)}); copy the "
                "files there or run once with network access"
            ) from None
        train, val = gather()
        if isinstance(train, int) or isinstance(val, int):
            raise ValueError(f"CIFAR-10 in {directory} is incomplete even after downloading")
    return {"train": train, "val": val}


def build(
    *,
    data_dir: str | os.PathLike[str] | None,
    batch_size: int,
    eval_batch_size: int | None,
    train_subset: int | None,
    val_subset: int | None,
    augment: bool,
    verify_checksums: bool,
) -> DataBundle:
    """CIFAR-10 as (3, 32, 32) floats normalised per channel with the training split's mean/std.

    augment=True applies a random 4 px crop (black padding) and horizontal flip to training
    batches on their device. train_subset / val_subset keep the first K images.
    Defaults: conf/dataset/cifar10.yaml.
    """
    arrays = load_arrays(
        data_dir,
        train_subset=train_subset,
        val_subset=val_subset,
        verify_checksums=verify_checksums,
    )
    tx = torch.from_numpy(arrays["train"][0]).float().div_(255.0)
    vx = torch.from_numpy(arrays["val"][0]).float().div_(255.0)
    mean = tx.mean(dim=(0, 2, 3), keepdim=True)
    std = tx.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    tx, vx = (tx - mean) / std, (vx - mean) / std
    aug = RandomCropFlip(4, fill=(-mean / std).flatten().tolist()) if augment else None
    train = TensorBatches(tx, torch.from_numpy(arrays["train"][1]), batch_size, augment=aug)
    val = TensorBatches(
        vx,
        torch.from_numpy(arrays["val"][1]),
        eval_batch_size or batch_size,
        shuffle=False,
        drop_last=False,
    )
    return DataBundle(
        name="cifar10",
        task="classification",
        loss="cross_entropy",
        metric="accuracy",
        input_shape=(3, 32, 32),
        num_outputs=10,
        train=train,
        val=val,
    )
