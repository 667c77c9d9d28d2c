"""The faster paths of the optimizers against the plain ones they replace.

- LEHI(compile=True), the torch.compile'd step, against the eager single-tensor step.
- The orders of ``optimizer.backward`` (LEHI, Sophia) against an independent computation of
  g and h from two separate graphs.
- v built from the mean cross-entropy's own gradient against v built from a fresh softmax,
  and the recognition of the losses for which that is valid.
- The inverse-CDF label sampler against the distribution it must draw from.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.optim import batches, compile_works, tiny_mlp, train

from lehi.curvature import (
    aux_grad_outputs,
    aux_grad_outputs_from_loss_gradient,
    aux_loss,
    aux_vector,
    is_mean_cross_entropy,
    sample_categorical,
)
from lehi.optim import LEHI, LEHIBrid, SophiaG
from lehi.optim.lehi_update import compiled_lehi, multi_tensor_lehi, single_tensor_lehi


@pytest.mark.parametrize(
    "kwargs",
    [
        # weight decay, bias correction, ε outside the square root, lr changed mid-run
        dict(weight_decay=0.01, hessian_every=2),
        # ε inside the square root, no bias correction, h = g⊙g folded inside the step
        dict(eps_inside_sqrt=True, bias_correction=False, estimator="squared_gradient"),
    ],
)
def test_compiled_step_equals_eager_step(kwargs):
    if not compile_works():
        pytest.skip("torch.compile cannot build kernels on this machine")
    data = batches(6)
    results = []
    for compiled in (False, True):
        model = tiny_mlp()
        opt = LEHI(model.parameters(), lr=3e-3, seed=4, foreach=False, compile=compiled, **kwargs)
        train(model, opt, data[:3])
        for group in opt.param_groups:
            group["lr"] = 1e-3  # a schedule's change must reach the compiled graph
        train(model, opt, data[3:])
        results.append((list(model.parameters()), opt))
    (eager_params, eager_opt), (compiled_params, compiled_opt) = results
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=0)
        for key in ("exp_avg", "exp_avg_curvature", "step", "curvature_step"):
            torch.testing.assert_close(
                compiled_opt.state[q][key], eager_opt.state[p][key], atol=1e-6, rtol=1e-6
            )


def test_compile_must_be_a_bool():
    with pytest.raises(ValueError, match="compile"):
        LEHI(tiny_mlp().parameters(), compile="yes")


@pytest.mark.parametrize("cls", [LEHI, SophiaG])
@pytest.mark.parametrize("order", ["reuse_loss_gradient", "auxiliary_first", "multinomial"])
def test_every_backward_order_gives_the_same_g_and_h(cls, order):
    """The ordinary backward first (v from its gradient) or the auxiliary pass first (a loss
    the optimizer does not recognise, here 2·CE/2), or multinomial draws: g and h as from
    two separate graphs."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    sampler = "multinomial" if order == "multinomial" else "inverse_cdf"
    opt = cls(model.parameters(), betas=(0.9, 0.0), seed=9, sampler=sampler)
    out = model(x)
    loss = F.cross_entropy(out, y)
    if order == "auxiliary_first":
        loss = (2 * loss) / 2
    assert is_mean_cross_entropy(loss, out, -100) == (order != "auxiliary_first")
    opt.backward(loss, out, y)
    params = list(model.parameters())
    expected_g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    aux, _ = aux_loss(
        "cross_entropy", model(x), y, torch.Generator().manual_seed(9), sampler=sampler
    )
    expected_a = torch.autograd.grad(aux, params)
    if cls is SophiaG:  # the official loop clips ĝ to norm 1 before it enters the EMA
        norm = torch.linalg.vector_norm(torch.stack([a.norm() for a in expected_a]))
        expected_a = [a * min(1.0, 1.0 / (norm.item() + 1e-6)) for a in expected_a]
    key = "exp_avg_curvature" if cls is LEHI else "hessian"
    for p, g, a in zip(params, expected_g, expected_a):
        torch.testing.assert_close(p.grad, g)
        torch.testing.assert_close(opt.state[p][key], a.square())


