"""The optimizers against independent computations: torch's Adam, the exact Gauss–Newton
diagonal, and a transcription of the published SophiaG update."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_config
from helpers.optim import batches, tiny_mlp, train
from omegaconf import OmegaConf
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from lehi.curvature import aux_loss, aux_vector, per_example_curvature
from lehi.optim import (
    LEHI,
    CurvatureOptimizer,
    LEHIBrid,
    SophiaG,
    backward,
    build_optimizer,
    param_groups,
)


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


# ------------------------------------------------- build_optimizer: groups, defaults, messages
class Decayable(nn.Module):
    """One tensor of each kind param_groups sorts: an embedding, a norm's gain and bias, a
    linear layer's weight and bias, and a bias-free head. Only the two matrices that are not
    an embedding (proj.weight, head.weight) take weight decay under nanoGPT's convention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.proj = nn.Linear(3, 3)
        self.head = nn.Linear(3, 5, bias=False)

    def forward(self, tokens):
        return self.head(self.proj(self.norm(self.embed(tokens))))


DECAYED = ("proj.weight", "head.weight")


def built_and_stepped(options, model):
    """build_optimizer(options) over ``model``, then one step on a fixed batch: the optimizer,
    and each parameter (by name) before the step, its gradient and its value after."""
    opt = build_optimizer(options, model, loss="cross_entropy", ignore_index=-100, seed=0)
    tokens = torch.tensor([[0, 1, 2], [3, 4, 0]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    F.cross_entropy(model(tokens).reshape(-1, 5), tokens.reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return opt, before, grads, dict(model.named_parameters())


@pytest.mark.parametrize(
    ("options", "decay", "decoupled", "groups"),
    [
        # no weight_decay key: AdamW's own default (torch documents 1e-2), matrices only
        ({"_target_": "torch.optim.AdamW", "lr": 0.1}, 0.01, True, 2),
        # the key as a config sets it, betas as YAML's list
        (
            {"_target_": "torch.optim.Adam", "lr": 0.1, "betas": [0.9, 0.999], "weight_decay": 0.1},
            0.1,
            False,
            2,
        ),
        # exclude_from_decay: false decays every tensor, one group
        (
            {
                "_target_": "torch.optim.Adam",
                "name": "adam",
                "label": "all",
                "lr": 0.1,
                "weight_decay": 0.1,
                "exclude_from_decay": False,
            },
            0.1,
            False,
            1,
        ),
        # no decay: nothing to exclude, one group
        ({"_target_": "torch.optim.Adam", "lr": 0.1, "weight_decay": 0.0}, 0.0, False, 1),
    ],
    ids=["adamw-default", "adam-l2", "adam-decay-all", "adam-no-decay"],
)
def test_build_optimizer_first_step_decays_exactly_the_chosen_tensors(
    options, decay, decoupled, groups
):
    """The first Adam step by hand: m̂ = g, v̂ = g², so the update is lr·g/(|g| + ε); AdamW
    first shrinks p by (1 − lr·wd), Adam adds wd·p to g. wd is the configured (or the class's
    default) decay for the tensors that take it and 0 for biases, norms and embeddings."""
    model = Decayable()
    opt, before, grads, after = built_and_stepped(options, model)
    assert len(opt.param_groups) == groups
    lr, eps = 0.1, 1e-8
    decay_all = options.get("exclude_from_decay", True) is False
    for name, p0 in before.items():
        wd = decay if decay_all or name in DECAYED else 0.0
        g = grads[name]
        if decoupled:
            expected = p0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        else:
            g = g + wd * p0
            expected = p0 - lr * g / (g.abs() + eps)
        torch.testing.assert_close(after[name].detach(), expected, msg=name)


def test_build_optimizer_hands_torch_the_betas_as_a_pair():
    """YAML gives betas as a list; the optimizer receives the tuple its signature declares
    (Adam converts a list itself, NAdam keeps what it is given)."""
    options = {"_target_": "torch.optim.NAdam", "betas": [0.8, 0.9]}
    opt = build_optimizer(options, Decayable(), loss="mse", ignore_index=-100, seed=0)
    assert opt.defaults["betas"] == (0.8, 0.9)
    assert all(group["betas"] == (0.8, 0.9) for group in opt.param_groups)


def test_build_optimizer_takes_a_class_without_weight_decay():
    """Rprop has no weight_decay: one group, and its first step moves each coordinate by the
    initial step size lr against the gradient's sign."""
    model = Decayable()
    opt, before, grads, after = built_and_stepped(
        {"_target_": "torch.optim.Rprop", "lr": 0.05}, model
    )
    assert len(opt.param_groups) == 1
    for name, p0 in before.items():
        torch.testing.assert_close(after[name].detach(), p0 - 0.05 * grads[name].sign(), msg=name)


def test_param_groups_splits_matrices_from_the_rest_in_model_order():
    model = Decayable()
    p = dict(model.named_parameters())
    exempt = [p["embed.weight"], p["norm.weight"], p["norm.bias"], p["proj.bias"]]
    for groups in (param_groups(model, 0.1), param_groups(model, 0.1, exclude_from_decay=True)):
        assert [list(map(id, g["params"])) for g in groups] == [
            [id(p["proj.weight"]), id(p["head.weight"])],
            list(map(id, exempt)),
        ]
        assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    everything = list(map(id, model.parameters()))
    for groups in (param_groups(model, 0.0), param_groups(model, 0.1, exclude_from_decay=False)):
        assert [list(map(id, g["params"])) for g in groups] == [everything]
        assert "weight_decay" not in groups[0]


def test_build_optimizer_passes_the_runs_loss_ignore_index_and_seed():
    """A curvature optimizer gets loss, ignore_index and seed from the builder: h from a
    seed-12 draw of v with the rows of target -1 left out (as in the direct-construction test
    above)."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    y[[1, 5, 6, 11]] = -1
    options = {"_target_": "lehi.optim.LEHI", "betas": [0.9, 0.0]}
    opt = build_optimizer(options, model, loss="cross_entropy", ignore_index=-1, seed=12)
    out = model(x)
    backward(opt, F.cross_entropy(out, y, ignore_index=-1), out, y)
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(12), ignore_index=-1)
    params = list(model.parameters())
    for p, a in zip(params, torch.autograd.grad((v * model(x)).sum() / 12, params)):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], a.square())
    opt = build_optimizer(options, model, loss="mse", ignore_index=3, seed=11)
    assert (opt.loss_name, opt.ignore_index, opt.seed) == ("mse", 3, 11)


def test_backward_passes_model_and_inputs_to_the_per_example_estimator():
    """backward(opt, ..., model=, inputs=) reaches per_example: h = Σᵢ (Jᵢᵀvᵢ)² / N²."""
    model = tiny_mlp(d_in=5, hidden=8, d_out=3)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), estimator="per_example", seed=7)
    out = model(x)
    backward(opt, F.cross_entropy(out, y), out, y, model=model, inputs=x)
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(7))
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for i in range(len(x)):
        grads = torch.autograd.grad((model(x[i : i + 1]) * v[i : i + 1]).sum(), model.parameters())
        for total, gi in zip(expected, grads):
            total += gi.pow(2) / len(x) ** 2
    for p, h in zip(model.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], h, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": 1e-3}, r"^optimizer\._target_=None must name a callable as module\.attribute$"),
        (
            {"_target_": "torch.nn.Linear"},
            r"^optimizer\._target_='torch\.nn\.Linear' is not a torch\.optim\.Optimizer$",
        ),
        ({"_target_": "math.sqrt"}, r"^optimizer\._target_='math\.sqrt' is not a torch\.optim"),
        (
            {"_target_": "torch.optim.Adam", "exclude_from_decay": "yes"},
            r"^optimizer\.exclude_from_decay must be true or false, got 'yes'$",
        ),
        (
            {"_target_": "torch.optim.Adam", "momentum": 0.9},
            r"^optimizer\.momentum is not an option of optimizer torch\.optim\.adam\.Adam; "
            r"allowed: lr, betas, eps, weight_decay",
        ),
        (
            {"_target_": "lehi.optim.SophiaG", "rho": -1.0},
            r"^optimizer\.rho must be > 0, got -1\.0$",
        ),
    ],
    ids=["no-target", "not-an-optimizer", "not-a-class", "exclude", "unknown-key", "class-check"],
)
def test_build_optimizer_refusals_name_the_config_key(options, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(options, Decayable(), loss="cross_entropy", ignore_index=-100, seed=0)


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


# ------------------------------------------------- which backward comes first, and its cost
class SoftmaxCount(TorchDispatchMode):
    """Counts the softmax kernels run while active (v's class probabilities)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_softmax", "softmax"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def plain_ce(out, y):
    return F.cross_entropy(out, y)


def rescaled_ce(out, y):  # the same value, but not the graph the optimizer recognises
    return 2 * F.cross_entropy(out, y) / 2


def observe_refresh(opt, model, x, y, loss_fn, refresh):
    """Refresh number ``refresh`` (1 or 2; hessian_every=1) through ``opt.backward``: whether
    the output bias received the ordinary gradient first, how many gradients it received and
    how many softmaxes the call computed."""
    for _ in range(refresh - 1):
        opt.zero_grad()
        out = model(x)
        opt.backward(loss_fn(out, y), out, y)
        opt.step()
    opt.zero_grad()
    bias = model[2].bias
    (expected_g,) = torch.autograd.grad(loss_fn(model(x), y), [bias])
    seen = []
    handle = bias.register_hook(lambda grad: seen.append(grad.detach().clone()))
    out = model(x)
    loss = loss_fn(out, y)
    try:
        with SoftmaxCount() as softmaxes:
            opt.backward(loss, out, y)
    finally:
        handle.remove()
    torch.testing.assert_close(bias.grad, expected_g)
    ordinary_first = torch.allclose(seen[0], expected_g, rtol=1e-5, atol=1e-7)
    return ordinary_first, len(seen), softmaxes.count


SINGLE = dict(betas=(0.9, 0.999), warn_update_above=None)
DRAWS = dict(curvature_warmup="draws", warmup_length=2, warn_update_above=None)


@pytest.mark.parametrize(
    ("cls", "kwargs", "dtype", "loss_fn", "refresh", "expected"),
    [
        # float32 mean cross-entropy, inverse-CDF draws, one draw: v from the loss's gradient
        (LEHI, SINGLE, torch.float32, plain_ce, 1, (True, 2, 0)),
        (LEHI, SINGLE, torch.float32, plain_ce, 2, (True, 2, 0)),
        (SophiaG, dict(hessian_every=1), torch.float32, plain_ce, 1, (True, 2, 0)),
        # several first draws: a fresh softmax each, ordinary backward last; later refreshes
        # take the fast path again
        (LEHI, DRAWS, torch.float32, plain_ce, 1, (False, 3, 2)),
        (LEHI, DRAWS, torch.float32, plain_ce, 2, (True, 2, 0)),
        # any other case: the auxiliary pass first, from a softmax of its own
        (LEHI, SINGLE, torch.float64, plain_ce, 1, (False, 2, 1)),
        (LEHI, SINGLE, torch.float32, rescaled_ce, 1, (False, 2, 1)),
        (
            LEHI,
            dict(sampler="multinomial", warn_update_above=None),
            torch.float32,
            plain_ce,
            1,
            (False, 2, 1),
        ),
        (SophiaG, dict(sampler="multinomial"), torch.float32, plain_ce, 1, (False, 2, 1)),
    ],
)
def test_the_loss_gradient_is_reused_exactly_where_documented(
    cls, kwargs, dtype, loss_fn, refresh, expected
):
    """The module's promise: for float32 mean cross-entropy with inverse-CDF draws the
    ordinary backward runs first and v is built from its gradient at the outputs, so the
    optimizer computes no softmax of its own; otherwise the auxiliary pass comes first."""
    model = tiny_mlp(dtype=dtype)
    x, y = batches(1)[0]
    opt = cls(model.parameters(), lr=1e-3, seed=4, **kwargs)
    assert observe_refresh(opt, model, x.to(dtype), y, loss_fn, refresh) == expected


class SquaresPerParameter(CurvatureOptimizer):
    """The smallest curvature optimizer, on the base class's defaults: h = a⊙a per
    parameter, and a log of each ``_fold`` call (for each parameter: was p.grad still None)."""

    def __init__(self, params, seed):
        super().__init__(
            params,
            dict(hessian_every=1),
            loss="cross_entropy",
            ignore_index=-100,
            seed=seed,
            estimator="sampled",
            estimators=("sampled",),
        )
        self.calls = []

    def _init_state(self, p, state):
        state["step"] = torch.tensor(0.0)

    def _fold(self, params, groups, aux_grads, n):
        self.calls.append([p.grad is None for p in params])
        for p, a in zip(params, aux_grads):
            self.state[p]["h"] = a.square()


@pytest.mark.parametrize(("loss_fn", "ordinary_first"), [(plain_ce, True), (rescaled_ce, False)])
def test_the_base_folds_one_parameter_at_a_time_by_default(loss_fn, ordinary_first):
    """A subclass that overrides neither _fold_needs_every_grad nor _fold_reads_gradient
    gets one _fold call per parameter, before the ordinary backward unless v reuses its
    gradient; h is the square of the auxiliary gradient."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = SquaresPerParameter(model.parameters(), seed=13)
    out = model(x)
    opt.backward(loss_fn(out, y), out, y)
    params = list(model.parameters())
    assert opt.calls == [[not ordinary_first]] * len(params)
    aux, _ = aux_loss("cross_entropy", model(x), y, torch.Generator().manual_seed(13))
    for p, a in zip(params, torch.autograd.grad(aux, params)):
        torch.testing.assert_close(opt.state[p]["h"], a.square())


def halving_mean(calls):
    """A stand-in for the data-parallel all-reduce: the mean with a second rank whose
    auxiliary gradients are zero (it halves them); logs how many tensors each call got."""

    def reduce_mean(tensors):
        calls.append(len(tensors))
        for t in tensors:
            t.mul_(0.5)

    return reduce_mean


@pytest.mark.parametrize("loss_fn", [plain_ce, rescaled_ce])
def test_data_parallel_rank_uses_its_slice_of_the_global_draw(loss_fn):
    """Rank 1 of 2 holds rows 8–15 of a 16-row global batch: its v is those rows of the
    one-process draw for the whole batch, and h the square of its reduced a."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    calls = []
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), seed=7, warn_update_above=None)
    opt.configure_data_parallel(halving_mean(calls), rank=1, world_size=2)
    out = model(x[8:])
    opt.backward(loss_fn(out, y[8:]), out, y[8:])
    params = list(model.parameters())
    assert calls == [len(params) + 1]  # and the mark of which parameters a reached
    assert opt.num_loss_terms == 8
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(7))[8:]
    expected = torch.autograd.grad((v * model(x[8:])).sum() / 8, params)
    for p, a in zip(params, expected):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], (a / 2).square())
    with pytest.raises(RuntimeError, match="second time"):
        out.sum().backward()  # the second of the two passes freed the graph


