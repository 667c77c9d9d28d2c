"""Train one configuration (or a sweep with -m): `python run.py optimizer=lehi dataset=cifar10`.

Configs live in conf/; ad-hoc runs go to runs/<experiment>/<optimizer>/lr=<lr>/seed=<seed>-<id>/
(committed sweeps live in results/, see README). Every failure ends in one line `error: ...`:
exit 2 for bad input (nothing written), 1 for a crash (the run's folder holds a failed
summary and the traceback in run.log), 128 + signal for a run stopped by a signal after
its checkpoint. In a sweep (-m), bad input and crashes are recorded and the sweep goes on; a
signal stops it.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lehi.preemption import Interrupted
from lehi.runner import BAD_INPUT, RunFailed, run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation loss (for Hydra sweepers)."""
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = run(cfg)
    except BAD_INPUT as exc:
        if exc.__cause__ is not None:  # a builder's own check: keep where it was raised
            _write_traceback()
        return _fail(f"error: {exc}", 2, sweeping)
    except Interrupted as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(128 + exc.signum)
    except RunFailed as exc:
        return _fail(f"error: {exc}", 1, sweeping)
    except Exception as exc:  # a crash before the run had a folder: keep its traceback
        where = _write_traceback()
        first = (str(exc).strip().splitlines() or [""])[0]
        return _fail(f"error: {type(exc).__name__}: {first} (traceback in {where})", 1, sweeping)
    return (summary.get("final") or {}).get("val_loss")


def _write_traceback() -> Path:
    """The current exception's traceback into Hydra's output folder of this job."""
    where = Path(HydraConfig.get().runtime.output_dir) / "traceback.txt"
    where.parent.mkdir(parents=True, exist_ok=True)
    where.write_text(traceback.format_exc())
    return where


def _fail(message: str, code: int, sweeping: bool) -> None:
    print(message, file=sys.stderr)
    if not sweeping:
        sys.exit(code)
    return None


if __name__ == "__main__":
    main()
