"""Every check of a run's config, in one place, before anything is built or written.

Defaults live in conf/*.yaml only. Types come from the code that consumes each section: the
trainer's keys from :class:`lehi.train.TrainerConfig`, a dataset's, model's or optimizer's
keys from the signature of its ``_target_`` (type hints), so a new option is typed where it
is defined; unknown keys are refused here (:func:`check_call`) and nowhere else. Ranges that a
type cannot say are the table :data:`RANGES`, except the optimizers': those are checked by
the optimizer classes themselves (lehi.optim.common), and the config layer only adds the
``optimizer.<key>`` name to their message. Every failure is a :class:`ConfigError` whose
one-line message names the config key.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import torch

__all__ = [
    "CONF_DIR",
    "ConfigError",
    "RANGES",
    "check_call",
    "check_run",
    "compose",
    "pick_device",
    "resolve_target",
    "signatures",
]

#: conf/ of this checkout: what run.py composes.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A bad config value or key: one line naming the key and what is allowed."""


#: The top level of conf/config.yaml and the keys of its plain (non-group) sections.
TOP_LEVEL = ("seed", "experiment", "paths", "dataset", "model", "optimizer", "trainer", "logger")
SECTIONS: dict[str, dict[str, Any]] = {
    # tuned_lr, tuned_from: a confirmation preset's LR per reading and where it came from
    # (lehi.results.confirm); reuse_from: experiments whose identical runs are adopted
    # (lehi.reuse).
    "experiment": {
        "name": str,
        "scale": Literal["full", "small"],
        "tuned_lr": dict,
        "tuned_from": dict,
        "reuse_from": list[str],
    },
    "paths": {"data_dir": str, "results_dir": str, "cache_dir": str, "run_dir": str | None},
    "logger": {
        "name": Literal["wandb", "files"],
        "mode": Literal["online", "offline", "disabled"],
        "project": str,
        "entity": str | None,
        "group": str | None,
        "tags": list[str],
    },
}


def _finite_positive(v: float) -> bool:
    return math.isfinite(v) and v > 0


#: Ranges beyond types: key → (predicate, what is allowed).
RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: 0 <= v < 2**63, "an integer in [0, 2^63)"),
    "trainer.divergence_factor": (lambda v: math.isfinite(v) and v > 1, "a finite number > 1"),
    "trainer.min_lr_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "trainer.warmup_fraction": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "trainer.grad_clip": (
        lambda v: v is None or _finite_positive(v),
        "a finite number > 0 or null",
    ),
    "trainer.threads": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.epochs": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.max_steps": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.eval_every": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.evaluations": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.eval_subset_batches": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
    "trainer.log_every": (lambda v: v >= 1, "an integer >= 1"),
    "trainer.grad_accum": (lambda v: v >= 1, "an integer >= 1"),
    "dataset.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "dataset.eval_batch_size": (lambda v: v is None or v >= 1, "an integer >= 1 or null"),
}


def describe(hint: Any) -> str:
    """A type hint in the words of a config file."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not torch.Tensor)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {describe(args[0])}s"
        return f"a list of {describe(args[0]) if args else 'values'}"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


#: The scalar types a config value can have, and what counts as each (bool is not a number).
_SCALARS: dict[Any, Callable[[Any], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
    type(None): lambda v: v is None,
}


def conforms(value: Any, hint: Any) -> bool:
    """Whether a plain config value (from YAML or the command line) fits ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    if hint in _SCALARS:
        return _SCALARS[hint](value)
    if origin in (Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        return _conforms_sequence(value, origin, args)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a typing construct configs cannot express: the callee checks it


def _conforms_sequence(value: Any, origin: Any, args: tuple[Any, ...]) -> bool:
    if not isinstance(value, list | tuple):
        return False
    if origin is tuple and args and args[-1] is not Ellipsis:
        return len(value) == len(args) and all(map(conforms, value, args))
    return all(conforms(v, args[0] if args else Any) for v in value)


def resolve_target(path: Any, key: str) -> Callable[..., Any]:
    """The callable a ``_target_`` names (``module.attribute``).

    Raises ConfigError naming ``key``: a path that cannot be imported keeps the import's own
    error in the message and as the cause; only ImportError and AttributeError count as
    "cannot be imported", anything else a module raises on import is a bug and propagates.
    """
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"{key}={path!r} must name a callable as module.attribute")
    module, _, attribute = path.rpartition(".")
    try:
        target = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{key}={path!r} cannot be imported: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"{key}={path!r} is a {type(target).__name__}, not a callable")
    return target


