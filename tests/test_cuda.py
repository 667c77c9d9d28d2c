"""The optimizers and the trainer on a CUDA device (every test is skipped without one).

- LEHI and LEHIBrid with h = g⊙g are torch's Adam on CUDA and the same run on the CPU.
- The curvature folded on CUDA is the square of the auxiliary gradient drawn from a CUDA
  generator seeded with the optimizer's seed (an independent computation).
- From one state, the CUDA steps of LEHI, LEHIBrid and SophiaG follow the CPU steps. The
  draws of v cannot be compared across devices (each device has its own generator
  algorithm), so no curvature refresh happens on the compared steps.
- foreach=None picks the multi-tensor path on CUDA, and it agrees with the single-tensor one.
- A state_dict saved on CUDA (with its CUDA generator state) continues the run exactly.
- The tiny Llama learns under bf16 autocast; the Trainer runs on CUDA.

Run on a GPU machine with ``python -m pytest -m cuda -q tests/test_cuda.py``.
"""

from __future__ import annotations

import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.optim import batches, tiny_mlp, train
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lehi.data
import lehi.models
from lehi.config import compose
from lehi.curvature import aux_loss
from lehi.optim import LEHI, LEHIBrid, SophiaG, backward, build_optimizer
from lehi.runner import build_model
from lehi.train import Trainer
from lehi.trainer_config import TrainerConfig

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
#: The problem of these tests: an 8-32-5 tanh MLP on batches of 32.
SHAPE = dict(d_in=8, hidden=32, d_out=5)
DATA = dict(n=32, d_in=8, classes=5)
CURVATURE_KEY = {LEHI: "exp_avg_curvature", LEHIBrid: "exp_avg_curvature", SophiaG: "hessian"}


