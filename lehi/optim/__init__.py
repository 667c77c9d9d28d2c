"""Optimizers of the suite and the one function that builds them from a config.

``lehi``, ``lehibrid`` and ``sophia`` are this package's curvature-aware optimizers; ``adam``
and ``adamw`` are torch.optim's own classes, not re-implementations. Every optimizer config
(conf/optimizer/<name>.yaml) names its class with ``_target_``, as model configs do, and
:func:`build_optimizer` turns it into an optimizer.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from lehi.config import check_call, resolve_target
from lehi.optim.base import CurvatureOptimizer
from lehi.optim.common import RANGES, HyperparameterError, check_hyperparameters
from lehi.optim.lehi import LEHI, LEHIBrid
from lehi.optim.sophia import SophiaG

__all__ = [
    "BUILDER_KEYS",
    "CURVATURE_INPUTS",
    "LEHI",
    "CurvatureOptimizer",
    "LEHIBrid",
    "SophiaG",
    "backward",
    "build_optimizer",
    "check_options",
    "param_groups",
]

#: Config keys that describe the run or steer the builder; never constructor arguments.
BUILDER_KEYS = ("_target_", "name", "label", "exclude_from_decay")
#: What the builder passes to curvature-aware optimizers itself (from the data bundle, run).
CURVATURE_INPUTS = ("loss", "ignore_index", "seed")


def param_groups(
    model: torch.nn.Module, weight_decay: float, *, exclude_from_decay: bool = True
) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimizer groups, nanoGPT's decay convention.

    With ``exclude_from_decay`` and ``weight_decay > 0``: tensors of fewer than 2 dimensions
    (biases, normalisation gains) and ``nn.Embedding`` weights (a tied output head with them)
    form a second group with ``weight_decay=0``; every other tensor keeps the optimizer's
    weight decay. Otherwise (nothing to exclude) one group of all parameters. Each tensor
    appears once, in ``model.parameters()`` order within its group.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not exclude_from_decay or not weight_decay:
        return [{"params": params}]
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    exempt = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    exempt_ids = {id(p) for p in exempt}
    decayed = [p for p in params if id(p) not in exempt_ids]
    groups = [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _optimizer_class(target: Any) -> type[torch.optim.Optimizer]:
    """The class ``optimizer._target_`` names, or a one-line ValueError."""
    cls = resolve_target(target, "optimizer._target_")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer._target_={target!r} is not a torch.optim.Optimizer")
    return cls


def check_options(options: Mapping[str, Any]) -> None:
    """The suite's ranges (:data:`lehi.optim.common.RANGES`) on the hyper-parameters an
    optimizer config sets, whatever its class: torch's own classes admit lr = 0 or inf.
    Raises a ValueError naming ``optimizer.<key>``."""
    with _naming_keys(options):
        check_hyperparameters(**{k: v for k, v in options.items() if k in RANGES})


@contextlib.contextmanager
def _naming_keys(options: Mapping[str, Any]) -> Iterator[None]:
    """A class's own ValueError about one of ``options``, as the config's ``optimizer.<key>``.

    A range error keeps its argument (HyperparameterError) and reads like every config
    range error; any other message that starts with an option's name (torch.optim's style:
    ``rho must be > 0``, ``hybrid='min' is not one of …``) gets the ``optimizer.`` prefix.
    """
    try:
        yield
    except HyperparameterError as exc:
        raise ValueError(
            f"optimizer.{exc.argument}={exc.value!r} is out of range: expected {exc.allowed}"
        ) from exc
    except ValueError as exc:
        message = str(exc)
        if any(re.match(rf"{re.escape(key)}\b", message) for key in options):
            raise ValueError(f"optimizer.{message}") from exc
        raise


def build_optimizer(
    options: Mapping[str, Any],
    model: torch.nn.Module,
    *,
    loss: str,
    ignore_index: int,
    seed: int,
) -> torch.optim.Optimizer:
    """The optimizer an optimizer config describes, over ``model``'s parameters.

    Args:
        options: the resolved config mapping (conf/optimizer/<name>.yaml): ``_target_`` (the
            class, e.g. ``torch.optim.Adam`` or ``lehi.optim.LEHI``), the builder keys
            ``name``, ``label`` and ``exclude_from_decay`` (default True, see
            :func:`param_groups`), and the class's constructor arguments.
        model: the model whose trainable parameters are optimized.
        loss, ignore_index, seed: the loss whose Hessian is imitated (a lehi.curvature rule
            name), its ignored target value and the seed of the curvature draws; passed to
            :class:`CurvatureOptimizer` subclasses only, and not allowed in ``options``.

    Raises:
        ValueError: one line naming ``optimizer.<key>``: an unknown class, a key the class
            does not accept or a value of the wrong type (:func:`lehi.config.check_call`, the
            checks run.py's configs pass), or a value the class refuses.
    """
    options = dict(options)
    target = options.pop("_target_", None)
    cls = _optimizer_class(target)
    exclude = options.pop("exclude_from_decay", True)
    if not isinstance(exclude, bool):
        raise ValueError(f"optimizer.exclude_from_decay must be true or false, got {exclude!r}")
    for key in BUILDER_KEYS:
        options.pop(key, None)
    check_call(cls, options, "optimizer", supplied=("params", *CURVATURE_INPUTS))
    check_options(options)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    weight_decay = options.get("weight_decay", _default(cls, "weight_decay"))
    groups = param_groups(model, weight_decay or 0.0, exclude_from_decay=exclude)
    with _naming_keys(options):
        if issubclass(cls, CurvatureOptimizer):
            return cls(groups, **options, loss=loss, ignore_index=ignore_index, seed=seed)
        return cls(groups, **options)


def _default(cls: type, name: str) -> Any:
    """The default of constructor argument ``name`` (None when it has none)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            parameter = inspect.signature(init).parameters.get(name)
            if parameter is not None and parameter.default is not inspect.Parameter.empty:
                return parameter.default
    return None


def backward(
    optimizer: torch.optim.Optimizer,
    loss: Tensor,
    outputs: Tensor,
    targets: Tensor,
    **kwargs: Any,
) -> None:
    """The trainer's one call: ∇loss into ``.grad``, plus curvature when the optimizer wants it."""
    if isinstance(optimizer, CurvatureOptimizer):
        optimizer.backward(loss, outputs, targets, **kwargs)
    else:
        loss.backward()
