"""The readings of LEHI's open choices, the edge-case fixes, and the optimizer builder.

Each reading is checked for its defining property on a real curvature pass (β2 = 0 makes the
state after one refresh exactly what that refresh folded); the fixes are checked on the
situations that broke them (a parameter outside the output graph, bf16 counters after a
resume, LEHIBrid's N-scaling).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.optim import batches, tiny_mlp
from torch import nn

from lehi.curvature import aux_loss, per_example_curvature
from lehi.optim import LEHI, LEHIBrid, SophiaG, backward, build_optimizer, param_groups


def one_refresh(opt: torch.optim.Optimizer, model: nn.Module, x, y) -> None:
    opt.zero_grad()
    out = model(x)
    backward(opt, F.cross_entropy(out, y), out, y)


def aux_grads(model: nn.Module, x, y, generator: torch.Generator) -> list[torch.Tensor]:
    aux, _ = aux_loss("cross_entropy", model(x), y, generator)
    return list(torch.autograd.grad(aux, list(model.parameters())))


def plain_grads(model: nn.Module, x, y) -> list[torch.Tensor]:
    return list(torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters())))


# --------------------------------------------------------------------------------- fixes
class Penalised(nn.Module):
    """An MLP plus a parameter that only a penalty term reads: no path to the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()
        self.extra = nn.Parameter(torch.linspace(-1.0, 1.0, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid])
@pytest.mark.parametrize("foreach", [False, True])
def test_parameter_without_curvature_follows_adams_rule(cls, foreach):
    model = Penalised()
    ref = nn.Parameter(model.extra.detach().clone())
    opt = cls(model.parameters(), lr=1e-2, seed=0, foreach=foreach)
    adam = torch.optim.Adam([ref], lr=1e-2)
    for x, y in batches(6):
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y) + 0.1 * model.extra.square().sum()
        opt.backward(loss, out, y)
        opt.step()
        adam.zero_grad()
        (0.1 * ref.square().sum()).backward()
        adam.step()
    assert torch.isfinite(model.extra).all()
    # v of that tensor averages g⊙g and its own refresh count corrects it: Adam exactly.
    torch.testing.assert_close(model.extra, ref, atol=1e-6, rtol=0)
    assert opt.state[model.extra]["curvature_step"] == 6


def test_bf16_counters_keep_counting_after_a_round_trip():
    model = tiny_mlp(dtype=torch.bfloat16)
    opt = LEHI(model.parameters(), lr=1e-3, seed=0)
    x, y = batches(1)[0]
    x = x.bfloat16()
    for _ in range(300):
        one_refresh(opt, model, x, y)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    resumed = LEHI(model.parameters(), lr=1e-3, seed=0)
    resumed.load_state_dict(saved)
    for _ in range(2):
        one_refresh(resumed, model, x, y)
        resumed.step()
    for p in model.parameters():
        for key in ("step", "curvature_step"):
            assert resumed.state[p][key].dtype == torch.float32
            assert resumed.state[p][key] == 302
        assert resumed.state[p]["exp_avg"].dtype == torch.bfloat16


def test_sophia_step_counter_stays_float32_on_load():
    model = tiny_mlp(dtype=torch.bfloat16)
    opt = SophiaG(model.parameters(), seed=0)
    x, y = batches(1)[0]
    one_refresh(opt, model, x.bfloat16(), y)
    opt.step()
    resumed = SophiaG(model.parameters(), seed=0)
    resumed.load_state_dict(opt.state_dict())
    assert all(resumed.state[p]["step"].dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("hybrid", ["max", "sum", "mix"])
def test_lehibrid_scale_by_batch_compares_like_with_like(hybrid):
    model = tiny_mlp()
    x, y = batches(1)[0]
    opt = LEHIBrid(model.parameters(), betas=(0.9, 0.0), hybrid=hybrid, scale_by_batch=True, seed=5)
    one_refresh(opt, model, x, y)
    n = len(x)
    for p, a in zip(model.parameters(), aux_grads(model, x, y, torch.Generator().manual_seed(5))):
        g2, h = p.grad.square(), a.square()
        combined = {"max": torch.maximum(g2, h), "sum": g2 + h, "mix": 0.5 * g2 + 0.5 * h}
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], n * combined[hybrid])