def test_data_parallel_micro_batches_sum_their_slices_then_reduce_once():
    """Two micro-batches of 8 global rows each, rank 1 holding rows 4–7 of each: a is the sum
    of the micro-batches' a/2 (each drawn as its global micro-batch's slice), reduced once
    after the last; N is the rank's 8 terms."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    micro = [(x[:8], y[:8]), (x[8:], y[8:])]
    calls = []
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), seed=7, warn_update_above=None)
    opt.configure_data_parallel(halving_mean(calls), rank=1, world_size=2)
    for i, (xb, yb) in enumerate(micro):
        out = model(xb[4:])
        opt.backward(F.cross_entropy(out, yb[4:]) / 2, out, yb[4:], micro_batch=(i, 2))
        with pytest.raises(RuntimeError, match="second time"):
            out.sum().backward()  # each micro-batch's graph is freed by its own call
    params = list(model.parameters())
    assert calls == [len(params) + 1]
    assert opt.num_loss_terms == 8
    g = torch.Generator().manual_seed(7)
    expected = [torch.zeros_like(p) for p in params]
    for xb, yb in micro:
        v = aux_vector("cross_entropy", model(xb), yb, g)[4:]
        grads = torch.autograd.grad((v * model(xb[4:])).sum() / 4 / 2, params)
        expected = [e + a for e, a in zip(expected, grads)]
    for p, a in zip(params, expected):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], (a / 2).square())


@pytest.mark.parametrize("cls", [SophiaG, LEHIBrid])
def test_the_auxiliary_pass_after_the_ordinary_one_frees_the_graph(cls):
    """SophiaG (every a at once, v from the loss gradient) and LEHIBrid's warm-up draws
    (ordinary backward first, several draws): opt.backward leaves no graph behind."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    kwargs = dict(curvature_warmup="draws", warmup_length=2) if cls is LEHIBrid else {}
    opt = cls(model.parameters(), seed=1, **kwargs)
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.backward(loss, out, y)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()


