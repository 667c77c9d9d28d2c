"""What a language model has to beat: the validation loss of context-free token frequencies.

    python -m lehi.diagnostics.unigram --out results/diagnostics/unigram.csv
        --experiments ptb_small fineweb_small [--alphas 1 0.3 0.1] [--data-dir DIR]

Each preset's data are built as ``run.py experiment=<e>`` builds them (:func:`lehi.runner.plan`,
:func:`lehi.runner.build`, seed 0; nothing is written). The unigram model counts the target
tokens of every training batch of the run's budget (the tokens the model is trained on, repeats
included), adds ``alpha`` to each vocabulary entry (1: Laplace; it matters where much of the
vocabulary is never seen in training, as in FineWeb small's 102k tokens of a 50,257-token
vocabulary, so each alpha asked for is a row), and is scored on the validation split as the trainer's full evaluation scores
a model: the mean cross-entropy, in nats, over every target of the validation batches. A model
whose final loss is near this one has learnt the token frequencies and little of the context.
The uniform model's ln V is given beside it. Writes the CSV and a Markdown table next to it.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from lehi.config import compose
from lehi.diagnostics.report import table_parser, write_table
from lehi.results.markdown import table as markdown_table
from lehi.runner import build, plan

__all__ = ["COLUMNS", "main", "measure", "render_markdown", "token_counts", "unigram_loss"]

COLUMNS = (
    "experiment",
    "vocabulary",
    "train_tokens",
    "unseen_vocabulary",
    "val_tokens",
    "alpha",
    "unigram_val_loss",
    "unigram_perplexity",
    "uniform_val_loss",
)


def token_counts(targets: Iterable[Tensor], vocabulary: int, ignore_index: int = -100) -> Tensor:
    """How often each token id occurs in ``targets`` (``ignore_index`` left out), as float64."""
    counts = torch.zeros(vocabulary, dtype=torch.float64)
    for y in targets:
        counts += torch.bincount(y[y != ignore_index].flatten(), minlength=vocabulary).double()
    return counts


def unigram_loss(train_counts: Tensor, val_counts: Tensor, alpha: float = 1.0) -> dict:
    """The unigram model of ``train_counts`` (+ ``alpha`` each) scored on the validation tokens
    ``val_counts`` (both :func:`token_counts`): mean cross-entropy in nats, with the counts."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0 (an unseen token would cost infinity), got {alpha}")
    vocabulary = train_counts.numel()
    n_train, n_val = int(train_counts.sum().item()), int(val_counts.sum().item())
    if n_val == 0:
        raise ValueError("no validation targets")
    log_p = ((train_counts + alpha) / (n_train + alpha * vocabulary)).log()
    return {
        "vocabulary": vocabulary,
        "train_tokens": n_train,
        "unseen_vocabulary": int((train_counts == 0).sum().item()),
        "val_tokens": n_val,
        "alpha": alpha,
        "unigram_val_loss": float(-(val_counts * log_p).sum().item()) / n_val,
        "uniform_val_loss": math.log(vocabulary),
    }


def measure(
    experiment: str, alphas: Sequence[float] = (1.0,), data_dir: str | Path | None = None
) -> list[dict]:
    """The unigram rows of ``experiment`` (a language-model preset), one per alpha."""
    overrides = [f"experiment={experiment}", "optimizer=adam", "seed=0", "logger=files"]
    if data_dir is not None:
        overrides.append(f"paths.data_dir={data_dir}")
    p = plan(compose(overrides))
    trainer = build(p).trainer
    bundle = trainer.bundle
    if bundle.task != "language_model":
        raise ValueError(f"{experiment}: not a language model (task {bundle.task!r})")
    batches = itertools.chain.from_iterable(
        bundle.train.iter_epoch(epoch, p.seed) for epoch in itertools.count()
    )
    budget = itertools.islice(batches, trainer.total_steps * p.trainer.grad_accum)
    vocabulary, ignore = bundle.num_outputs, bundle.ignore_index
    train = token_counts((y for _, y in budget), vocabulary, ignore)
    val = token_counts((y for _, y in bundle.val.iter_epoch(0, p.seed)), vocabulary, ignore)
    rows = []
    for alpha in alphas:
        row = unigram_loss(train, val, alpha)
        row["unigram_perplexity"] = math.exp(row["unigram_val_loss"])
        rows.append({"experiment": experiment, **row})
    return rows


def render_markdown(table: pd.DataFrame) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    lines = [
        "# What a language model has to beat: the unigram model",
        "",
        "`python -m lehi.diagnostics.unigram`: token frequencies of the training batches of the "
        "run's budget (+ alpha per vocabulary entry) scored on the whole validation split as "
        "the trainer's evaluation scores a model (mean cross-entropy, nats).",
        "",
    ]
    header = [
        "experiment",
        "vocabulary",
        "training tokens",
        "never seen",
        "validation tokens",
        "alpha",
        "unigram loss",
        "perplexity",
        "uniform ln V",
    ]
    rows = [
        [
            r["experiment"],
            f"{r['vocabulary']:,}",
            f"{r['train_tokens']:,}",
            f"{r['unseen_vocabulary']:,}",
            f"{r['val_tokens']:,}",
            f"{r['alpha']:g}",
            f"{r['unigram_val_loss']:.3f}",
            f"{r['unigram_perplexity']:,.0f}",
            f"{r['uniform_val_loss']:.3f}",
        ]
        for r in table.to_dict("records")
    ]
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = table_parser(__doc__, "language-model presets, e.g. ptb_small")
    parser.add_argument(
        "--alphas", type=float, nargs="+", default=[1.0], help="added counts (default 1)"
    )
    args = parser.parse_args(argv)
    if min(args.alphas) <= 0:
        parser.error("--alphas must be > 0")
    torch.set_num_threads(1)
    rows = [row for e in args.experiments for row in measure(e, args.alphas, args.data_dir)]
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    write_table(args.out, table, render_markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
