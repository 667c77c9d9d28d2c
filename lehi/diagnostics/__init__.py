"""Hessian-imitation diagnostics: how well do curvature estimates imitate the exact diagonals?

exact      exact diagonals of the Hessian and of the Gauss–Newton matrix of the batch loss
estimates  LEHI's h (one draw, averaged, per-example), LEHIBrid, Sophia, Adam's g⊙g, and the
           EMA state each optimizer divides by, all on the exact diagonals' scale
metrics    cosine, Spearman, relative L2, within-factor-2 (overall and per layer)
setups     the diagnostic-size models the study trains
trajectory one optimizer's trajectory, trained by lehi.train.Trainer, measured at its evaluations
study      the along-training study (``python -m lehi.diagnostics.study``)
report     its Markdown tables
"""

from lehi.diagnostics.estimates import (
    INSTANT_ESTIMATES,
    auxiliary_gradients,
    instantaneous_estimates,
    mean_lehi_estimate,
    optimizer_curvature,
)
from lehi.diagnostics.exact import gauss_newton_diagonal, hessian_diagonal, layer_of
from lehi.diagnostics.metrics import METRICS, agreement, agreement_by_layer

__all__ = [
    "INSTANT_ESTIMATES",
    "METRICS",
    "agreement",
    "agreement_by_layer",
    "auxiliary_gradients",
    "gauss_newton_diagonal",
    "hessian_diagonal",
    "instantaneous_estimates",
    "layer_of",
    "mean_lehi_estimate",
    "optimizer_curvature",
]
