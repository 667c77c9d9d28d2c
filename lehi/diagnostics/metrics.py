"""Agreement between an estimated diagonal e and an exact one r (flattened, float64).

Scale-free:
- ``cosine``: ⟨e, r⟩ / (‖e‖ ‖r‖).
- ``spearman``: Pearson correlation of the ranks (ties get their average rank).
Scale-sensitive, on the scale the estimate is given in (the study puts every estimate on the
scale of the exact diagonals of the mean loss first; see lehi.diagnostics.estimates):
- ``rel_l2``: ‖e − r‖ / ‖r‖.
- ``within2``: the fraction of coordinates with r ≠ 0 where 1/2 ≤ e/r ≤ 2 (coordinates where the
  reference is exactly 0, e.g. weights of dead ReLU units, are left out; a negative Hessian
  entry never counts as matched by a non-negative estimate).
Scale diagnostics:
- ``ls_scale``: c* = ⟨e, r⟩ / ⟨e, e⟩, the factor that would best fit e to r in least squares
  (1 = the given scale is right). The relative error at that best scale is sqrt(1 − cosine²),
  so it is not reported separately: it adds nothing beyond the cosine.
- ``within2_fit``: ``within2`` after multiplying e by exp(median(log r − log e)) over the
  coordinates where both are positive: the factor-2 agreement once the overall scale, which is
  arbitrary for Adam's g⊙g, is taken out.
Undefined values (a zero vector, a constant vector for ranks, no usable coordinate) are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from lehi.diagnostics.exact import layer_of

__all__ = [
    "METRICS",
    "ALL_LAYERS",
    "agreement",
    "agreement_by_layer",
    "cosine",
    "least_squares_scale",
    "log_median_scale",
    "relative_l2",
    "spearman",
    "within_factor",
]

METRICS = ("cosine", "spearman", "rel_l2", "within2", "ls_scale", "within2_fit")
ALL_LAYERS = "all"


def _flat(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pair(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e, r = _flat(e), _flat(r)
    if e.shape != r.shape:
        raise ValueError(f"estimate and reference differ in size: {e.size} vs {r.size}")
    return e, r


def cosine(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> float:
    """⟨e, r⟩ / (‖e‖ ‖r‖); NaN when either vector is zero."""
    e, r = _pair(e, r)
    norm = np.linalg.norm(e) * np.linalg.norm(r)
    return float(e @ r / norm) if norm > 0 else math.nan


def relative_l2(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> float:
    """‖e − r‖ / ‖r‖; NaN when r is zero."""
    e, r = _pair(e, r)
    norm = np.linalg.norm(r)
    return float(np.linalg.norm(e - r) / norm) if norm > 0 else math.nan


def spearman(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for a constant vector."""
    e, r = _pair(e, r)
    re, rr = rankdata(e), rankdata(r)
    re, rr = re - re.mean(), rr - rr.mean()
    norm = np.linalg.norm(re) * np.linalg.norm(rr)
    return float(re @ rr / norm) if norm > 0 else math.nan


def within_factor(e: Tensor | np.ndarray, r: Tensor | np.ndarray, factor: float = 2.0) -> float:
    """Fraction of coordinates with r ≠ 0 where 1/factor ≤ e/r ≤ factor; NaN if r ≡ 0."""
    if not factor >= 1.0:
        raise ValueError(f"factor must be >= 1, got {factor}")
    e, r = _pair(e, r)
    used = r != 0
    if not used.any():
        return math.nan
    ratio = e[used] / r[used]
    return float(np.mean((ratio >= 1.0 / factor) & (ratio <= factor)))


def least_squares_scale(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> float:
    """c* = argmin_c ‖c·e − r‖ = ⟨e, r⟩ / ⟨e, e⟩; NaN when e is zero."""
    e, r = _pair(e, r)
    denom = e @ e
    return float(e @ r / denom) if denom > 0 else math.nan


def log_median_scale(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> float:
    """exp(median(log r − log e)) over coordinates where both are positive; NaN if none."""
    e, r = _pair(e, r)
    used = (e > 0) & (r > 0)
    if not used.any():
        return math.nan
    return float(np.exp(np.median(np.log(r[used]) - np.log(e[used]))))


def agreement(e: Tensor | np.ndarray, r: Tensor | np.ndarray) -> dict[str, float]:
    """Every metric of METRICS for one pair of vectors."""
    e, r = _pair(e, r)
    fit = log_median_scale(e, r)
    return {
        "cosine": cosine(e, r),
        "spearman": spearman(e, r),
        "rel_l2": relative_l2(e, r),
        "within2": within_factor(e, r),
        "ls_scale": least_squares_scale(e, r),
        "within2_fit": within_factor(e * fit, r) if math.isfinite(fit) else math.nan,
    }


def agreement_by_layer(
    estimate: Mapping[str, Tensor], reference: Mapping[str, Tensor]
) -> dict[str, dict[str, float]]:
    """METRICS over all parameters (key ``"all"``) and per layer (weight and bias together).

    Both mappings are parameter name → tensor, with the same names.
    """
    if set(estimate) != set(reference):
        raise ValueError(
            f"estimate and reference name different parameters: "
            f"{sorted(set(estimate) ^ set(reference))}"
        )
    names = list(reference)
    layers: dict[str, list[str]] = {}
    for name in names:
        layers.setdefault(layer_of(name), []).append(name)

    def joined(source: Mapping[str, Tensor], keys: list[str]) -> np.ndarray:
        return np.concatenate([_flat(source[k]) for k in keys])

    out = {ALL_LAYERS: agreement(joined(estimate, names), joined(reference, names))}
    for layer, keys in layers.items():
        out[layer] = agreement(joined(estimate, keys), joined(reference, keys))
    return out
