"""The figure scripts render from a small results tree; checked through matplotlib objects."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import same_color, to_rgb

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `plots` is a folder of scripts at the repo root
    sys.path.insert(0, str(REPO))

from lehi import results as R  # noqa: E402
from lehi.results import Results, collect, stepcost  # noqa: E402
from lehi.roster import color as roster_color  # noqa: E402
from plots import (  # noqa: E402
    ablation,
    cost,
    diagnostics,
    loss_curves,
    lr_sensitivity,
    make_figures,
    verdicts,
)
from plots.style import UNSTABLE_LABEL, label  # noqa: E402

EVAL_STEPS = np.array([10, 20, 30, 40, 50])
BASES = {  # optimizer -> lr -> base of the validation curve
    "adam": {1e-3: 0.6, 1e-2: 0.4, 1e-1: 0.9},
    "lehi": {1e-3: 0.5, 1e-2: 0.3, 1e-1: 0.35},
    "sophia": {1e-3: 0.55, 1e-2: 0.7, 1e-1: 0.9},
}
SEEDS = {"adam": (0, 1), "lehi": (0, 1), "sophia": (0,)}
DIVERGED = {("adam", 1e-1, 0), ("adam", 1e-1, 1), ("lehi", 1e-1, 1), ("sophia", 1e-1, 0)}
SECONDS_PER_STEP = {"adam": 0.010, "lehi": 0.016, "sophia": 0.011}
# Per-repeat ms/step measured side by side (step_cost.json); deliberately unlike the runs' own
# step times, which the figures must not use.
STEP_MS = {"adam": [20.0, 21.0, 19.0], "lehi": [26.0, 25.0, 30.0], "sophia": [22.0, 22.0, 19.0]}


def val_curve(base: float, seed: int) -> np.ndarray:
    return base * (1 + 1.0 / np.arange(1, 6)) + 0.01 * seed


def seconds_per_step(opt: str, seed: int) -> float:
    return SECONDS_PER_STEP[opt] * (1 + 0.1 * seed)


def final_loss(opt: str, lr: float, seed: int) -> float:
    return float(val_curve(BASES[opt][lr], seed)[-3:].mean())


def write_tree(root: Path) -> None:
    """Runs in the trainer's format (config.yaml, metrics.csv, summary.json)."""
    for opt, lrs in BASES.items():
        for lr, base in lrs.items():
            for seed in SEEDS[opt]:
                run = root / "digits" / opt / f"lr={lr:g}" / f"seed={seed}"
                run.mkdir(parents=True)
                (run / "config.yaml").write_text(
                    f"experiment:\n  name: digits\n  scale: small\ndataset:\n  name: digits\n"
                    f"optimizer:\n  name: {opt}\n  lr: {lr}\nseed: {seed}\n"
                )
                diverged = (opt, lr, seed) in DIVERGED
                tps, passes = seconds_per_step(opt, seed), int(opt == "lehi")
                vals = val_curve(base, seed)[: 2 if diverged else 5]
                rows = ["step,epoch,split,loss,metric,lr,wall_time,train_time,curvature_passes"]
                for i, (step, val) in enumerate(zip(EVAL_STEPS, vals, strict=False)):
                    rows.append(
                        f"{step - 5},{i + 1},train,{val + 0.05},0.5,{lr},"
                        f"{(step - 5) * tps + 0.2 * i},{(step - 5) * tps},"
                        f"{(step - 5) * passes}"
                    )
                    rows.append(
                        f"{step},{i + 1},val,{val},{1 - val},{lr},"
                        f"{step * tps + 0.2 * (i + 1)},{step * tps},{step * passes}"
                    )
                (run / "metrics.csv").write_text("\n".join(rows) + "\n")
                steps = 20 if diverged else 50
                (run / "summary.json").write_text(
                    json.dumps(
                        {
                            "status": "diverged" if diverged else "completed",
                            "experiment": "digits",
                            "scale": "small",
                            "dataset": "digits",
                            "optimizer": opt,
                            "lr": lr,
                            "seed": seed,
                            "metric": "accuracy",
                            "steps": steps,
                            "epochs": 5,
                            "final": {
                                "val_loss": None if diverged else vals[-1],
                                "val_metric": None if diverged else 1 - vals[-1],
                                "train_loss": None,
                            },
                            "best": {"val_loss": float(vals.min()), "val_metric": None, "step": 50},
                            "last3": {
                                "val_loss_mean": None if diverged else float(vals[-3:].mean()),
                                "val_loss_std": None if diverged else float(vals[-3:].std(ddof=1)),
                                "n": 0 if diverged else 3,
                            },
                            "wall_time": steps * tps + 1.0,
                            "train_time": steps * tps,
                            "steps_per_s": 1 / tps,
                            "curvature_passes": steps * passes,
                            "diverged_at_step": 20 if diverged else None,
                            "error": None,
                        }
                    )
                )