def test_several_first_draws_fold_the_mean_of_their_squares():
    """curvature_warmup="draws": the first refresh's h is the mean of the draws' a⊙a (two
    draws in a row from the seed), scaled by N; a parameter off the outputs' path (a
    penalty) gets no h from the draws and g⊙g in the step."""
    model = tiny_mlp()
    extra = nn.Parameter(torch.ones(3))
    x, y = batches(1)[0]
    opt = LEHI(
        [*model.parameters(), extra],
        betas=(0.9, 0.0),
        scale_by_batch=True,
        curvature_warmup="draws",
        warmup_length=2,
        seed=6,
        warn_update_above=None,
    )
    out = model(x)
    opt.backward(F.cross_entropy(out, y) + extra.square().sum(), out, y)
    assert opt.num_loss_terms == 16
    params = list(model.parameters())
    g = torch.Generator().manual_seed(6)
    squares = [torch.zeros_like(p) for p in params]
    for _ in range(2):
        out = model(x)
        v = aux_vector("cross_entropy", out, y, g)
        grads = torch.autograd.grad((v * out).sum() / 16, params)
        squares = [s + a.square() for s, a in zip(squares, grads)]
    for p, s in zip(params, squares):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], 16 * s / 2)
    opt.step()
    # g = 2·extra = 2 in every coordinate; v = N·g⊙g with β2 = 0.
    torch.testing.assert_close(opt.state[extra]["exp_avg_curvature"], torch.full((3,), 64.0))


