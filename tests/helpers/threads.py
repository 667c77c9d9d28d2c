"""One CPU thread for a test, a module or a session of tiny models."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def single_thread() -> Iterator[None]:
    """torch on one thread, then back to what it was: tiny models run fastest (and steadiest)
    on one thread on a 2-core machine, where OpenMP's hand-offs between two stall for far
    longer than the work. A generator, to be made a fixture of whatever scope needs it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
