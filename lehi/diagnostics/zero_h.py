"""Exact zeros of h at LEHI's first step, and how far the first step overshoots Adam's.

    python -m lehi.diagnostics.zero_h --out results/ablation_zero_h.csv [--data-dir DIR]
        [--seeds 0 1 2 3 4]

For each ablation dataset's model (digits MLP, MNIST MLP, CASP MLP; the PTB LSTM of
``ptb_small`` and the decoder of ``fineweb_small`` too when ``DIR/ptb``, ``DIR/fineweb``
exist), model and LEHI are built exactly as a run of ``experiment=ablation_<d> reading=lehi``
builds them (:func:`lehi.runner.plan` and
:func:`lehi.runner.build`; nothing is written), on the run's first training batch:

- **h**: after the first curvature refresh (``lehi.optim.backward``) the EMA holds
  v = (1 − β2)·h (plain reading: no floor, no warm-up, no N-scaling), so h = v / (1 − β2) is
  read from the optimizer's state. A coordinate with h = 0 exactly divides its first step by ε.
  Where g = 0 as well (dead ReLU units, zero inputs, unused embedding rows) the step is 0 and
  the zero is harmless, so the fraction with h = 0 but g ≠ 0 is reported too.
- **first step vs Adam**: |Δw_LEHI| / |Δw_Adam| per coordinate, where Δw_LEHI is the step LEHI
  takes and Δw_Adam the step torch's Adam (the ``adam`` reading's config) takes from the same
  weights and the same gradient (after the run's gradient clipping, if any) at the same
  learning rate (the run's first, which a warm-up puts below the base LR); with bias
  correction this is (|g| + ε) / (√h + ε). Coordinates where Adam does not move (g = 0) are
  left out.

Per parameter tensor, averaged over seeds (each seed: its own initialisation, batch order and
draws): the fraction of exact zeros of h, and the max and median of the step ratio. Writes the
CSV and a Markdown table next to it (same name, ``.md``), each atomically.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from lehi.config import compose
from lehi.diagnostics.report import write_table
from lehi.optim import LEHI, backward, build_optimizer
from lehi.runner import build, plan

__all__ = [
    "COLUMNS",
    "DATASETS",
    "LayerStep",
    "experiments",
    "first_step",
    "main",
    "render_markdown",
    "summarise",
]

#: The ablation datasets (experiments/ablation_<d>.yaml).
DATASETS = ("digits", "mnist_small", "protein_small")
#: The language models, each measured only when its data folder (under paths.data_dir) is at hand.
LANGUAGE_MODELS = {"ptb_small": "ptb", "fineweb_small": "fineweb"}
COLUMNS = (
    "experiment",
    "dataset",
    "parameter",
    "shape",
    "numel",
    "n_seeds",
    "h_zero_fraction",
    "h_zero_fraction_max",
    "h_zero_grad_nonzero_fraction",
    "step_ratio_max",
    "step_ratio_max_worst",
    "step_ratio_median",
)


@dataclass(frozen=True)
class LayerStep:
    """One parameter tensor at the first step of one seed."""

    experiment: str
    dataset: str
    seed: int
    parameter: str  # its name in model.named_parameters()
    h: Tensor  # the first draw of h (NaN where the tensor got no curvature)
    grad: Tensor  # the gradient both optimizers stepped with
    lehi_delta: Tensor
    adam_delta: Tensor
    eps: float

    @property
    def zero_fraction(self) -> float:
        """Fraction of coordinates whose h is exactly 0 (NaN without curvature)."""
        if torch.isnan(self.h).all():
            return math.nan
        return float((self.h == 0).double().mean())

    @property
    def exposed_fraction(self) -> float:
        """Fraction of coordinates with h = 0 but g ≠ 0: the ones whose step divides by ε
        (where g = 0 too, as for dead units or unused embedding rows, the step is 0)."""
        if torch.isnan(self.h).all():
            return math.nan
        return float(((self.h == 0) & (self.grad != 0)).double().mean())

    def ratio(self) -> Tensor:
        """|Δw_LEHI| / |Δw_Adam| over the coordinates Adam moves."""
        moved = self.adam_delta != 0
        return (self.lehi_delta[moved].abs() / self.adam_delta[moved].abs()).double()


def experiments(data_dir: str | Path | None) -> list[str]:
    """The experiments to measure: the ablation presets, plus each language model whose data
    folder is in ``data_dir``."""
    names = [f"ablation_{d}" for d in DATASETS]
    if data_dir is not None:
        names += [e for e, d in LANGUAGE_MODELS.items() if (Path(data_dir) / d).is_dir()]
    return names


def _overrides(
    experiment: str, reading: str, seed: int, data_dir: str | Path | None, extra: Sequence[str]
) -> list[str]:
    out = [f"experiment={experiment}", f"reading={reading}", f"seed={seed}", "logger=files"]
    if data_dir is not None:
        out.append(f"paths.data_dir={data_dir}")
    return [*out, *extra]


def _check_plain(opt: torch.optim.Optimizer) -> LEHI:
    """h = v / (1 − β2) only holds for LEHI's plain reading; refuse anything else."""
    if not isinstance(opt, LEHI) or opt.curvature_warmup != "none":
        raise ValueError("zero_h reads h back from LEHI's state: reading=lehi (no warm-up) only")
    for group in opt.param_groups:
        if group["h_floor"] or group["scale_by_batch"]:
            raise ValueError("zero_h needs h_floor=0 and scale_by_batch=false (reading=lehi)")
    return opt


