"""Train one configuration (or a sweep with -m): `python run.py optimizer=lehi dataset=cifar10`.

Configs live in conf/; results go to results/<experiment>/<optimizer>/lr=<lr>/seed=<seed>/.
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lehi.data import DataUnavailableError
from lehi.runner import RunError, run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Returns the final validation loss (for Hydra sweepers)."""
    sweeping = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = run(cfg)
    except (RunError, DataUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if sweeping:
            return None
        sys.exit(2)
    except Exception:
        # Recorded as status "failed" in the run's summary.json; the sweep goes on.
        if sweeping:
            return None
        raise
    return (summary.get("final") or {}).get("val_loss")


if __name__ == "__main__":
    main()
