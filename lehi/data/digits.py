"""scikit-learn's bundled 8x8 digits (1,797 images; no download), fixed seeded 80/20 split."""

from __future__ import annotations

import numpy as np
import torch

from lehi.data.bundle import DataBundle, TensorBatches
from lehi.data.splits import split_indices


def build(
    *, seed: int, val_fraction: float, batch_size: int, eval_batch_size: int | None
) -> DataBundle:
    """Digits as 64 pixels scaled to [0, 1] (divided by 16), 10 classes.

    `seed` fixes the split (numpy default_rng(seed) permutation; the first `val_fraction` are
    validation) and is independent of the run seed. There is no `data_dir`: scikit-learn ships
    the data. Defaults: conf/dataset/digits.yaml.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
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
