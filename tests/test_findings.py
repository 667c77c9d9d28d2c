"""README's findings block (lehi.results.findings) from a hand-made results tree: its
numbers are the tables', a changed run changes them, and only the marked block is rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.results import write_run
from scipy import stats

from lehi.results import collect
from lehi.results.findings import (
    BEGIN,
    END,
    FindingsMarkersError,
    lr_text,
    render_findings,
    update_readme,
)
from plots import common

#: (experiment, optimizer, lr) -> final validation loss per seed (None: diverged)
GRID = {
    ("toy", "adam", 1e-3): [0.50, 0.52, 0.54],
    ("toy", "adam", 1e-2): [0.45, 0.47, 0.49],
    ("toy", "lehi", 1e-3): [0.40, 0.41, 0.45],
    ("toy", "lehi", 1e-2): [0.30, 0.31, None],
    ("ablation_toy", "adam", 1e-3): [0.50, 0.52],
    ("ablation_toy", "lehi_update_clip", 1e-3): [0.44, 0.46],
    ("ablation_toy", "lehi_update_clip", 1e-2): [0.60, None],
    # the same workload at a small budget
    ("toy_small", "adam", 1e-3): [0.61, 0.63],
    ("toy_small", "lehi", 1e-3): [0.70, None],
    ("toy_small", "lehi", 1e-2): [0.66, 0.68],
    ("ablation_toy_small", "lehi_update_clip", 1e-2): [0.64, 0.66],
}
README = f"# Project\n\nText before.\n\n{BEGIN}\nstale numbers\n{END}\n\nText after.\n"


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    for (experiment, optimizer, lr), bases in GRID.items():
        for seed, base in enumerate(bases):
            write_run(root, optimizer, lr, seed, base, experiment=experiment)
    return root


def row(block: str, *cells: str) -> str:
    """The one table row of ``block`` that starts with ``cells``."""
    start = "| " + " | ".join(cells) + " |"
    rows = [line for line in block.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, block)
    return rows[0]


def test_the_block_quotes_the_tables(tree):
    block = render_findings(collect(tree))
    assert block.startswith(BEGIN) and block.endswith(END)
    # Adam: lr 1e-2 wins (0.47 < 0.52); LEHI: 1e-2 had a diverged seed, so 1e-3 (mean 0.42)
    # (the metric is 1 − the last validation loss, base − 0.05, as write_run records it)
    assert row(block, "toy", "Adam", "1e-2", "0.47 ± 0.02", "58.0 %", "0/6", "—")
    welch = stats.ttest_ind(GRID["toy", "lehi", 1e-3], GRID["toy", "adam", 1e-2], equal_var=False)
    assert row(block, "toy", "LEHI", "1e-3", "0.42 ± 0.026", "63.0 %", "1/6", f"{welch.pvalue:.2g}")
    # the ablation: LRs without divergence / where every seed trained (none: these toy runs
    # record no initial validation loss to be 10 % below) / in the grid, best loss at the best
    assert row(block, "Adam", "1/0/1 · 0.5100 (lr 1e-3)")
    assert row(block, "lehi_update_clip", "1/0/2 · 0.4500 (lr 1e-3)")


def test_small_and_full_budgets_side_by_side(tree):
    block = render_findings(collect(tree))
    # small → full: each at its own best LR, divergences over the whole grid
    assert row(block, "toy", "Adam", "1e-3 → 1e-2", "0.62 → 0.47", "43.0 % → 58.0 %", "0/2 → 0/6")
    assert row(block, "toy", "LEHI", "1e-2 → 1e-3", "0.67 → 0.42", "38.0 % → 63.0 %", "1/4 → 1/6")
    # the reading only the ablations run; the ablation's Adam is the tuning sweep's row
    assert row(block, "toy (ablation)", "lehi_update_clip", "1e-2 → 1e-3", "0.65 → 0.45")
    assert not any(line.startswith("| toy (ablation) | Adam |") for line in block.splitlines())


def test_a_changed_run_changes_the_block(tree):
    before = render_findings(collect(tree))
    # Adam's seed 0 at 1e-2 now ends at 0.39 instead of 0.45: its mean moves to 0.45
    summary = tree / "toy" / "adam" / "lr=0.01" / "seed=0" / "summary.json"
    data = json.loads(summary.read_text())
    data["last3"]["val_loss_mean"] = 0.39
    summary.write_text(json.dumps(data))
    after = render_findings(collect(tree))
    assert after != before
    assert "| toy | Adam | 1e-2 | 0.47 ± 0.02 |" in before
    assert "| toy | Adam | 1e-2 | 0.45 ± 0.053 |" in after  # std of 0.39, 0.47, 0.49


def test_update_readme_rewrites_only_the_block(tree, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    results = collect(tree)
    assert update_readme(readme, results) is True
    text = readme.read_text()
    assert text.startswith("# Project\n\nText before.\n\n" + BEGIN)
    assert text.endswith(END + "\n\nText after.\n")
    assert "stale numbers" not in text and "| toy | Adam | 1e-2 |" in text
    assert update_readme(readme, results) is False  # nothing new: the file is left alone
    readme.write_text(README.replace(END, ""))
    with pytest.raises(FindingsMarkersError, match="found 1 and 0"):
        update_readme(readme, results)


def test_make_figures_writes_the_readme_it_is_given(tree, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--root", str(tree), "--out", str(tmp_path / "figures"), "--readme", str(readme)]
    assert common.main([], args, readme=True) == 0
    assert "| toy | LEHI | 1e-3 |" in readme.read_text()
    # without --readme a tree other than the repository's results/ never touches a README
    readme.write_text(README)
    assert common.main([], args[:4], readme=True) == 0
    assert readme.read_text() == README
    # a README without the markers is left alone, and says so
    plain = tmp_path / "PLAIN.md"
    plain.write_text("# no block\n")
    assert common.main([], [*args[:4], "--readme", str(plain)], readme=True) == 0
    assert plain.read_text() == "# no block\n" and "findings not written" in capsys.readouterr().err


def test_lr_text():
    assert [lr_text(v) for v in (1e-4, 3e-4, 0.001, 0.03, 0.1)] == [
        "1e-4",
        "3e-4",
        "1e-3",
        "3e-2",
        "1e-1",
    ]
