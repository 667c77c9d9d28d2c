"""Signals that stop a run cleanly: checkpoint at the next step, then stop or hand over."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

__all__ = ["Interrupted", "StopSignals"]


class Interrupted(Exception):
    """The run was checkpointed after a signal; a sweep stops here (exit 128 + signal)."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; checkpointed {where} "
            "(the same command resumes it)"
        )
        self.signum = signum


class StopSignals:
    """SIGTERM, SIGINT, SIGUSR1, SIGUSR2 → ``request_stop()``; the trainer checkpoints.

    After the checkpoint, :meth:`hand_over` passes the signal to the handler installed before
    when that is a function (Submitit's, which requeues the job; the requeued job resumes from
    the checkpoint). Otherwise the caller raises :class:`Interrupted`, which ends a local sweep
    with a non-zero exit instead of starting its next job.
    """

    SIGNALS = tuple(
        getattr(signal, name)
        for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
        if hasattr(signal, name)
    )

    def __init__(self, request_stop: Callable[[], None]) -> None:
        self.request_stop = request_stop
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        self.request_stop()

    def __enter__(self) -> StopSignals:
        try:
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: signals stay with the host process
            self.previous = {}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def hand_over(self) -> bool:
        """Call the earlier handler of the signal received, if it is a Python function
        (not Python's default SIGINT handler); whether one was called."""
        if self.received is None:
            return False
        handler = self.previous.get(self.received)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(self.received, None)
            return True
        return False
