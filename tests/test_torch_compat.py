"""lehi._torch_compat: each private torch call does what its caller relies on, and importing
the module loads nothing heavy (a plain eager step must not pay for torch's compiler)."""

from __future__ import annotations

import subprocess
import sys

import torch
import torch.nn.functional as F
from conftest import REPO

from lehi._torch_compat import (
    default_to_foreach,
    donated_buffers_off,
    group_tensors_by_device_and_dtype,
    saved_attribute,
)


def test_import_loads_neither_dynamo_nor_functorch_config():
    code = (
        "import sys, torch, lehi._torch_compat, lehi.curvature, lehi.optim.lehi_update\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._functorch.config') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_default_to_foreach_is_torch_optims_choice():
    # torch.optim takes the foreach path only when every tensor is on CUDA (or a device
    # like it); CPU tensors get the single-tensor loop (test_cuda.py checks the CUDA side).
    assert default_to_foreach([torch.zeros(3, requires_grad=True)]) is False


def test_group_tensors_by_device_and_dtype_splits_by_dtype():
    a, b, c = torch.zeros(2), torch.ones(3, dtype=torch.float64), torch.full((4,), 2.0)
    grads = [t + 1 for t in (a, b, c)]
    groups = group_tensors_by_device_and_dtype([[a, b, c], grads])
    by_dtype = {key[1]: value for key, value in groups.items()}
    assert set(by_dtype) == {torch.float32, torch.float64}
    (params32, grads32), _ = by_dtype[torch.float32]
    assert params32[0] is a and params32[1] is c and grads32[1] is grads[2]
    (params64, _), _ = by_dtype[torch.float64]
    assert len(params64) == 1 and params64[0] is b


def test_saved_attribute_reads_what_cross_entropy_saved():
    z = torch.randn(5, 3, requires_grad=True)
    loss = F.cross_entropy(z, torch.tensor([0, 1, 2, -7, 1]), ignore_index=-7)
    node = loss.grad_fn
    assert type(node).__name__ == "NllLossBackward0"
    index = int(saved_attribute(node, "ignore_index"))
    assert index - 2**64 == -7 or index == -7  # an unsigned 64-bit integer in some torch builds
    assert saved_attribute(node, "reduction") == 1  # mean
    assert saved_attribute(node, "weight") is None


def test_donated_buffers_off_only_inside_the_block():
    from torch._functorch import config

    before = config.donated_buffer
    with donated_buffers_off():
        assert config.donated_buffer is False
    assert config.donated_buffer == before
