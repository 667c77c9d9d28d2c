"""Checkpoints: written atomically, loaded with weights_only=True, clear errors when broken."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from lehi.io import atomic_path

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_REQUIRED = ("model", "optimizer", "scheduler", "step", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, foreign or from another kind of run."""


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """torch.save ``state`` to ``path`` through a temp file and os.replace."""
    fd, tmp = atomic_path(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` (tensors only, no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume from")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, unsafe globals ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable ({reason[:200]})") from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise CheckpointError(
            f"checkpoint {path} is not a lehi training checkpoint (needs keys {', '.join(_REQUIRED)})"
        )
    return state
