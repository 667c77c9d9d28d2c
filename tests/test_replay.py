"""CI's numerics regression test: HEAD still reproduces committed runs.

One committed confirmation run of digits per reading (its tuned LR, its first fresh seed) is
replayed to the end through the real runner and its metrics rows compared with the committed
ones: exactly wherever this machine can compute as the one that made them (env.json names its
CPU and torch's kernel capability; the replay is pinned to that capability, so an AVX512
machine replays the AVX2 machine's runs bit for bit), within lehi.results.verify's tolerance
inside each run's chaos horizon elsewhere, which sees far less (pure LEHI's horizon is its
first evaluation). A change that
moves numbers fails here with the first differing row, so it must regenerate what it changes
in the same submission (README, "Results").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from lehi.record import machine
from lehi.results import store
from lehi.results import verify as V

EXPERIMENT = "confirm_digits"


def _sample() -> list[dict]:
    if not (REPO / "results" / EXPERIMENT).is_dir():
        return []
    runs = store.load_runs(REPO / "results")
    runs = runs[(runs["experiment"] == EXPERIMENT) & (runs["status"] == "completed")]
    return [g.sort_values("seed").iloc[0].to_dict() for _, g in runs.groupby("optimizer")]


SAMPLE = _sample()


@pytest.mark.skipif(not SAMPLE, reason=f"no committed {EXPERIMENT} results in this checkout")
def test_head_reproduces_one_committed_digits_run_per_reading(tmp_path: Path):
    replays = [V.Replay(r["run"], r["optimizer"], "full") for r in SAMPLE]
    paths = {r["run"]: r["path"] for r in SAMPLE}
    verification, _ = V.replay_all(EXPERIMENT, replays, paths, machine(), "data", 2, tmp_path)
    failed = [f"{o.run}: {o.difference}" for o in verification.outcomes if not o.ok]
    assert not failed, f"HEAD no longer reproduces ({verification.comparison}):\n" + "\n".join(
        failed
    )
    assert {o.label for o in verification.outcomes} == {r["optimizer"] for r in SAMPLE}
    assert all(o.rows > 10 and o.status_replayed == "completed" for o in verification.outcomes)