def first_step(
    experiment: str, seed: int, data_dir: str | Path | None = None, extra: Sequence[str] = ()
) -> list[LayerStep]:
    """LEHI's and Adam's first steps on the first training batch of ``experiment``'s run
    (``extra``: further Hydra overrides of both runs)."""
    p = plan(compose(_overrides(experiment, "lehi", seed, data_dir, extra)))
    built = build(p)
    trainer, model = built.trainer, built.model
    opt = _check_plain(trainer.optimizer)
    adam_cfg = compose(_overrides(experiment, "adam", seed, data_dir, extra))["optimizer"]
    adam_model = copy.deepcopy(model)
    bundle = trainer.bundle
    adam = build_optimizer(
        adam_cfg, adam_model, loss=bundle.loss, ignore_index=bundle.ignore_index, seed=seed
    )
    # Both take the run's first step at its first learning rate (a warm-up starts below the
    # base LR, and the trainer's scheduler has already set LEHI's groups to it).
    if len(adam.param_groups) != len(opt.param_groups):
        raise ValueError(f"{experiment}: Adam and LEHI group the parameters differently")
    for adam_group, lehi_group in zip(adam.param_groups, opt.param_groups, strict=True):
        adam_group["lr"] = lehi_group["lr"]
    x, y = next(iter(bundle.train.iter_epoch(0, p.seed)))
    model.train()
    opt.zero_grad(set_to_none=True)
    outputs = model(x)
    loss = trainer.rule.loss(outputs.float(), y, bundle.ignore_index)
    backward(opt, loss, outputs, y)
    if p.trainer.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), p.trainer.grad_clip)

    named = list(model.named_parameters())
    betas = {id(q): g["betas"][1] for g in opt.param_groups for q in g["params"]}
    before, grads, hs = [], [], []
    for _, q in named:
        state = opt.state[q]
        refreshed = bool(state) and float(state["curvature_step"]) == 1.0
        v = state["exp_avg_curvature"] if refreshed else None
        hs.append(v / (1 - betas[id(q)]) if v is not None else torch.full_like(q, math.nan))
        before.append(q.detach().clone())
        grads.append(q.grad.detach().clone())
    opt.step()
    for (_, q), g in zip(adam_model.named_parameters(), grads, strict=True):
        q.grad = g.clone()
    adam.step()
    name = str(p.config["dataset"]["name"])
    return [
        LayerStep(
            experiment=experiment,
            dataset=name,
            seed=seed,
            parameter=pname,
            h=h.detach().clone(),
            grad=g,
            lehi_delta=(q.detach() - w0),
            adam_delta=(aq.detach() - w0),
            eps=float(opt.param_groups[0]["eps"]),
        )
        for (pname, q), (_, aq), w0, g, h in zip(
            named, adam_model.named_parameters(), before, grads, hs, strict=True
        )
    ]


