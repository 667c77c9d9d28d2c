"""CI's numerics regression test: HEAD still reproduces committed runs.

One committed digits run per optimizer (its best LR, seed 0) is replayed to the end through
the real runner and its metrics rows compared with the committed ones: exactly on the machine
that made them, within lehi.results.verify's tolerance elsewhere. A change that moves numbers
fails here with the first differing row, so it must regenerate what it changes in the same
submission (README, "Results").
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from lehi.record import machine
from lehi.results import store
from lehi.results import verify as V

DIGITS = REPO / "results" / "digits"


def _sample() -> list[dict]:
    if not DIGITS.is_dir():
        return []
    runs = store.load_runs(REPO / "results")
    runs = runs[(runs["experiment"] == "digits") & (runs["status"] == "completed")]
    picked = []
    for _, group in runs.groupby("optimizer", sort=True):
        best_lr = group.loc[group["val_loss"].idxmin(), "lr"]
        at = group[group["lr"] == best_lr].sort_values("seed")
        picked.append(at.iloc[0].to_dict())
    return picked


SAMPLE = _sample()


@pytest.mark.skipif(not SAMPLE, reason="no committed digits results in this checkout")
def test_head_reproduces_one_committed_digits_run_per_optimizer(tmp_path: Path):
    replays = [V.Replay(r["run"], r["optimizer"], "full") for r in SAMPLE]
    paths = {r["run"]: r["path"] for r in SAMPLE}
    verification, _ = V.replay_all("digits", replays, paths, machine(), "data", 2, tmp_path)
    failed = [f"{o.run}: {o.difference}" for o in verification.outcomes if not o.ok]
    assert not failed, f"HEAD no longer reproduces ({verification.comparison}):\n" + "\n".join(
        failed
    )
    assert {o.label for o in verification.outcomes} == {r["optimizer"] for r in SAMPLE}
    assert all(o.rows > 10 and o.status_replayed == "completed" for o in verification.outcomes)