def test_hessian_every_must_agree_across_groups():
    model = tiny_mlp()
    first, second = model[0].parameters(), model[2].parameters()
    with pytest.raises(ValueError, match="hessian_every must be the same in every"):
        LEHI([{"params": first}, {"params": second, "hessian_every": 3}])


# ------------------------------------------------------------------------------ readings
def test_warmup_draws_averages_independent_draws_on_the_first_refresh():
    model = tiny_mlp()
    (x, y), (x2, y2) = batches(2)
    opt = LEHI(
        model.parameters(), betas=(0.9, 0.0), curvature_warmup="draws", warmup_length=4, seed=3
    )
    one_refresh(opt, model, x, y)
    generator = torch.Generator().manual_seed(3)
    draws = [aux_grads(model, x, y, generator) for _ in range(4)]
    for i, p in enumerate(model.parameters()):
        mean_h = torch.stack([d[i].square() for d in draws]).mean(0)
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], mean_h)
    opt.step()
    # Later refreshes draw once, continuing the same stream.
    one_refresh(opt, model, x2, y2)
    for p, a in zip(model.parameters(), aux_grads(model, x2, y2, generator)):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], a.square())
    assert opt.curvature_passes == 2


def test_warmup_max_grad_takes_the_larger_input_for_its_refreshes_only():
    model = tiny_mlp()
    data = batches(3)
    opt = LEHI(
        model.parameters(), betas=(0.9, 0.0), curvature_warmup="max_grad", warmup_length=2, seed=4
    )
    generator = torch.Generator().manual_seed(4)
    for t, (x, y) in enumerate(data):
        one_refresh(opt, model, x, y)
        for p, g, a in zip(
            model.parameters(), plain_grads(model, x, y), aux_grads(model, x, y, generator)
        ):
            expected = torch.maximum(g.square(), a.square()) if t < 2 else a.square()
            torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], expected)
        opt.step()


def test_warmup_grad_folds_adams_input_without_an_auxiliary_pass():
    model = tiny_mlp()
    data = batches(3)
    opt = LEHI(
        model.parameters(), betas=(0.9, 0.0), curvature_warmup="grad", warmup_length=2, seed=6
    )
    generator = torch.Generator().manual_seed(6)
    for t, (x, y) in enumerate(data):
        grads = plain_grads(model, x, y)
        one_refresh(opt, model, x, y)
        if t == 2:
            aux = aux_grads(model, x, y, generator)
        opt.step()
        for i, p in enumerate(model.parameters()):
            expected = grads[i].square() if t < 2 else aux[i].square()
            torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], expected)
        assert opt.curvature_passes == max(0, t - 1)


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid])
def test_h_floor_lifts_every_coordinate_to_a_fraction_of_the_mean(cls):
    model = tiny_mlp()
    x, y = batches(1)[0]
    extra = {"hybrid": "sum"} if cls is LEHIBrid else {}
    opt = cls(model.parameters(), betas=(0.9, 0.0), h_floor=0.5, seed=2, **extra)
    one_refresh(opt, model, x, y)
    for p, a in zip(model.parameters(), aux_grads(model, x, y, torch.Generator().manual_seed(2))):
        h = a.square()
        floored = torch.clamp(h, min=0.5 * h.mean().item())
        expected = floored + p.grad.square() if cls is LEHIBrid else floored
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], expected)
        assert bool((floored >= 0.5 * h.mean()).all()) and bool((floored > h).any())