def signatures(fn: Callable[..., Any]) -> list[Callable[..., Any]]:
    """What binds ``fn``'s keyword arguments: a function itself; for a class its
    ``__init__`` and, while an ``__init__`` passes ``**kwargs`` on, its bases' (LEHIBrid's
    options include LEHI's)."""
    if not inspect.isclass(fn):
        return [fn]
    inits = []
    for klass in fn.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        inits.append(init)
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(init).parameters.values()):
            break
    return inits


def _type_hints(fn: Callable[..., Any]) -> tuple[dict[str, Any], bool, set[str]]:
    """(hints of the keyword parameters, whether any keyword is accepted, required names)."""
    named: dict[str, Any] = {}
    required: set[str] = set()
    accepts_any = False
    for depth, target in enumerate(signatures(fn)):
        try:
            hints = typing.get_type_hints(target)
        except Exception:  # unresolvable annotations (other libraries): check names only
            hints = {}
        params = [
            p
            for p in inspect.signature(target).parameters.values()
            if p.name != "self" and p.kind is not p.VAR_POSITIONAL
        ]
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
        for p in params:
            if p.kind is not p.VAR_KEYWORD:
                named.setdefault(p.name, hints.get(p.name, Any))
        if depth == 0:  # what a base requires, the subclass passes on itself
            required = {
                p.name for p in params if p.default is p.empty and p.kind is not p.VAR_KEYWORD
            }
    return named, accepts_any, required


def check_value(key: str, value: Any, hint: Any) -> None:
    if not conforms(value, hint):
        raise ConfigError(f"{key}={value!r} is not allowed: expected {describe(hint)}")
    if key in RANGES and value is not None:
        ok, allowed = RANGES[key]
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: expected {allowed}")


def check_call(
    fn: Callable[..., Any],
    options: Mapping[str, Any],
    prefix: str,
    *,
    supplied: tuple[str, ...] = (),
) -> None:
    """Check ``options`` against the keyword parameters of ``fn`` (its type hints).

    ``supplied`` names parameters the caller fills in itself (e.g. ``bundle``), which the
    config must therefore not set.
    """
    named, accepts_any, required = _type_hints(fn)
    allowed = [k for k in named if k not in supplied]
    for key, value in options.items():
        if key in supplied or (key not in named and not accepts_any):
            raise ConfigError(
                f"{prefix}.{key} is not an option of {prefix} {_name(fn)}; "
                f"allowed: {', '.join(allowed)}"
            )
        check_value(f"{prefix}.{key}", value, named.get(key, Any))
    missing = sorted(required - set(options) - set(supplied))
    if missing:
        raise ConfigError(f"{prefix}.{missing[0]} must be set (no default for {_name(fn)})")


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def check_run(config: Mapping[str, Any]) -> None:
    """The checks of the top level and the plain sections (groups are checked as built)."""
    for key in config:
        if key not in TOP_LEVEL:
            raise ConfigError(f"{key} is not a config key; allowed: {', '.join(TOP_LEVEL)}")
    check_value("seed", config.get("seed"), int)
    for section, schema in SECTIONS.items():
        values = config.get(section) or {}
        for key, value in values.items():
            if key not in schema:
                allowed = ", ".join(schema)
                raise ConfigError(f"{section}.{key} is not a config key; allowed: {allowed}")
            check_value(f"{section}.{key}", value, schema[key])
    for section in ("dataset", "model", "optimizer"):
        if not isinstance(config.get(section), Mapping) or "_target_" not in config[section]:
            raise ConfigError(f"{section} must be a config group with a _target_")


def pick_device(name: str) -> torch.device:
    """``auto`` → cuda > mps > cpu; otherwise the named device, which must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"trainer.device={name!r} is not a device: expected auto, cpu, cuda, cuda:N or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={name!r}: this machine has no CUDA device (use auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(
            f"trainer.device={name!r}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name!r}: MPS is not available here (use auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"trainer.device={name!r}: expected auto, cpu, cuda, cuda:N or mps")
    return device


def compose(overrides: Sequence[str] = ()) -> dict[str, Any]:
    """conf/config.yaml with ``overrides``, resolved, as run.py would see it (for scripts:
    benchmarks and the diagnostics study take their settings from the same YAML)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)
