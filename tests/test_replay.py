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

from lehi.record import RunRecord, machine
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
@pytest.mark.parametrize("run", SAMPLE, ids=[r["optimizer"] for r in SAMPLE])
def test_head_reproduces_the_committed_digits_run(run: dict, tmp_path: Path):
    env = RunRecord(run["path"]).read_env()
    exact = V.same_machine(env, machine())
    outcome = V.replay(
        run["path"],
        run=run["run"],
        label=run["optimizer"],
        mode="full",
        experiment="digits",
        data_dir="data",
        scratch=str(tmp_path),
        exact=exact,
    )
    mode = "exactly" if exact else f"within {V.REL_TOLERANCE:g} (another machine)"
    assert outcome.ok, f"{run['run']} not reproduced {mode}: {outcome.difference}"
    assert outcome.rows > 10 and outcome.status_replayed == "completed"
