"""The optimizers against independent computations: torch's Adam, the exact Gauss–Newton
diagonal, and a transcription of the published SophiaG update."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from helpers.optim import batches, tiny_mlp, train
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, jacrev, vmap

from lehi.curvature import aux_loss, aux_vector, per_example_curvature
from lehi.optim import LEHI, LEHIBrid, SophiaG, backward, build_optimizer


def build(name: str, model: nn.Module, *, seed: int = 0, **overrides) -> torch.optim.Optimizer:
    """Optimizer ``name`` as its config composes (conf/optimizer), with ``overrides``."""
    config = OmegaConf.merge(compose_config([f"optimizer={name}"]).optimizer, overrides)
    options = OmegaConf.to_container(config, resolve=True)
    return build_optimizer(options, model, loss="cross_entropy", ignore_index=-100, seed=seed)


# ----------------------------------------------------------------------------- Adam parity
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_squared_gradient_lehi_is_adamw(foreach, weight_decay):
    data = batches(50)
    ref_model, model = tiny_mlp(), tiny_mlp()
    ref_cls = torch.optim.AdamW if weight_decay else torch.optim.Adam
    ref = ref_cls(ref_model.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=foreach)
    opt = LEHI(
        model.parameters(),
        lr=3e-3,
        weight_decay=weight_decay,
        estimator="squared_gradient",
        foreach=foreach,
    )
    train(ref_model, ref, data)
    train(model, opt, data)
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=0)


# ------------------------------------------------------------------ Gauss–Newton diagonal
def exact_gauss_newton_diagonal(model: nn.Module, x, loss: str) -> torch.Tensor:
    """Σ_n diag(J_nᵀ H_z J_n), flattened over all parameters, from per-example Jacobians."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def output(p, xn):
        return functional_call(model, p, (xn.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(output), in_dims=(None, 0))(params, x)
    z = model(x).detach()
    q = z.shape[-1]
    if loss == "cross_entropy":
        p = torch.softmax(z, -1)
        hz = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    else:
        hz = torch.eye(q).expand(len(x), q, q) * (2.0 / q)
    diags = []
    for name in params:
        j = jac[name].reshape(len(x), q, -1)
        diags.append(torch.einsum("nqa,nqr,nra->a", j, hz, j))
    return torch.cat(diags)


def mean_h(model, x, y, loss, draws, scale_by_batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters())
    total = None
    for _ in range(draws):
        out = model(x)
        aux, n = aux_loss(loss, out, y, g)
        h = torch.cat([a.reshape(-1) for a in torch.autograd.grad(aux, params)]).pow(2)
        h = h * n if scale_by_batch else h
        total = h if total is None else total + h
    return total / draws


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("scale_by_batch", [False, True])
def test_monte_carlo_h_matches_gauss_newton_diagonal(loss, scale_by_batch):
    model = tiny_mlp(d_in=5, hidden=8, d_out=3)
    n = 12
    x = torch.randn(n, 5, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 3, (n,)) if loss == "cross_entropy" else torch.randn(n, 3)
    # E[h] = GN/N² (literal replacement of g⊙g); E[N·h] = GN/N (per-example diagonal).
    expected = exact_gauss_newton_diagonal(model, x, loss) / (n if scale_by_batch else n * n)
    errors = {}
    for draws in (100, 1600):
        estimate = mean_h(model, x, y, loss, draws, scale_by_batch)
        errors[draws] = ((estimate - expected).norm() / expected.norm()).item()
    # Monte Carlo error shrinks like 1/sqrt(draws): 16× the draws → about 1/4 the error.
    assert errors[1600] < 0.5 * errors[100]
    assert errors[1600] < 0.12


def test_per_example_mode_equals_sum_of_per_example_squares():
    model = tiny_mlp(d_in=5, hidden=8, d_out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    h = per_example_curvature(model, x, y, "cross_entropy", torch.Generator().manual_seed(7))
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(7))
    expected = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for i in range(len(x)):
        grads = torch.autograd.grad((model(x[i : i + 1]) * v[i : i + 1]).sum(), model.parameters())
        for (name, _), gi in zip(model.named_parameters(), grads):
            expected[name] += gi.pow(2) / len(x) ** 2
    for name in expected:
        torch.testing.assert_close(h[name], expected[name], rtol=1e-5, atol=1e-9)


def test_cross_entropy_v_ignores_masked_targets_and_handles_sequences():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :2] = -100
    v = aux_vector("cross_entropy", logits, targets, torch.Generator().manual_seed(0))
    assert v.shape == logits.shape
    assert torch.all(v[0, :2] == 0)
    # Each kept row is softmax minus a one-hot: it sums to zero with exactly one negative entry.
    kept = v[targets != -100]
    torch.testing.assert_close(kept.sum(-1), torch.zeros(len(kept)), atol=1e-6, rtol=0)
    assert torch.all((kept < 0).sum(-1) == 1)
    _, n = aux_loss("cross_entropy", logits, targets, torch.Generator().manual_seed(0))
    assert n == 8