def test_per_example_refresh_of_one_example_has_one_loss_term():
    model = tiny_mlp()
    x, y = batches(1, n=1)[0]
    opt = LEHI(
        model.parameters(),
        betas=(0.9, 0.0),
        estimator="per_example",
        scale_by_batch=True,
        seed=8,
        warn_update_above=None,
    )
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y, model=model, inputs=x)
    assert opt.num_loss_terms == 1
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(8))
    params = list(model.parameters())
    # N = 1: h = (J v)², scaled by N = 1.
    for p, a in zip(params, torch.autograd.grad((v * model(x)).sum(), params)):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], a.square())


def test_refreshes_taken_counts_the_refreshes_so_far():
    model = tiny_mlp()
    opt = LEHI(model.parameters(), lr=1e-3, hessian_every=3, warn_update_above=None)
    counts = []
    for x, y in batches(7):
        opt.zero_grad()
        out = model(x)
        opt.backward(F.cross_entropy(out, y), out, y)
        opt.step()
        counts.append(opt.refreshes_taken())
    assert counts == [math.ceil(t / 3) for t in range(1, 8)]  # refreshes at steps 1, 4, 7
    assert counts[-1] == opt.curvature_passes


def test_a_generator_state_saved_as_another_integer_type_restores_the_draws():
    """A checkpoint whose generator state came back as int64 (as a serializer that widens
    byte tensors returns it) resumes the same draws."""
    data = batches(6)
    model = tiny_mlp()
    opt = LEHI(model.parameters(), lr=3e-3, seed=2, warn_update_above=None)
    train(model, opt, data[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    uninterrupted = train(model, opt, data[3:])
    device, state = saved["curvature"]["generator"]
    saved["curvature"]["generator"] = (device, state.to(torch.int64))
    resumed_model = tiny_mlp(seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed_opt = LEHI(resumed_model.parameters(), lr=3e-3, seed=5, warn_update_above=None)
    resumed_opt.load_state_dict(saved)
    assert train(resumed_model, resumed_opt, data[3:]) == uninterrupted


# ------------------------------------------------------------------- SophiaG's arguments
def test_sophia_defaults_are_the_published_ones():
    """Liu et al.'s defaults (docs METHOD.md): lr 1e-4, betas (0.965, 0.99), rho 0.04,
    weight decay 0.1, k = 10, ĝ clipped to norm 1; inverse-CDF draws."""
    opt = SophiaG(tiny_mlp().parameters())
    group = opt.param_groups[0]
    assert group["lr"] == 1e-4
    assert group["betas"] == (0.965, 0.99)
    assert group["rho"] == 0.04
    assert group["weight_decay"] == 0.1
    assert group["hessian_every"] == 10
    assert opt.curvature_grad_clip == 1.0
    assert opt.sampler == "inverse_cdf"
    assert opt.loss_name == "cross_entropy"


@pytest.mark.parametrize("foreach", [None, False, True])
def test_sophia_keeps_the_foreach_setting_in_its_groups(foreach):
    assert SophiaG(tiny_mlp().parameters(), foreach=foreach).param_groups[0]["foreach"] is foreach


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (dict(lr=-1e-3), "lr must be a finite number > 0, got -0.001"),
        (dict(betas=(1.0, 0.99)), "betas must be two numbers in [0, 1) (β1, β2), got (1.0, 0.99)"),
        (dict(weight_decay=-0.1), "weight_decay must be a finite number >= 0, got -0.1"),
        (dict(hessian_every=0), "hessian_every must be an integer >= 1, got 0"),
        (dict(rho=0.0), "rho must be > 0, got 0.0"),
        (dict(curvature_grad_clip=0.0), "curvature_grad_clip must be > 0 or None, got 0.0"),
        (dict(curvature_grad_clip=-1.0), "curvature_grad_clip must be > 0 or None, got -1.0"),
    ],
)
def test_sophia_rejects_out_of_range_arguments_by_name(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SophiaG(tiny_mlp().parameters(), **kwargs)


def test_sophia_clips_the_sampled_gradient_by_the_official_rule_in_every_group():
    """float64, ĝ of norm ≈ 0.3 clipped to 1e-3: h = (ĝ·clip/(‖ĝ‖ + 1e-6))² (β2 = 0) for the
    model's group, though the first group (a penalty parameter) has no ĝ at all."""
    model = tiny_mlp(dtype=torch.float64)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    x, y = batches(1, n=64)[0]
    x = x.double()
    clip = 1e-3
    opt = SophiaG(
        [{"params": [extra]}, {"params": list(model.parameters())}],
        betas=(0.965, 0.0),
        curvature_grad_clip=clip,
        seed=3,
    )
    out = model(x)
    opt.backward(F.cross_entropy(out, y) + extra.square().sum(), out, y)
    params = list(model.parameters())
    v = aux_vector("cross_entropy", model(x), y, torch.Generator().manual_seed(3))
    g_hat = torch.autograd.grad((v * model(x)).sum() / len(x), params)
    norm = math.sqrt(sum(float(a.square().sum()) for a in g_hat))
    assert norm > 100 * clip
    coef = clip / (norm + 1e-6)
    for p, a in zip(params, g_hat):
        torch.testing.assert_close(opt.state[p]["hessian"], (a * coef).square(), rtol=1e-9, atol=0)


@pytest.mark.parametrize("foreach", [False, True])
def test_sophia_counts_its_steps(foreach):
    model = tiny_mlp()
    opt = SophiaG(model.parameters(), lr=1e-3, hessian_every=2, foreach=foreach)
    train(model, opt, batches(3))
    assert opt.steps_taken() == 3
    assert all(opt.state[p]["step"] == 3 for p in model.parameters())
    assert opt.curvature_passes == 2  # steps 1 and 3


@pytest.mark.parametrize("recognised", [True, False])
def test_a_custom_ignore_index_reaches_every_draw_of_v(recognised):
    """ignore_index=-1 with four padded rows: N counts the 12 others and their v alone
    enters h, whether v comes from the loss gradient or (a loss the optimizer does not
    recognise) from a fresh softmax."""
    model = tiny_mlp()
    x, y = batches(1)[0]
    y[[1, 5, 6, 11]] = -1
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), ignore_index=-1, seed=12)
    out = model(x)
    loss = F.cross_entropy(out, y, ignore_index=-1)
    opt.backward(loss if recognised else 2 * loss / 2, out, y)
    assert opt.num_loss_terms == 12
    g = torch.Generator().manual_seed(12)
    v = aux_vector("cross_entropy", model(x), y, g, ignore_index=-1)
    assert torch.all(v[[1, 5, 6, 11]] == 0)
    params = list(model.parameters())
    for p, a in zip(params, torch.autograd.grad((v * model(x)).sum() / 12, params)):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], a.square())
