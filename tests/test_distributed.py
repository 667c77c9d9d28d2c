"""Data-parallel training under torchrun (gloo, 2 CPU processes) against one process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO
from helpers.net import free_port

from lehi.record import RunRecord

pytestmark = pytest.mark.skipif(
    not __import__("torch").distributed.is_available(), reason="torch.distributed unavailable"
)


def train_cli(run_dir, *args: str, ranks: int = 1) -> list[dict]:
    common = [
        "logger=files",
        "trainer.epochs=2",
        "trainer.device=cpu",
        "trainer.threads=1",
        f"paths.run_dir={run_dir}",
        f"hydra.run.dir={run_dir}_hydra",
        *args,
    ]
    if ranks == 1:
        command = [sys.executable, str(REPO / "run.py"), *common]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={ranks}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(REPO / "run.py"),
            *common,
        ]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return RunRecord(run_dir).read_metrics()


@pytest.mark.parametrize(
    "optimizer",
    [["optimizer=adam"], ["optimizer=lehi", "optimizer.sampler=inverse_cdf", "optimizer.eps=1e-4"]],
)
def test_two_ranks_follow_the_one_process_trajectory(tmp_path, optimizer):
    # With the inverse-CDF sampler each rank draws the global batch's v and keeps its slice,
    # so LEHI's trajectory is the one-process trajectory too. ε = 1e-4 bounds how much LEHI
    # amplifies the last-bit differences of the cross-rank sum where h is ~0 (see
    # test_gradient_accumulation_equals_the_full_batch).
    one = train_cli(tmp_path / "one", *optimizer)
    two = train_cli(tmp_path / "two", *optimizer, ranks=2)
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (a, b)
    assert one[-1]["curvature_passes"] == two[-1]["curvature_passes"]