def write_digits_step_cost(root: Path) -> None:
    stepcost.write(
        stepcost.path_for(root, "digits"),
        {
            "format": stepcost.FORMAT,
            "experiment": "digits",
            "method": stepcost.METHOD,
            "device": "cpu",
            "threads": 1,
            "torch": "2.x",
            "optimizers": {k: {"name": k, "ms_per_step": v} for k, v in STEP_MS.items()},
        },
    )


def edit_summary(run: Path, **changes: object) -> None:
    data = json.loads((run / "summary.json").read_text())
    data.update(changes)
    (run / "summary.json").write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("plots") / "results"
    write_tree(root)
    write_digits_step_cost(root)
    return root


@pytest.fixture()
def tree_copy(tree: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tree, tmp_path / "results"))


@pytest.fixture(scope="module")
def res(tree: Path) -> Results:
    return collect(tree)


def lines_labelled(ax, text: str) -> list:
    return [line for line in ax.get_lines() if line.get_label() == text]


def test_lr_sensitivity(res: Results) -> None:
    figs = lr_sensitivity.figures(res)
    assert list(figs) == ["lr_sensitivity_digits_small"]
    (ax,) = figs["lr_sensitivity_digits_small"].axes
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "learning rate" in ax.get_xlabel()
    assert "final validation loss" in ax.get_ylabel() and "nats" in ax.get_ylabel()
    assert "digits" in ax.get_title() and "small" in ax.get_title()
    for opt in BASES:
        (line,) = lines_labelled(ax, label(opt))
        assert same_color(line.get_color(), roster_color(opt))
        eligible = [
            lr for lr in BASES[opt] if not any((opt, lr, s) in DIVERGED for s in SEEDS[opt])
        ]
        np.testing.assert_allclose(line.get_xdata(), eligible)
        expected = [np.mean([final_loss(opt, lr, s) for s in SEEDS[opt]]) for lr in eligible]
        np.testing.assert_allclose(line.get_ydata(), expected)
        (marks,) = lines_labelled(ax, f"_{opt} diverged")
        np.testing.assert_allclose(marks.get_xdata(), [1e-1])
        assert marks.get_marker() == "x" and same_color(marks.get_color(), roster_color(opt))
    adam_best = np.mean([final_loss("adam", 1e-2, s) for s in SEEDS["adam"]])
    (ref,) = [
        line for line in ax.get_lines() if line.get_label().startswith("best Adam final val loss")
    ]
    assert ref.get_linestyle() == "--"
    np.testing.assert_allclose(ref.get_ydata(), adam_best)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:3] == ["Adam", "Sophia", "LEHI"]
    assert legend[3] == ref.get_label() and "diverged" in legend[4]
    assert "1 seed" in ax.get_legend().get_title().get_text()
    bands = ax.collections
    assert len(bands) == 3
    for band, opt in zip(bands, ("adam", "sophia", "lehi"), strict=True):
        assert np.allclose(band.get_facecolor()[0][:3], to_rgb(roster_color(opt)))
    # Sophia has one seed: its band is ±2 × the std over the run's own last 3 evaluations
    top = bands[1].get_paths()[0].vertices[:, 1].max()
    last3 = val_curve(BASES["sophia"][1e-2], 0)[-3:]
    assert top == pytest.approx(last3.mean() + 2 * last3.std(ddof=1))


def test_loss_curves(res: Results) -> None:
    fig = loss_curves.figures(res)["loss_curves_digits_small"]
    axes = fig.axes
    assert len(axes) == 4
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert "step" in axes[0].get_xlabel() and "time (s" in axes[1].get_xlabel()
    assert "training loss" in axes[0].get_ylabel() and "validation loss" in axes[2].get_ylabel()
    best_lr = {"adam": 1e-2, "lehi": 1e-2, "sophia": 1e-3}
    for ax in axes:
        for opt, lr in best_lr.items():
            (line,) = lines_labelled(ax, f"{label(opt)} (lr={lr:g})")
            assert same_color(line.get_color(), roster_color(opt))
    seeds = SEEDS["lehi"]
    val_mean = np.mean([val_curve(0.3, s) for s in seeds], axis=0)
    (by_step,) = lines_labelled(axes[2], "LEHI (lr=0.01)")
    np.testing.assert_allclose(by_step.get_xdata(), EVAL_STEPS)
    np.testing.assert_allclose(by_step.get_ydata(), val_mean)
    (by_time,) = lines_labelled(axes[3], "LEHI (lr=0.01)")
    # training time = step × the side-by-side median step cost, not the runs' own times
    np.testing.assert_allclose(by_time.get_xdata(), EVAL_STEPS * np.median(STEP_MS["lehi"]) / 1000)
    assert "side by side" in axes[1].get_xlabel()
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["Adam (lr=0.01)", "Sophia (lr=0.001)", "LEHI (lr=0.01)"]