def summarise(steps: Sequence[LayerStep]) -> pd.DataFrame:
    """One row per (experiment, parameter tensor), seeds averaged; columns :data:`COLUMNS`."""
    rows = []
    for s in steps:
        ratio = s.ratio()
        rows.append(
            {
                "experiment": s.experiment,
                "dataset": s.dataset,
                "parameter": s.parameter,
                "shape": "×".join(str(d) for d in s.h.shape),
                "numel": s.h.numel(),
                "seed": s.seed,
                "zero": s.zero_fraction,
                "exposed": s.exposed_fraction,
                "rmax": float(ratio.max()) if ratio.numel() else math.nan,
                "rmed": float(ratio.median()) if ratio.numel() else math.nan,
            }
        )
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(COLUMNS))
    keys = ["experiment", "dataset", "parameter", "shape", "numel"]
    out = frame.groupby(keys, sort=False).agg(
        n_seeds=("seed", "nunique"),
        h_zero_fraction=("zero", "mean"),
        h_zero_fraction_max=("zero", "max"),
        h_zero_grad_nonzero_fraction=("exposed", "mean"),
        step_ratio_max=("rmax", "mean"),
        step_ratio_max_worst=("rmax", "max"),
        step_ratio_median=("rmed", "mean"),
    )
    return out.reset_index()[list(COLUMNS)]


def render_markdown(table: pd.DataFrame) -> str:
    """The Markdown table of :func:`summarise`'s rows."""
    header = [
        "experiment",
        "parameter",
        "shape",
        "seeds",
        "h = 0 exactly (mean; max over seeds)",
        "h = 0, g ≠ 0 (mean)",
        "|Δw LEHI| / |Δw Adam|: max (mean; worst seed)",
        "median (mean)",
    ]
    lines = [
        "# Exact zeros of h at LEHI's first step",
        "",
        "`python -m lehi.diagnostics.zero_h`: first training batch of each run, reading=lehi; "
        "h = v / (1 − β2) after the first refresh; step ratio over the coordinates Adam moves, "
        "from the same weights and gradient. Means over seeds. h = 0 with g ≠ 0: the first step "
        "divides by ε there; h = 0 with g = 0 (dead units, unused rows) moves nothing.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in table.to_dict("records"):
        cells = [
            r["experiment"],
            f"`{r['parameter']}`",
            r["shape"],
            str(r["n_seeds"]),
            f"{r['h_zero_fraction']:.2%} ({r['h_zero_fraction_max']:.2%})",
            f"{r['h_zero_grad_nonzero_fraction']:.2%}",
            f"{r['step_ratio_max']:.3g} ({r['step_ratio_max_worst']:.3g})",
            f"{r['step_ratio_median']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="CSV path (the .md goes next to it)")
    parser.add_argument("--data-dir", default=None, help="paths.data_dir (default: the config's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--experiments", nargs="+", default=None, help="default: the ablation presets (+ PTB)"
    )
    args = parser.parse_args(argv)
    data_dir = args.data_dir or compose()["paths"]["data_dir"]
    names = args.experiments or experiments(data_dir)
    steps = [s for e in names for seed in args.seeds for s in first_step(e, seed, data_dir)]
    table = summarise(steps)
    write_table(args.out, table, render_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
