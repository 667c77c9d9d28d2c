"""scikit-learn's bundled 8x8 digits (1,797 images; no download), fixed seeded 80/20 split.

The pixels are read from the file scikit-learn ships them in (sklearn/datasets/data/
digits.csv.gz: 64 pixel columns and the label, the file load_digits parses) without importing
scikit-learn, whose import costs about 2 s of every digits run; where a scikit-learn version
keeps the file elsewhere, load_digits itself is used.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from lehi.data.bundle import DataBundle, TensorBatches
from lehi.data.splits import split_indices


def _bundled_file() -> Path | None:
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None


def load_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels float64 (1797, 64) in 0..16, labels int64 (1797,)), as load_digits returns them."""
    path = _bundled_file()
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return np.asarray(digits.data), np.asarray(digits.target, dtype=np.int64)
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


def build(
    *, seed: int, val_fraction: float, batch_size: int, eval_batch_size: int | None
) -> DataBundle:
    """Digits as 64 pixels scaled to [0, 1] (divided by 16), 10 classes.

    `seed` fixes the split (numpy default_rng(seed) permutation; the first `val_fraction` are
    validation) and is independent of the run seed. There is no `data_dir`: scikit-learn ships
    the data. Defaults: conf/dataset/digits.yaml.
    """
    pixels, labels = load_arrays()
    x = pixels.astype(np.float32) / 16.0
    y = labels.astype(np.int64)
    train_idx, val_idx = split_indices(len(x), val_fraction, seed)
    train = TensorBatches(
        torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx]), batch_size
    )
    val = TensorBatches(
        torch.from_numpy(x[val_idx]),
        torch.from_numpy(y[val_idx]),
        eval_batch_size or batch_size,
        shuffle=False,
        drop_last=False,
    )
    return DataBundle(
        name="digits",
        task="classification",
        loss="cross_entropy",
        metric="accuracy",
        input_shape=(64,),
        num_outputs=10,
        train=train,
        val=val,
    )