@pytest.mark.parametrize("path", ["single", "foreach", "compile"])
def test_update_clip_bounds_every_coordinate_of_the_update(path):
    if path == "compile":
        from test_optim_paths import compile_works

        if not compile_works():
            pytest.skip("torch.compile cannot build kernels on this machine")
    model = tiny_mlp()
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batches(1)[0]
    lr, clip = 1e-2, 0.5
    # g⊙g as v: Adam's first update m̂/(√v̂ + ε) is ±1 wherever g ≠ 0, so the clip decides it.
    opt = LEHI(
        model.parameters(),
        lr=lr,
        estimator="squared_gradient",
        update_clip=clip,
        foreach=path == "foreach",
        compile=path == "compile",
    )
    one_refresh(opt, model, x, y)
    opt.step()
    for p, p0 in zip(model.parameters(), before):
        expected = p0 - lr * clip * torch.sign(p.grad)
        torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=0)


def test_readings_are_off_by_default_and_checked():
    model = tiny_mlp()
    opt = LEHI(model.parameters())
    group = opt.param_groups[0]
    assert (opt.curvature_warmup, group["h_floor"], group["update_clip"]) == ("none", 0.0, None)
    assert opt.sampler == "inverse_cdf"
    for kwargs, named in [
        (dict(curvature_warmup="adam"), "curvature_warmup"),
        (dict(warmup_length=0), "warmup_length"),
        (dict(h_floor=-1.0), "h_floor"),
        (dict(update_clip=0.0), "update_clip"),
        (dict(betas=(0.9, 0.99, 0.5)), r"betas must be two numbers in \[0, 1\)"),
        (dict(lr=float("nan")), "lr"),
    ]:
        with pytest.raises(ValueError, match=named):
            LEHI(model.parameters(), **kwargs)


# ------------------------------------------------------------------------ data-parallel
def test_configure_data_parallel_reduces_aux_grads_and_picks_draws():
    model = tiny_mlp()
    x, y = batches(1)[0]
    reduced: list[int] = []

    def reduce_mean(tensors: list[torch.Tensor]) -> None:
        reduced.append(len(tensors))

    opt = LEHI(model.parameters(), betas=(0.9, 0.0), sampler="multinomial", seed=7)
    opt.configure_data_parallel(reduce_mean, rank=1, world_size=2)
    assert opt.seed == 7 * 1_000_003 + 1
    one_refresh(opt, model, x, y)
    assert reduced == [len(list(model.parameters())) + 1]  # the gradients and one mark
    single = LEHI(model.parameters(), seed=7)
    single.configure_data_parallel(reduce_mean, rank=0, world_size=1)
    assert single.seed == 7
    with pytest.raises(ValueError, match="rank"):
        single.configure_data_parallel(reduce_mean, rank=2, world_size=2)
    exact = LEHI(model.parameters(), estimator="per_example", seed=7)
    exact.configure_data_parallel(reduce_mean, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"^estimator='per_example' does not support data-par"):
        exact.configure_data_parallel(reduce_mean, rank=0, world_size=2)


# ------------------------------------------------------------------------------ builder
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.proj(self.norm(self.embed(tokens))))


OPTIONS = {
    "adamw": {
        "_target_": "torch.optim.AdamW",
        "name": "adamw",
        "label": "x",
        "lr": 1e-3,
        "weight_decay": 0.1,
    },
    "lehi": {"_target_": "lehi.optim.LEHI", "name": "lehi", "lr": 1e-3, "weight_decay": 0.1},
    "sophia": {"_target_": "lehi.optim.SophiaG", "name": "sophia", "lr": 1e-3},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_build_excludes_biases_norms_and_embeddings_from_decay(name):
    model = Tiny()
    opt = build_optimizer(OPTIONS[name], model, loss="cross_entropy", ignore_index=-100, seed=0)
    decayed, exempt = opt.param_groups
    assert {id(p) for p in decayed["params"]} == {id(model.proj.weight), id(model.head.weight)}
    assert exempt["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    assert {id(p) for p in exempt["params"]} == {
        id(model.embed.weight),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.proj.bias),
    }
    # A real step: embedding rows no token used (zero gradient) are not decayed.
    tokens = torch.randint(0, 5, (4, 5))
    unused = model.embed.weight.detach()[5:].clone()
    opt.zero_grad()
    out = model(tokens)
    backward(opt, F.cross_entropy(out.reshape(-1, 10), tokens.reshape(-1)), out, tokens)
    opt.step()
    torch.testing.assert_close(model.embed.weight.detach()[5:], unused, atol=0, rtol=0)
    assert not torch.equal(model.proj.weight.detach(), decayed["params"][0].detach() * 0)


