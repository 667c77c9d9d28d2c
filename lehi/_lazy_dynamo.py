"""torch._dynamo only when something compiles: torch.optim without its eager import.

Importing ``torch._dynamo`` costs about 2.5 s of a run's start on this project's CPU, more
than a small preset's whole training. Nothing in the suite needs it unless
``trainer.compile`` or ``optimizer.compile`` is set, but torch.optim imports it anyway, in
eager mode, at three kinds of call site (torch 2.4 – 2.14):

- ``Optimizer.add_param_group`` (run by every optimizer's constructor), ``zero_grad``,
  ``state_dict`` and ``load_state_dict`` are wrapped by ``torch._disable_dynamo``, which
  imports torch._dynamo on the first call to build a ``torch._dynamo.disable`` wrapper and
  caches it on the function as ``__dynamo_disable``;
- the ``step`` of torch's own optimizers (Adam, AdamW, SGD …) is wrapped by
  ``_use_grad_for_differentiable``, which imports torch._dynamo on every call to insert two
  ``graph_break()`` calls around the step.

Both only matter while dynamo traces. Dynamo cannot be tracing anything before
``torch._dynamo`` is imported, so until then the disable wrapper and the graph breaks are
no-ops, and calling the plain function is the same computation (no change to any number).
:func:`install` therefore puts, in front of each of these wrappers, one that calls the
plain function while ``torch._dynamo`` is not in ``sys.modules`` and torch's own wrapper
once it is (a compiled model or LEHI step imports it, and from then on torch's behaviour
is unchanged). A wrapper whose shape is not the one described above (another torch version)
is left as it is: the run is then only slower to start, never different.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.optim
from torch.optim.optimizer import Optimizer

__all__ = ["install"]

#: The methods of torch.optim.Optimizer that torch wraps with ``torch._disable_dynamo``.
_DISABLED_METHODS = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")

_installed = False


def _dynamo_loaded() -> bool:
    return "torch._dynamo" in sys.modules


def _defer_disable(method: Callable[..., Any]) -> None:
    """Fill ``torch._disable_dynamo``'s cache with a wrapper that imports dynamo on demand."""
    plain = getattr(method, "__wrapped__", None)
    if plain is None or getattr(method, "__code__", None) is None:
        return
    if method.__code__.co_name != "inner" or hasattr(plain, "__dynamo_disable"):
        return
    disabled: list[Callable[..., Any]] = []

    def on_demand(*args: Any, **kwargs: Any) -> Any:
        if not _dynamo_loaded():
            return plain(*args, **kwargs)
        if not disabled:  # what torch._disable_dynamo would have cached (recursive=True)
            disabled.append(torch._dynamo.disable(plain, True, wrapping=False))
        return disabled[0](*args, **kwargs)

    # The attribute name torch._disable_dynamo reads (no name mangling: it is a closure).
    setattr(plain, "__dynamo_disable", on_demand)  # noqa: B010


def _defer_graph_breaks(cls: type[Optimizer]) -> None:
    """``cls.step`` without the import of dynamo while nothing can be compiling."""
    step = cls.__dict__.get("step")
    plain = getattr(step, "__wrapped__", None)
    # Not a _use_grad wrapper (another torch, or already wrapped by the profiler hook that
    # torch adds on a class's first instance): leave it.
    if plain is None or step.__code__.co_name != "_use_grad":
        return

    @functools.wraps(plain)
    def step_on_demand(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        if _dynamo_loaded():
            return step(self, *args, **kwargs)
        # _use_grad_for_differentiable without its graph breaks (no-ops outside tracing).
        previous = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(self.defaults["differentiable"])
            return plain(self, *args, **kwargs)
        finally:
            torch.set_grad_enabled(previous)

    cls.step = step_on_demand  # type: ignore[method-assign]


def install() -> None:
    """Defer torch.optim's imports of torch._dynamo until dynamo is loaded (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    for name in _DISABLED_METHODS:
        _defer_disable(getattr(Optimizer, name))
    for value in vars(torch.optim).values():
        if isinstance(value, type) and issubclass(value, Optimizer) and value is not Optimizer:
            _defer_graph_breaks(value)