def test_cost(res: Results) -> None:
    best = res.best.set_index("optimizer")
    target = 1.05 * np.mean([final_loss("adam", 1e-2, s) for s in SEEDS["adam"]])
    best_lr = {"adam": 1e-2, "lehi": 1e-2, "sophia": 1e-3}
    for opt, lr in best_lr.items():
        steps = [
            EVAL_STEPS[np.argmax(val_curve(BASES[opt][lr], s) <= target)]
            for s in SEEDS[opt]
            if (val_curve(BASES[opt][lr], s) <= target).any()
        ]
        assert best.loc[opt, "ms_per_step"] == np.median(STEP_MS[opt])
        ratio = np.median(np.array(STEP_MS[opt]) / np.array(STEP_MS["adam"]))
        assert best.loc[opt, "overhead_pct"] == pytest.approx(100 * (ratio - 1))
        if steps:
            assert best.loc[opt, "steps_to_target_mean"] == pytest.approx(np.mean(steps))
            assert best.loc[opt, "time_to_target_mean"] == pytest.approx(
                np.mean(steps) * np.median(STEP_MS[opt]) / 1000
            )
    assert best.loc["lehi", "curvature_passes_per_step"] == 1
    fig = cost.figures(res)["cost_digits_small"]
    steps_ax, ms_ax, time_ax = fig.axes
    assert "steps to target" in steps_ax.get_ylabel() and "(ms)" in ms_ax.get_ylabel()
    assert "side by side" in ms_ax.get_title() and "side-by-side" in time_ax.get_title()
    for ax in (steps_ax, ms_ax, time_ax):
        colours = [p.get_facecolor() for p in ax.patches]
        assert len(colours) == 3
        for c, opt in zip(colours, ("adam", "sophia", "lehi"), strict=True):
            assert same_color(c[:3], roster_color(opt))
        assert [t.get_text() for t in ax.get_xticklabels()] == ["Adam", "Sophia", "LEHI"]
    heights = [p.get_height() for p in ms_ax.patches]
    np.testing.assert_allclose(heights, [np.median(STEP_MS[o]) for o in ("adam", "sophia", "lehi")])
    md = R.render_cost_markdown(res)
    assert "| LEHI | 0.01 |" in md and "measured side by side" in md


def test_cost_without_step_cost_reports_steps_only(tree_copy: Path) -> None:
    stepcost.path_for(tree_copy, "digits").unlink()
    res = collect(tree_copy)
    assert res.best["time_to_target_mean"].isna().all()
    steps_ax, ms_ax, time_ax = cost.figures(res)["cost_digits_small"].axes
    assert len(steps_ax.patches) == 3 and not ms_ax.patches and not time_ax.patches
    assert "benchmarks/step_cost.py" in ms_ax.texts[0].get_text()
    curves = loss_curves.figures(res)["loss_curves_digits_small"].axes
    assert not curves[1].get_lines() and "benchmarks/step_cost.py" in curves[1].texts[0].get_text()
    md = R.render_markdown(res)
    assert "time to target (s" not in md and "steps only" in md


def test_unstable_and_no_progress_marks(tree_copy: Path) -> None:
    # LEHI lr 1e-2 seed 0 spiked to 50 × its initial loss (factor 10) and recovered
    edit_summary(tree_copy / "digits/lehi/lr=0.01/seed=0", max_spike=50.0)
    cfg = tree_copy / "digits/lehi/lr=0.01/seed=0/config.yaml"
    cfg.write_text(cfg.read_text() + "trainer:\n  divergence_factor: 10.0\n")
    # Sophia lr 1e-3 completed but ended above its initial validation loss: no progress
    edit_summary(tree_copy / "digits/sophia/lr=0.001/seed=0", initial={"val_loss": 0.2})
    res = collect(tree_copy)
    run = res.runs.set_index("run").loc["digits/sophia/lr=0.001/seed=0"]
    assert run["diverged"] and run["divergence"] == "no_progress" and not run["counted"]
    (ax,) = lr_sensitivity.figures(res)["lr_sensitivity_digits_small"].axes
    (sophia,) = lines_labelled(ax, "Sophia")
    assert 1e-3 not in sophia.get_xdata()  # never an ordinary point
    (marks,) = lines_labelled(ax, "_sophia diverged")
    np.testing.assert_allclose(sorted(marks.get_xdata()), [1e-3, 1e-1])
    (hollow,) = lines_labelled(ax, "_lehi unstable")
    np.testing.assert_allclose(hollow.get_xdata(), [1e-2])
    assert hollow.get_markerfacecolor() == "white"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert UNSTABLE_LABEL in legend
    axes = loss_curves.figures(res)["loss_curves_digits_small"].axes
    labels = [line.get_label() for line in axes[0].get_lines()]
    assert "LEHI (lr=0.01), 1/2 seeds unstable, recovered" in labels
    assert "| LEHI | 0.01 |" in R.render_markdown(res)


