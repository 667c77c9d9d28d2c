"""Datasets of the lehi suite: `build(name, **options) -> DataBundle`.

One module per dataset (digits, mnist, cifar10, protein, ptb, fineweb), each with a
`build(**options)` function; modules are imported on first use so that, e.g., building digits
does not import torchvision. Tensors are returned on the CPU; move splits with `.to(device)`.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from lehi.data.bundle import Batches, BPTTBatches, DataBundle, TensorBatches, TokenWindows
from lehi.data.files import DataFileError, DataUnavailableError

_MODULES = {
    "digits": "lehi.data.digits",
    "mnist": "lehi.data.mnist",
    "cifar10": "lehi.data.cifar10",
    "protein": "lehi.data.protein",
    "ptb": "lehi.data.ptb",
    "fineweb": "lehi.data.fineweb",
}

__all__ = [
    "Batches",
    "BPTTBatches",
    "DataBundle",
    "DataFileError",
    "DataUnavailableError",
    "TensorBatches",
    "TokenWindows",
    "build",
    "known_datasets",
    "options",
]


def known_datasets() -> list[str]:
    """Names accepted by `build`."""
    return list(_MODULES)


def _builder(name: str) -> Any:
    if name not in _MODULES:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(_MODULES)}")
    return importlib.import_module(_MODULES[name]).build


def options(name: str) -> dict[str, Any]:
    """The options of dataset `name` with their defaults."""
    return {k: p.default for k, p in inspect.signature(_builder(name)).parameters.items()}


def build(name: str, **kwargs: Any) -> DataBundle:
    """Build dataset `name` with the given options (see `options(name)`)."""
    allowed = options(name)
    for key in kwargs:
        if key not in allowed:
            raise ValueError(
                f"unknown option {key!r} for dataset {name!r}; allowed: {', '.join(allowed)}"
            )
    return _builder(name)(**kwargs)
