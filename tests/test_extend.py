"""README's "Adding an optimizer" path, end to end: a module, a config and one roster entry,
then a two-optimizer sweep through run.py and the results it feeds."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import textwrap

import pytest
from conftest import CONF, REPO

from lehi import roster
from lehi.record import find_runs
from lehi.results import collect, render_markdown

TOY_MODULE = '''
"""Sign descent: w <- w - lr * sign(g), with decoupled weight decay."""

import torch


class SignDescent(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(p.grad.sign(), alpha=-group["lr"])
'''

TOY_CONFIG = """
# Sign descent: a toy optimizer added the documented way.
_target_: toy_sign.SignDescent
name: sign
label: ${.name}
exclude_from_decay: true
lr: 1.0e-3
weight_decay: 0.0
"""


def test_an_optimizer_added_by_module_config_and_roster_entry_runs_a_sweep(
    tmp_path, monkeypatch, capsys
):
    # 1. its module (anywhere importable)
    (tmp_path / "toy_sign.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    # 2. its config, conf/optimizer/sign.yaml (here in a copy of conf/)
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, symlinks=False)
    (conf / "optimizer" / "sign.yaml").write_text(TOY_CONFIG)
    # 3. one roster entry
    entry = roster.Entry("sign", "SignDescent", "#000000", "candidate", 5)
    monkeypatch.setattr(roster, "ROSTER", (*roster.ROSTER, entry))

    results = tmp_path / "runs"
    spec = importlib.util.spec_from_file_location("lehi_run_script", REPO / "run.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "run.py",
        "--config-path",
        str(conf),
        "-m",
        "optimizer=adam,sign",
        "optimizer.lr=1e-3",
        "seed=0,1",
        "trainer.epochs=2",
        "logger=files",
        f"paths.results_dir={results}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()

    summaries = [r.read_summary() for r in find_runs(results)]
    assert sorted((s["optimizer"], s["seed"]) for s in summaries) == [
        ("adam", 0),
        ("adam", 1),
        ("sign", 0),
        ("sign", 1),
    ]
    assert {s["status"] for s in summaries} == {"completed"}
    sign = [s for s in summaries if s["optimizer"] == "sign"]
    assert all(s["final"]["val_loss"] < s["initial"]["val_loss"] for s in sign)

    res = collect(results)
    pairs = set(map(tuple, res.significance[["optimizer", "baseline"]].to_numpy()))
    assert ("sign", "adam") in pairs
    assert "| SignDescent |" in render_markdown(res)
    assert "warning" not in capsys.readouterr().err.lower()


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml")))
def test_every_optimizer_config_has_a_roster_entry(name):
    assert name in roster.names()
