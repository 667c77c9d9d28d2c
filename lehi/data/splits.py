"""Fixed, seeded train/validation splits and standardisation shared by the dataset modules."""

from __future__ import annotations

import numpy as np


def split_indices(
    num_examples: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split 0..N-1 into (train, val) index arrays.

    The permutation is numpy's default_rng(seed).permutation(N); the first round(N *
    val_fraction) entries are validation, the rest training. The split seed is a dataset
    option (not the run seed), so every run of an experiment shares the same split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if seed < 0:
        raise ValueError(f"split seed must be >= 0, got {seed}")
    perm = np.random.default_rng(seed).permutation(num_examples)
    n_val = int(round(num_examples * val_fraction))
    if n_val < 1 or n_val >= num_examples:
        raise ValueError(
            f"val_fraction {val_fraction} leaves an empty split of {num_examples} examples"
        )
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def standardize(
    train: np.ndarray, *others: np.ndarray
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Standardise columns with the training mean and (population) std; constant columns keep std 1.

    Returns ([train, *others] standardised, mean, std).
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return [(a - mean) / std for a in (train, *others)], mean, std


def first(array: np.ndarray, count: int | None, what: str) -> np.ndarray:
    """The first `count` rows of `array` (all when count is None); `what` names it in errors."""
    if count is None:
        return array
    if count < 1:
        raise ValueError(f"{what} must be a positive integer or null, got {count}")
    if count > len(array):
        raise ValueError(f"{what}={count} exceeds the {len(array)} examples available")
    return array[:count]