def test_streamed_fold_equals_squared_auxiliary_gradient():
    """With β2 = 0 the curvature state after one pass is exactly h = (∇L_aux)²."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = LEHI(model.parameters(), lr=1e-3, betas=(0.9, 0.0), seed=11)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y)
    aux, _ = aux_loss("cross_entropy", model(x), y, torch.Generator().manual_seed(11))
    expected = torch.autograd.grad(aux, list(model.parameters()))
    for p, h in zip(model.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], h.pow(2))
        assert opt.state[p]["curvature_step"] == 1
    # The ordinary gradient is untouched by the auxiliary pass.
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    for p, p_ref in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad)


@pytest.mark.parametrize("hybrid", ["max", "sum", "mix"])
def test_lehibrid_combines_squared_gradient_and_h(hybrid):
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = LEHIBrid(model.parameters(), betas=(0.9, 0.0), hybrid=hybrid, mix_weight=0.25, seed=5)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y)
    aux, _ = aux_loss("cross_entropy", model(x), y, torch.Generator().manual_seed(5))
    for p, a in zip(model.parameters(), torch.autograd.grad(aux, list(model.parameters()))):
        g2, h = p.grad.pow(2), a.pow(2)
        expected = {"max": torch.maximum(g2, h), "sum": g2 + h, "mix": 0.75 * g2 + 0.25 * h}
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], expected[hybrid])


def test_hessian_every_refreshes_on_steps_one_plus_multiples_of_k():
    model = tiny_mlp()
    opt = LEHI(model.parameters(), hessian_every=3)
    refreshed = []
    for x, y in batches(7):
        refreshed.append(opt.wants_curvature())
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out, y)
        opt.step()
    assert refreshed == [True, False, False, True, False, False, True]
    assert opt.curvature_passes == 3


def test_plain_backward_on_a_refresh_step_is_a_clear_error():
    model = tiny_mlp()
    opt = LEHI(model.parameters())
    x, y = batches(1)[0]
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="optimizer.backward"):
        opt.step()


# ---------------------------------------------------------------------------- SophiaG
def test_sophia_matches_published_update():
    """A direct transcription of the official SophiaG (step + update_hessian + loop)."""
    data = batches(25, n=10)
    model, ref_model = tiny_mlp(), tiny_mlp()
    lr, betas, rho, wd, k = 3e-3, (0.965, 0.99), 0.04, 0.1, 10
    opt = SophiaG(
        model.parameters(),
        lr=lr,
        betas=betas,
        rho=rho,
        weight_decay=wd,
        sampler="multinomial",  # the official code's draws, draw for draw
        seed=3,
    )
    train(model, opt, data)

    sampler = torch.Generator().manual_seed(3)
    params = list(ref_model.parameters())
    exp_avg = [torch.zeros_like(p) for p in params]
    hessian = [torch.zeros_like(p) for p in params]
    for t, (x, y) in enumerate(data):
        logits = ref_model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
        if t % k == 0:
            y_sample = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=sampler)
            g_hat = torch.autograd.grad(F.cross_entropy(logits, y_sample.squeeze(1)), params)
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in g_hat]))
            coef = min(1.0, 1.0 / (norm.item() + 1e-6))
            for h, g in zip(hessian, g_hat):
                h.mul_(betas[1]).addcmul_(g * coef, g * coef, value=1 - betas[1])
        with torch.no_grad():
            for p, g, m, h in zip(params, grads, exp_avg, hessian):
                p.mul_(1 - lr * wd)
                m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                ratio = (m.abs() / (rho * len(x) * h + 1e-15)).clamp(None, 1)
                p.addcmul_(m.sign(), ratio, value=-lr)
    for p, p_ref in zip(model.parameters(), params):
        torch.testing.assert_close(p, p_ref, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------- paths and persistence
OPTIMIZER_KWARGS = {
    "lehi": dict(lr=3e-3, weight_decay=0.01),
    "lehibrid": dict(lr=3e-3, hybrid="max"),
    "sophia": dict(lr=3e-3, hessian_every=3),
}


@pytest.mark.parametrize("name", list(OPTIMIZER_KWARGS))
def test_foreach_and_single_tensor_paths_agree(name):
    data = batches(15)
    results = []
    for foreach in (False, True):
        model = tiny_mlp()
        opt = build(name, model, seed=1, foreach=foreach, **OPTIMIZER_KWARGS[name])
        train(model, opt, data)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(OPTIMIZER_KWARGS))
def test_state_dict_round_trip_continues_identically(name):
    data = batches(20)
    model = tiny_mlp()
    opt = build(name, model, seed=2, **OPTIMIZER_KWARGS[name])
    train(model, opt, data[:10])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    uninterrupted = train(model, opt, data[10:])

    resumed_model = tiny_mlp(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = build(name, resumed_model, seed=12345, **OPTIMIZER_KWARGS[name])
    resumed_opt.load_state_dict(saved_opt)
    resumed = train(resumed_model, resumed_opt, data[10:])
    assert resumed == uninterrupted
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(betas=(1.0, 0.9)), "betas"),
        (dict(betas=(0.9, -0.1)), "betas"),
        (dict(eps=-1e-8), "eps"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(hessian_every=0), "hessian_every"),
        (dict(loss="hinge"), "hinge"),
        (dict(estimator="exact_hessian"), "estimator"),
    ],
)
@pytest.mark.parametrize("cls", [LEHI, LEHIBrid])
def test_bad_hyperparameters_name_the_argument(cls, kwargs, named):
    with pytest.raises(ValueError, match=named):
        cls(tiny_mlp().parameters(), **kwargs)


def test_bad_choices_in_sophia_and_registry():
    with pytest.raises(ValueError, match="hybrid"):
        LEHIBrid(tiny_mlp().parameters(), hybrid="min")
    with pytest.raises(ValueError, match="rho"):
        SophiaG(tiny_mlp().parameters(), rho=0.0)
    with pytest.raises(ValueError, match="cross_entropy, mse"):
        SophiaG(tiny_mlp().parameters(), loss="hinge")
    with pytest.raises(ValueError, match="optimizer._target_"):
        build_optimizer(
            {"_target_": "torch.optim.NoSuch"}, tiny_mlp(), loss="mse", ignore_index=-100, seed=0
        )
    with pytest.raises(ValueError, match="optimizer.lr"):
        build("adam", tiny_mlp(), lr=0.0)


# ------------------------------------------------------------------------ real training
@pytest.mark.parametrize(
    ("name", "lr"),
    [("lehi", 1e-3), ("lehibrid", 1e-3), ("sophia", 1e-3), ("adam", 1e-3), ("adamw", 1e-3)],
)
def test_each_optimizer_trains_an_mlp_on_digits(name, lr):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = build(name, model, lr=lr)
    g = torch.Generator().manual_seed(0)
    first = F.cross_entropy(model(x), y).item()
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        out = model(x[idx])
        backward(opt, F.cross_entropy(out, y[idx]), out, y[idx])
        opt.step()
    last = F.cross_entropy(model(x), y).item()
    assert last < 0.5 * first
