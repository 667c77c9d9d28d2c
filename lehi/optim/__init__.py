"""Optimizers of the suite and the one function that builds them from a config.

``lehi``, ``lehibrid`` and ``sophia`` are this package's curvature-aware optimizers; ``adam``
and ``adamw`` are torch.optim's own classes, not re-implementations. Every optimizer config
(conf/optimizer/<name>.yaml) names its class with ``_target_``, as model configs do, and
:func:`build_optimizer` turns it into an optimizer.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lehi.optim.base import CurvatureOptimizer
from lehi.optim.lehi import LEHI, LEHIBrid
from lehi.optim.sophia import SophiaG

__all__ = [
    "BUILDER_KEYS",
    "LEHI",
    "CurvatureOptimizer",
    "LEHIBrid",
    "SophiaG",
    "backward",
    "build_optimizer",
    "param_groups",
]

#: Config keys that describe the run or steer the builder; never constructor arguments.
BUILDER_KEYS = ("_target_", "name", "label", "exclude_from_decay")
#: What the builder passes to curvature-aware optimizers itself (from the data bundle, run).
_CURVATURE_INPUTS = ("loss", "ignore_index", "seed")


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


def _accepted(cls: type) -> set[str] | None:
    """The keyword arguments ``cls(params, …)`` takes (None: any, it has **kwargs at the end)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names.update(
            p.name
            for p in parameters
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"
        )
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names - {"params"}
    return None


def _optimizer_class(target: Any) -> type[torch.optim.Optimizer]:
    """The class ``optimizer._target_`` names, or a one-line ValueError."""
    if not isinstance(target, str):
        raise ValueError(
            f"optimizer._target_ must name an optimizer class (e.g. lehi.optim.LEHI), "
            f"got {target!r}"
        )
    module_name, _, attribute = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"optimizer._target_={target!r} cannot be imported: no {attribute!r} "
            f"in module {module_name!r}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer._target_={target!r} is not a torch.optim.Optimizer")
    return cls


def _check_keys(cls: type, target: str, options: Mapping[str, Any]) -> None:
    """Every key must be a constructor argument of ``cls`` that the config may set."""
    curvature = issubclass(cls, CurvatureOptimizer)
    accepted = _accepted(cls)
    for key in options:
        if key in _CURVATURE_INPUTS and curvature:
            raise ValueError(
                f"optimizer.{key} is set by the run (dataset loss, ignore index, seed), "
                f"not by the optimizer config"
            )
        if accepted is not None and key not in accepted:
            raise ValueError(f"optimizer.{key} is not an option of {target}")


def _check_common(options: Mapping[str, Any]) -> None:
    lr = options.get("lr")
    if lr is not None and not (
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
    ):
        raise ValueError(f"optimizer.lr must be a finite number > 0, got {lr!r}")
    betas = options.get("betas")
    if betas is not None:
        ok = isinstance(betas, (list, tuple)) and len(betas) == 2
        if not (ok and all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(
                f"optimizer.betas must be two numbers in [0, 1) (β1, β2), got {betas!r}"
            )


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
            does not accept, or lr / betas outside their ranges.
    """
    options = dict(options)
    target = options.pop("_target_", None)
    cls = _optimizer_class(target)
    exclude = options.pop("exclude_from_decay", True)
    if not isinstance(exclude, bool):
        raise ValueError(f"optimizer.exclude_from_decay must be true or false, got {exclude!r}")
    for key in BUILDER_KEYS:
        options.pop(key, None)
    curvature = issubclass(cls, CurvatureOptimizer)
    _check_keys(cls, target, options)
    _check_common(options)
    if "betas" in options:
        options["betas"] = tuple(options["betas"])
    if curvature:
        options.update(loss=loss, ignore_index=ignore_index, seed=seed)
    weight_decay = options.get("weight_decay", _default(cls, "weight_decay"))
    groups = param_groups(model, weight_decay or 0.0, exclude_from_decay=exclude)
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