def test_build_can_decay_everything_and_passes_curvature_inputs():
    model = Tiny()
    options = dict(OPTIONS["lehi"], exclude_from_decay=False)
    opt = build_optimizer(options, model, loss="mse", ignore_index=3, seed=11)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 0.1
    assert (opt.loss_name, opt.ignore_index, opt.seed) == ("mse", 3, 11)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"_target_": "torch.optim.Adam", "hessian_every": 2}, "optimizer.hessian_every"),
        ({"_target_": "torch.optim.Adam", "sampler": "inverse_cdf"}, "optimizer.sampler"),
        ({"_target_": "lehi.optim.LEHI", "loss": "mse"}, "optimizer.loss"),
        ({"_target_": "lehi.optim.LEHIBrid", "rho": 0.1}, "optimizer.rho"),
        ({"_target_": "torch.optim.Adam", "betas": [0.9, 0.99, 0.5]}, "optimizer.betas"),
        ({"_target_": "torch.optim.Adam", "betas": [1.0, 0.99]}, "optimizer.betas"),
        ({"_target_": "torch.optim.AdamW", "lr": float("inf")}, "optimizer.lr"),
        ({"_target_": "lehi.optim.SophiaG", "lr": -1.0}, "optimizer.lr"),
        ({"_target_": "lehi.optim.NoSuch"}, "optimizer._target_"),
        ({"_target_": "torch.nn.Linear"}, "optimizer._target_"),
        ({"lr": 1e-3}, "optimizer._target_"),
        ({"_target_": "torch.optim.Adam", "exclude_from_decay": "yes"}, "exclude_from_decay"),
    ],
)
def test_build_refuses_bad_options_in_one_line(options, named):
    with pytest.raises(ValueError, match=named) as info:
        build_optimizer(options, Tiny(), loss="cross_entropy", ignore_index=-100, seed=0)
    assert "\n" not in str(info.value)


def test_param_groups_without_decay_is_one_group():
    model = Tiny()
    assert len(param_groups(model, 0.0)) == 1
    assert len(param_groups(model, 0.1, exclude_from_decay=False)) == 1


# --------------------------------------------------------------------- the one fold hook
def test_per_example_mode_folds_its_h_through_the_same_hook():
    model = tiny_mlp()
    x, y = batches(1, n=6)[0]
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), estimator="per_example", seed=1)
    out = model(x)
    opt.backward(F.cross_entropy(out, y), out, y, model=model, inputs=x)
    h = per_example_curvature(model, x, y, "cross_entropy", torch.Generator().manual_seed(1))
    for name, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], h[name])


def test_accumulated_micro_batches_fold_the_whole_batch_and_skip_unreached_parameters():
    model = Penalised()
    x, y = batches(1)[0]
    opt = LEHI(model.parameters(), betas=(0.9, 0.0), seed=8)
    opt.zero_grad()
    for i, (xs, ys) in enumerate(zip(x.chunk(2), y.chunk(2))):
        out = model(xs)
        loss = (F.cross_entropy(out, ys) + 0.1 * model.extra.square().sum()) / 2
        opt.backward(loss, out, ys, micro_batch=(i, 2))
    generator = torch.Generator().manual_seed(8)
    halves = [aux_grads(model.net, xs, ys, generator) for xs, ys in zip(x.chunk(2), y.chunk(2))]
    for p, a, b in zip(model.net.parameters(), *halves):
        torch.testing.assert_close(opt.state[p]["exp_avg_curvature"], ((a + b) / 2).square())
    assert model.extra not in opt.state  # no auxiliary gradient: left to the step's rule
    opt.step()
    torch.testing.assert_close(
        opt.state[model.extra]["exp_avg_curvature"], model.extra.grad.square()
    )
    assert torch.isfinite(model.extra).all()