def test_v_from_the_loss_gradient_equals_v_from_a_fresh_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 300, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (3, 7), generator=g)
    targets[1, :3] = -100
    out = logits * 1.0
    loss = F.cross_entropy(out.reshape(-1, 300), targets.reshape(-1))
    captured = []
    out.register_hook(captured.append)
    loss.backward()
    expected, n = aux_grad_outputs("cross_entropy", out, targets, torch.Generator().manual_seed(5))
    v, m = aux_grad_outputs_from_loss_gradient(
        captured[0], targets, torch.Generator().manual_seed(5)
    )
    assert (m, n) == (18, 18)
    assert v.shape == out.shape
    torch.testing.assert_close(v, expected, atol=1e-7, rtol=0)
    assert torch.all(v[1, :3] == 0)


def test_only_the_plain_mean_cross_entropy_is_recognised():
    out = torch.randn(4, 6, requires_grad=True) * 1.0
    y = torch.randint(0, 6, (4,))
    assert is_mean_cross_entropy(F.cross_entropy(out, y), out, -100)
    assert is_mean_cross_entropy(F.cross_entropy(out, y, ignore_index=2), out, 2)
    other = torch.randn(4, 6, requires_grad=True) * 1.0
    refused = [
        (F.cross_entropy(out, y, ignore_index=2), -100),
        (F.cross_entropy(out, y, reduction="sum"), -100),
        (F.cross_entropy(out, y, label_smoothing=0.1), -100),
        (F.cross_entropy(out, y, weight=torch.ones(6)), -100),
        (F.cross_entropy(out, y) + out.square().mean(), -100),
        (F.cross_entropy(out, y) / 2, -100),
        (F.cross_entropy(other, y), -100),
        (F.cross_entropy(out * 2, y), -100),
    ]
    for loss, ignore_index in refused:
        assert not is_mean_cross_entropy(loss, out, ignore_index)


# ----------------------------------------------------------------------------- samplers
def test_inverse_cdf_sampler_draws_the_softmax_categorical():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    draws = 20000
    g = torch.Generator().manual_seed(0)
    rows = probs.repeat(draws, 1)
    sampled = sample_categorical(rows, g, "inverse_cdf").reshape(draws, len(probs))
    for r, p in enumerate(probs):
        freq = torch.bincount(sampled[:, r], minlength=4).double() / draws
        sigma = (p.double() * (1 - p.double()) / draws).sqrt()
        assert torch.all((freq - p.double()).abs() <= 5 * sigma + 1e-12), (r, freq, p)
        assert torch.all(freq[p == 0] == 0)  # a class of probability 0 is never drawn


@pytest.mark.parametrize("classes", [64, 150, 1000])
def test_two_level_inverse_cdf_across_blocks_and_zero_classes(classes):
    """Rows spanning several 64-class blocks (and a partial last block), with zero classes."""
    g = torch.Generator().manual_seed(classes)
    probs = torch.rand(3, classes, generator=g) ** 4
    probs[0, ::3] = 0.0  # zero classes scattered through every block
    probs[1, :] = 0.0
    probs[1, classes - 1] = 2.0  # all the mass in the very last class, unnormalised
    probs[2, 64:] = 0.0  # all the mass in the first block
    draws = 20000
    sampled = sample_categorical(probs.repeat(draws, 1), g, "inverse_cdf").reshape(draws, 3)
    for r, row in enumerate(probs):
        p = row.double() / row.double().sum()
        counts = torch.bincount(sampled[:, r], minlength=classes).double()
        expected = draws * p
        # 5 σ, plus 3 draws for classes expected far less than once (Poisson tails).
        assert torch.all((counts - expected).abs() <= 5 * (expected * (1 - p)).sqrt() + 3), r
        assert torch.all(counts[p == 0] == 0)


