"""Read a results tree into pandas tables, compute the statistics, write the summary.

Modules: :mod:`~lehi.results.store` reads runs and metrics through the run record
(:mod:`lehi.record`); :mod:`~lehi.results.stats`, :mod:`~lehi.results.significance` and
:mod:`~lehi.results.verdicts` compute every number a table or figure shows;
:mod:`~lehi.results.tables` computes them once (:func:`collect`); :mod:`~lehi.results.report`
renders Markdown (from :mod:`~lehi.results.markdown`'s blocks;
:mod:`~lehi.results.verdict_report` the verdicts); :mod:`~lehi.results.stepcost` owns
step_cost.json; :mod:`~lehi.results.provenance` says which runs are current at HEAD and
:mod:`~lehi.results.verify` replays a sample of them to find out; :mod:`~lehi.results.cli` is
``python -m lehi.results``.

Definitions used by every table and figure:

- **Optimizer** of a run: its ``optimizer.label`` (summary.json's ``optimizer``); its role
  (baseline or candidate), colour and order come from the roster entry of its
  ``optimizer.name`` (:mod:`lehi.roster`).
- **Final validation loss** of a run: ``summary.last3.val_loss_mean``, the mean validation loss
  over its last 3 evaluations (docs/experiments.md, "Definitions every table and figure
  uses"); **last eval**: the validation loss of its last evaluation. **Final metric**: the
  metric of its last evaluation.
- **Diverged run**: status ``"diverged"`` (the trainer's early stop: non-finite loss, or
  training loss held above ``divergence_factor`` × its initial loss; older summaries also
  recorded ``no_progress`` this way), or a ``"completed"`` run whose final validation loss is
  not finite or whose last validation loss is above its initial one (``no_progress``; for
  summaries without ``initial.val_loss``, metrics.csv's step-0 validation row), or whose
  training loss once rose above ``divergence_factor`` × its initial loss and that never
  trained after (``blown_up``: not trained, below). **Trained
  run**: not diverged and its last validation loss ≤ ``store.TRAINED_FRACTION`` (0.9) × its
  initial one. **Failed runs** (status ``"failed"``: crashes, not the optimizer's doing)
  are left out of every statistic and only counted (``n_failed``).
- **Counted runs** (:func:`lehi.results.stats.counts`, the one filter): not failed, not
  diverged, finite final validation loss. **Unstable, recovered**: a counted run whose
  ``max_spike`` (largest training-loss ratio to its initial loss) exceeds its divergence factor.
- **Cell** = (experiment, scale, dataset, optimizer, lr). Across counted seeds: mean and sample
  std (ddof=1); ``val_loss_spread`` = 2 × that std, or, for a single-seed cell, 2 × the run's
  own std over its last 3 evaluations (the paper's error bars).
- **Eligible cell**: no seed diverged and at least one seed counts. A learning rate that
  diverged for any seed is not a usable setting, however good its other seeds were.
- **Best LR** of an optimizer: the eligible cell with the lowest mean final validation loss
  (ties go to the smaller LR). An optimizer without an eligible cell has no best LR (NaN).
- **Target loss** of an experiment: by default the best Adam final validation loss × 1.05
  (Adam is the reference every paper compares to; the 5 % slack means the reference itself
  reaches the target before its last evaluations). Without Adam runs: the worst of the
  optimizers' best final losses × 1.05. Overridable per experiment.
- **Steps to target** of a run: the step of its first validation row whose loss ≤ target; at
  the best LR, mean ± std over the seeds that reached it, and how many did. **Time to target**
  = steps to target × the per-step cost measured side by side (step_cost.json,
  :mod:`lehi.results.stepcost`); never the sweep's own wall times, which measure the load of
  runs sharing cores. Without step_cost.json only steps are reported.
- **Significance**: each candidate at its best LR against each baseline at theirs, on the
  per-seed final validation losses: Welch's t-test and two-sided Mann-Whitney U; mean
  difference (candidate − baseline, negative = candidate better), Cohen's d (pooled sd) and
  Hedges' g. With fewer than 2 seeds on either side all test values are NaN.
"""

from __future__ import annotations

from lehi.results.cli import main, parse_target
from lehi.results.markdown import experiment_heading, scale_label
from lehi.results.report import (
    METRIC_LABELS,
    NO_RESULTS_HINT,
    render_cost_markdown,
    render_markdown,
    write_summary,
)
from lehi.results.significance import compare, significance
from lehi.results.stats import (
    REFERENCE_OPTIMIZER,
    TARGET_FACTOR,
    aggregate,
    best_lrs,
    counts,
    resolve_targets,
    select_experiment,
    steps_to_target,
    unstable,
)
from lehi.results.store import (
    CELL_KEYS,
    EXP_KEYS,
    RUN_COLUMNS,
    RUN_KEYS,
    STATUSES,
    load_metrics,
    load_runs,
)
from lehi.results.tables import Results, collect

__all__ = [
    "CELL_KEYS",
    "EXP_KEYS",
    "METRIC_LABELS",
    "NO_RESULTS_HINT",
    "REFERENCE_OPTIMIZER",
    "RUN_COLUMNS",
    "RUN_KEYS",
    "STATUSES",
    "TARGET_FACTOR",
    "Results",
    "aggregate",
    "best_lrs",
    "collect",
    "compare",
    "counts",
    "experiment_heading",
    "load_metrics",
    "load_runs",
    "main",
    "parse_target",
    "render_cost_markdown",
    "render_markdown",
    "resolve_targets",
    "scale_label",
    "select_experiment",
    "significance",
    "steps_to_target",
    "unstable",
    "write_summary",
]
