"""Model zoo: ``build(name, bundle, **kwargs)`` returns a plain nn.Module for a dataset.

Outputs: logits (N, C) for classification, predictions (N, num_outputs) for regression,
logits (B, T, V) for language models. ``bundle`` is read only for ``input_shape`` and
``num_outputs`` (a DataBundle, or anything with those two attributes).

    name       module     kwargs (defaults)
    mlp        mlp.py     hidden=(256, 256), activation="relu", flatten=True
    cnn        cnn.py     channels=(32, 64, 128)
    resnet18   resnet.py  width=64
    lstm       lstm.py    size="small" | "medium", hidden, num_layers, dropout, tied,
                          embed_dim=None, stateful=True, init_range=0.1
    llama      llama.py   size="gpt2_124m" | "small" | "tiny", d_model, n_layers, n_heads,
                          context_length, multiple_of=64, tied=True, norm_eps=1e-5,
                          rope_theta=10000.0
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from lehi.models import cnn, llama, lstm, mlp, resnet
from lehi.models.flops import device_peak_flops, flops_per_token, mfu, num_params

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp.build,
    "cnn": cnn.build,
    "resnet18": resnet.build,
    "lstm": lstm.build,
    "llama": llama.build,
}

__all__ = ["MODELS", "build", "device_peak_flops", "flops_per_token", "mfu", "num_params"]


def build(name: str, bundle: Any, **kwargs: Any) -> nn.Module:
    """Build model ``name`` for the data in ``bundle``; raises ValueError on a bad name,
    an unknown keyword, or a model that does not fit the dataset's input shape."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    factory = MODELS[name]
    allowed = list(inspect.signature(factory).parameters)[2:]  # after input_shape, num_outputs
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} got unknown option(s) {unknown}; allowed: {allowed}")
    return factory(tuple(bundle.input_shape), int(bundle.num_outputs), **kwargs)