def test_relabelled_run_keeps_roster_colour(tree_copy: Path, caplog) -> None:
    for seed in (0, 1):
        src = tree_copy / "digits/lehi/lr=0.01" / f"seed={seed}"
        dst = tree_copy / "digits/lehi_slow/lr=0.01" / f"seed={seed}"
        shutil.copytree(src, dst)
        cfg = dst / "config.yaml"
        cfg.write_text(cfg.read_text().replace("name: lehi\n", "name: lehi\n  label: lehi_slow\n"))
        edit_summary(dst, optimizer="lehi_slow", optimizer_name="lehi")
    with caplog.at_level("WARNING", logger="lehi.results"):
        res = collect(tree_copy)
    assert not caplog.records
    (ax,) = lr_sensitivity.figures(res)["lr_sensitivity_digits_small"].axes
    (line,) = lines_labelled(ax, "lehi_slow")
    assert same_color(line.get_color(), roster_color("lehi"))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:4] == ["Adam", "Sophia", "LEHI", "lehi_slow"]


def test_ablations_and_nominee_confirmations_get_no_figures_of_their_own(tree_copy: Path) -> None:
    from helpers.results import write_run

    for experiment in ("ablation_digits", "confirm_ablation_digits", "confirm_digits"):
        for seed in (2, 3):
            write_run(tree_copy, "lehi_eps_inside", 1e-3, seed, 0.3, experiment=experiment)
    res = collect(tree_copy)
    drawn = ["digits_small", "confirm_digits_small"]
    for module, prefix in ((lr_sensitivity, "lr_sensitivity"), (loss_curves, "loss_curves")):
        assert sorted(module.figures(res)) == sorted(f"{prefix}_{d}" for d in drawn)
    assert sorted(cost.figures(res)) == sorted(f"cost_{d}" for d in drawn)


def test_figure_list() -> None:
    # make_figures runs every producer in one list; another figure is one more entry
    assert make_figures.FIGURES == [
        lr_sensitivity.make,
        loss_curves.make,
        cost.make,
        diagnostics.make,
        ablation.make,
        verdicts.make,
    ]


VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    python = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
    return subprocess.run(
        [python, str(REPO / "plots" / script), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_figures_end_to_end(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures"
    proc = run_script("make_figures.py", "--root", str(tree), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [
            "cost.md",
            *(
                f"{k}_digits_small.{ext}"
                for k in ("lr_sensitivity", "loss_curves", "cost")
                for ext in ("png", "pdf")
            ),
        ]
    )
    for path in out.iterdir():
        head = path.read_bytes()[:5]
        assert head == {".png": b"\x89PNG\r", ".pdf": b"%PDF-", ".md": b"# Ste"}[path.suffix]
    assert "digits — scale: small" in (tree / "summary.md").read_text()
    assert (tree / "summary.csv").exists() and (tree / "significance.csv").exists()
    assert f"wrote {out / 'cost.md'}" in proc.stdout


@pytest.mark.parametrize("script", ["make_figures.py", "lr_sensitivity.py"])
def test_empty_root_guidance(script: str, tmp_path: Path) -> None:
    proc = run_script(script, "--root", str(tmp_path / "results"), "--out", str(tmp_path / "f"))
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert message == (
        f"no results under {tmp_path / 'results'}: run `make sweep EXP=digits` "
        "first (any experiment works), then `make figures`"
    )
    assert not (tmp_path / "f").exists()


def test_malformed_step_cost_is_one_line_error(tree_copy: Path, tmp_path: Path) -> None:
    stepcost.path_for(tree_copy, "digits").write_text('{"format": "lehi.step_cost/0"}')
    proc = run_script("make_figures.py", "--root", str(tree_copy), "--out", str(tmp_path / "f"))
    assert proc.returncode == 1
    message = proc.stderr.strip()
    assert "\n" not in message
    assert message.endswith("digits/step_cost.json: 'format' must be 'lehi.step_cost/1'")