def assert_params_close(a: nn.Module, b: nn.Module, atol: float, rtol: float = 0.0) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ CUDA against the CPU
@pytest.mark.parametrize("cls", [LEHI, LEHIBrid])
def test_squared_gradient_on_cuda_is_adam_and_the_cpu_run(cls):
    data = batches(20, **DATA)
    adam_model = tiny_mlp(**SHAPE).to(CUDA)
    train(adam_model, torch.optim.Adam(adam_model.parameters(), lr=3e-3), data)
    cpu_model, cuda_model = tiny_mlp(**SHAPE).to(CPU), tiny_mlp(**SHAPE).to(CUDA)
    for model in (cpu_model, cuda_model):
        opt = cls(model.parameters(), lr=3e-3, estimator="squared_gradient", seed=0)
        train(model, opt, data)
    assert_params_close(cuda_model, adam_model, atol=1e-5)
    assert_params_close(cuda_model, cpu_model, atol=1e-5)


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_curvature_on_cuda_comes_from_the_seeded_cuda_generator(cls):
    """With β2 = 0 the state holds this step's h: (∇L_aux)² for v from Generator('cuda')."""
    model = tiny_mlp(**SHAPE).to(CUDA)
    x, y = (t.to(CUDA) for t in batches(1, **DATA)[0])
    opt = cls(model.parameters(), betas=(0.9, 0.0), seed=7)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y)
    assert opt.curvature_generator(CUDA).device.type == CUDA.type

    params = list(model.parameters())
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    aux, _ = aux_loss("cross_entropy", model(x), y, torch.Generator(device=CUDA).manual_seed(7))
    a = torch.autograd.grad(aux, params)
    if cls is SophiaG:  # the official loop clips ĝ to norm 1 before it enters the EMA
        norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in a])).item()
        a = [t * min(1.0, 1.0 / (norm + 1e-6)) for t in a]
    for p, g_p, a_p in zip(params, g, a, strict=True):
        expected = torch.maximum(a_p.square(), g_p.square()) if cls is LEHIBrid else a_p.square()
        torch.testing.assert_close(
            opt.state[p][CURVATURE_KEY[cls]], expected, rtol=1e-5, atol=1e-12
        )
        torch.testing.assert_close(p.grad, g_p)


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_cuda_steps_follow_the_cpu_steps_from_one_state(cls):
    """One sampled step on CUDA, its state copied to the CPU, then nine more on both."""
    data = batches(10, **DATA)
    kwargs = dict(lr=1e-3, hessian_every=10, seed=3)  # steps 2-10 refresh nothing
    cuda_model = tiny_mlp(**SHAPE).to(CUDA)
    cuda_opt = cls(cuda_model.parameters(), **kwargs)
    train(cuda_model, cuda_opt, data[:1])
    cpu_model = tiny_mlp(**SHAPE)
    cpu_model.load_state_dict(cuda_model.state_dict())
    cpu_opt = cls(cpu_model.parameters(), **kwargs)
    # A deep copy, so the two runs can never share a state tensor (not even on one device).
    cpu_opt.load_state_dict(copy.deepcopy(cuda_opt.state_dict()))
    for p in cpu_model.parameters():
        assert cpu_opt.state[p][CURVATURE_KEY[cls]].device.type == "cpu"

    cuda_losses = train(cuda_model, cuda_opt, data[1:])
    cpu_losses = train(cpu_model, cpu_opt, data[1:])
    assert cuda_opt.curvature_passes == cpu_opt.curvature_passes == 1
    assert cuda_losses == pytest.approx(cpu_losses, rel=1e-5)
    assert_params_close(cuda_model, cpu_model, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the multi-tensor path
def foreach_ops_in_step(opt: torch.optim.Optimizer) -> set[str]:
    """The aten::_foreach_* ops one ``opt.step()`` dispatches (the multi-tensor path's)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step()
    return {e.key for e in prof.key_averages() if e.key.startswith("aten::_foreach_")}


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_foreach_is_the_cuda_default_and_agrees_with_single_tensor(cls):
    data = batches(20, **DATA)
    runs = {}
    for foreach in (None, False):
        model = tiny_mlp(**SHAPE).to(CUDA)
        opt = cls(model.parameters(), lr=1e-3, hessian_every=1, seed=5, foreach=foreach)
        train(model, opt, data[:-1])
        x, y = (t.to(CUDA) for t in data[-1])
        opt.zero_grad(set_to_none=True)
        out = model(x)
        backward(opt, F.cross_entropy(out, y), out, y)
        runs[foreach] = (model, foreach_ops_in_step(opt))
    (default_model, default_ops), (single_model, single_ops) = runs[None], runs[False]
    assert default_ops, "foreach=None did not take the multi-tensor path on CUDA"
    assert not single_ops, f"foreach=False dispatched {sorted(single_ops)}"
    assert_params_close(default_model, single_model, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------- state round trip
@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_state_dict_round_trip_on_cuda_continues_identically(cls):
    data = batches(7, **DATA)
    model = tiny_mlp(**SHAPE).to(CUDA)
    opt = cls(model.parameters(), lr=1e-3, hessian_every=2, seed=11)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    saved_generator = opt.state_dict()["curvature"]["generator"]
    saved_passes = opt.curvature_passes
    assert saved_generator[0] == CUDA.type
    train(model, opt, data[3:])

    buffer.seek(0)
    state = torch.load(buffer, map_location=CUDA, weights_only=True)
    resumed_model = tiny_mlp(1, **SHAPE).to(CUDA)
    resumed_model.load_state_dict(state["model"])
    resumed = cls(resumed_model.parameters(), lr=1e-3, hessian_every=2, seed=999)
    resumed.load_state_dict(state["optimizer"])
    assert resumed.seed == 11 and resumed.curvature_passes == saved_passes
    generator = resumed.curvature_generator(CUDA)
    assert generator.device.type == CUDA.type
    assert torch.equal(generator.get_state(), saved_generator[1].cpu())
    train(resumed_model, resumed, data[3:])
    assert resumed.curvature_passes == opt.curvature_passes
    assert_params_close(resumed_model, model, atol=1e-7)


# ----------------------------------------------------------------- bf16 and the trainer
def test_bf16_tiny_llama_with_lehi_learns_a_fixed_batch():
    vocab = 64
    torch.manual_seed(0)
    shape = SimpleNamespace(input_shape=(), num_outputs=vocab)
    model = lehi.models.build("llama", shape, size="tiny").to(CUDA)
    # Learnable in 30 steps: every token has one fixed successor (a random cycle).
    g = torch.Generator().manual_seed(0)
    successor = torch.randperm(vocab, generator=g)
    rows = [torch.randint(0, vocab, (4,), generator=g)]
    for _ in range(64):
        rows.append(successor[rows[-1]])
    tokens = torch.stack(rows, dim=1).to(CUDA)
    x, y = tokens[:, :-1], tokens[:, 1:]
    # The first steps rest on a one-draw v̂, where LEHI's step can exceed Adam's by up to
    # sqrt(N); ε = 1e-5 bounds them and stays below sqrt(v̂) for ~95% of these weights, so
    # the curvature still sets the step size.
    opt = LEHI(model.parameters(), lr=3e-4, eps=1e-5, seed=0)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=CUDA.type, dtype=torch.bfloat16):
            logits = model(x)
        assert logits.dtype == torch.bfloat16
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), y.reshape(-1))
        backward(opt, loss, logits, y)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[0] == pytest.approx(math.log(vocab), rel=0.05)
    assert losses[-1] < 0.8 * losses[0], losses
    assert opt.curvature_passes == 30


def test_trainer_runs_on_cuda_with_bf16():
    cfg = compose(["optimizer=lehi", "trainer.device=cuda"])
    bundle = lehi.data.build(cfg["dataset"]).to(CUDA)
    torch.manual_seed(0)
    model = build_model(cfg["model"], bundle).to(CUDA)
    opt = build_optimizer(cfg["optimizer"], model, loss=bundle.loss, ignore_index=-100, seed=0)
    config = TrainerConfig.from_config(
        cfg["trainer"],
        epochs=None,
        max_steps=20,
        eval_every=20,
        log_every=10,
        checkpoint=False,
        precision="bf16",
    )
    trainer = Trainer(model, opt, bundle, config, device=CUDA, seed=0, record=None)
    summary = trainer.fit()
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["curvature_passes"] == 20
    assert math.isfinite(summary["final"]["train_loss"])
    assert math.isfinite(summary["final"]["val_loss"])
    val = [row["loss"] for row in trainer.rows if row["split"] == "val"]
    assert val[-1] < val[0], val
    assert all(p.device.type == CUDA.type for p in model.parameters())