@pytest.mark.parametrize("sampler", ["multinomial", "inverse_cdf"])
def test_cross_entropy_v_has_the_softmax_hessian_as_covariance(sampler):
    """E[v] = 0 and E[v vᵀ] = diag(p) − p pᵀ, whichever sampler draws the labels."""
    logits = torch.tensor([[1.0, -0.5, 0.3, 2.0]])
    p = torch.softmax(logits, -1)[0].double()
    g = torch.Generator().manual_seed(1)
    draws = 20000
    v = aux_vector(
        "cross_entropy",
        logits.repeat(draws, 1),
        torch.zeros(draws, dtype=torch.long),
        g,
        sampler=sampler,
    ).double()
    torch.testing.assert_close(v.mean(0), torch.zeros(4, dtype=torch.float64), atol=0.02, rtol=0)
    hessian = torch.diag(p) - torch.outer(p, p)
    torch.testing.assert_close(v.T @ v / draws, hessian, atol=0.01, rtol=0)


def test_optimizer_uses_its_sampler():
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), sampler="inverse_cdf", seed=3)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y)
    aux, _ = aux_loss(
        "cross_entropy", model(x), y, torch.Generator().manual_seed(3), sampler="inverse_cdf"
    )
    for p, a in zip(model.parameters(), torch.autograd.grad(aux, list(model.parameters()))):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], a.square())


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_unknown_sampler_is_a_clear_error(cls):
    with pytest.raises(ValueError, match="sampler='gumbel' is not one of multinomial"):
        cls(tiny_mlp().parameters(), sampler="gumbel")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(curvature_warmup="linear"),
            "^curvature_warmup='linear' is not one of none, draws, max_grad, grad$",
        ),
        (dict(warmup_length=0), "warmup_length must be an integer >= 1, got 0"),
        (dict(warmup_length=2.5), "warmup_length must be an integer >= 1, got 2.5"),
        (dict(h_floor=-0.1), r"h_floor must be a finite number >= 0 \(0 = off\), got -0.1"),
        (dict(h_floor=float("inf")), "h_floor must be a finite number >= 0"),
        (dict(update_clip=0.0), r"update_clip must be > 0 or None \(off\), got 0.0"),
        (dict(update_clip=-1.0), "update_clip must be > 0 or None"),
        (dict(update_clip=float("inf")), "update_clip must be > 0 or None"),
    ],
)
def test_a_reading_option_out_of_range_is_an_error_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LEHI(tiny_mlp().parameters(), **kwargs)


def test_each_group_runs_the_step_its_options_choose():
    """compile=True: the compiled step, whatever foreach says; otherwise foreach=True the
    multi-tensor step, False the single-tensor one, and None as torch.optim chooses (on CPU
    tensors: single-tensor). A group saved before the compile option (no "compile" key) runs
    eagerly."""
    params = list(tiny_mlp().parameters())
    cases = [
        (dict(compile=True, foreach=True), compiled_lehi),
        (dict(foreach=True), multi_tensor_lehi),
        (dict(foreach=False), single_tensor_lehi),
        (dict(foreach=None), single_tensor_lehi),
    ]
    for kwargs, rule in cases:
        group = LEHI(params, **kwargs).param_groups[0]
        assert LEHI._update_rule(group, params) is rule, kwargs
    assert LEHI._update_rule({"foreach": True}, params) is multi_tensor_lehi
    assert LEHI._update_rule({"foreach": False}, params) is single_tensor_lehi


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_foreach_none_takes_the_multi_tensor_step_on_cuda():
    """As torch.optim.Adam does, foreach=None takes the foreach path for CUDA tensors."""
    params = list(tiny_mlp().cuda().parameters())
    group = LEHI(params, foreach=None).param_groups[0]
    assert LEHI._update_rule(group, params) is multi_tensor_lehi
