"""LEHI in someone else's loop: the README's example and docs/own_loop.md run as written, on a
small GPT-style model, and train; the one-time warning on a large early update."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import lehi
from lehi.optim import LEHI
from lehi.optim.update_watch import WATCHED_STEPS, UpdateWatch, largest_updates

PAGE = REPO / "docs" / "own_loop.md"
EXAMPLES = ("setup", "plain_loop", "language_model", "param_groups", "lightning")


def examples() -> dict[str, str]:
    """The page's ``python`` blocks, each under its ``<!-- example: name -->`` marker."""
    text = PAGE.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.DOTALL))


def run_example(*names: str) -> dict[str, Any]:
    """Execute the setup block, then ``names`` in order, in one namespace."""
    blocks = examples()
    namespace: dict[str, Any] = {"__name__": "own_loop"}
    for name in ("setup", *names):
        exec(compile(blocks[name], f"{PAGE}:{name}", "exec"), namespace)
    return namespace


def readme_loop() -> str:
    """The first code block of README's "LEHI in a plain PyTorch loop" section."""
    section = (
        REPO.joinpath("README.md")
        .read_text(encoding="utf-8")
        .split("### LEHI in a plain PyTorch loop", 1)[1]
    )
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


def eval_loss(model: torch.nn.Module, batches: Any) -> float:
    """Mean cross-entropy over four held-out batches (another seed than the training ones)."""
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
            for x, y in batches(4, seed=99)
        ]
    return sum(losses) / len(losses)


def test_the_page_holds_every_example():
    assert tuple(examples()) == EXAMPLES


def test_plain_loop_example_trains(one_thread):
    ns = run_example("plain_loop")
    losses = ns["losses"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0]
    assert ns["opt"].curvature_passes == 30


def test_language_model_example_counts_unpadded_terms_and_folds_once_per_step(one_thread):
    ns = run_example("language_model")
    opt, model = ns["opt"], ns["model"]
    # Two micro-batches of 8 × 32 targets, 4 rows × 8 of each padded with -1.
    assert opt.num_loss_terms == 2 * (8 * 32 - 4 * 8)
    assert opt.curvature_passes == 20
    assert all(int(opt.state[p]["curvature_step"]) == 20 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_param_groups_example_and_what_sophia_does_with_bare_parameters(one_thread):
    """Bare parameters: SophiaG decays every tensor, LayerNorm gains included; with
    param_groups the exempt tensors take exactly the same step without the decay."""
    ns = run_example("param_groups")
    TinyGPT, batches = ns["TinyGPT"], ns["batches"]
    lr, wd = 1e-2, 0.1
    x, y = next(batches(1))
    after = []
    for build in (lambda m: m.parameters(), lambda m: ns["param_groups"](m, weight_decay=wd)):
        torch.manual_seed(0)
        model = TinyGPT(ns["vocab_size"])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = ns["SophiaG"](build(model), lr=lr, weight_decay=wd, seed=0)
        logits = model(x)
        opt.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits, y)
        opt.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})
    bare, grouped = after
    gain = "norm.weight"
    # bare: w(1 − lr·λ) − lr·u; grouped (exempt): w − lr·u, the same u.
    torch.testing.assert_close(grouped[gain] - bare[gain], lr * wd * before[gain])
    assert not torch.equal(grouped[gain], bare[gain])
    assert torch.equal(grouped["head.weight"], bare["head.weight"])


def test_lightning_example_trains_with_manual_optimization(one_thread):
    pytest.importorskip("lightning")
    ns = run_example("lightning")
    losses = ns["lit"].losses
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
    assert ns["trainer"].optimizers[0].curvature_passes == 20


#: LEHI (the README's loop) ends within this factor of AdamW's held-out loss after 50 steps.
ADAMW_FACTOR = 1.1


def test_readme_loop_trains_a_small_gpt_close_to_adamw(one_thread):
    """The report in miniature: a GPT-style model, (B, T, V) logits, 50 steps of the README's
    loop as written. The loss falls, stays finite and ends within ADAMW_FACTOR of AdamW's
    (the same initial weights, batches and gradient clipping, lr 1e-3)."""
    ns = run_example()
    TinyGPT, batches = ns["TinyGPT"], ns["batches"]
    torch.manual_seed(0)
    model = TinyGPT(ns["vocab_size"])
    start = eval_loss(model, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the clipped reading never warns
        exec(readme_loop(), {"model": model, "loader": batches(50)})
    lehi = eval_loss(model, batches)

    torch.manual_seed(0)
    reference = TinyGPT(ns["vocab_size"])
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    for x, y in batches(50):
        opt.zero_grad()
        F.cross_entropy(reference(x).flatten(0, 1), y.flatten()).backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        opt.step()
    adamw = eval_loss(reference, batches)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert lehi < 0.8 * start
    assert lehi < ADAMW_FACTOR * adamw, (lehi, adamw)


def gpt_steps(opt_kwargs: dict[str, Any], steps: int = 10) -> tuple[LEHI, torch.nn.Module]:
    ns = run_example()
    torch.manual_seed(0)
    model = ns["TinyGPT"](ns["vocab_size"])
    opt = LEHI(model.named_parameters(), lr=1e-3, seed=0, **opt_kwargs)
    for x, y in ns["batches"](steps):
        opt.zero_grad()
        logits = model(x)
        opt.backward(F.cross_entropy(logits.flatten(0, 1), y.flatten()), logits, y)
        opt.step()
    return opt, model


def test_the_default_reading_warns_once_naming_the_tensor_and_update_clip(one_thread):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gpt_steps({})
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages
    match = re.search(r"update of '([\w.]+)' \(shape \(.*\)\) reaches ([\d.e+]+) × lr", messages[0])
    assert match and float(match.group(2)) > 100
    assert "update_clip" in messages[0]
    torch.manual_seed(0)
    names = {n for n, _ in run_example()["TinyGPT"](3).named_parameters()}
    assert match.group(1) in names


def test_no_warning_with_update_clip_or_when_silenced(one_thread):
    for kwargs in ({"update_clip": 1.0}, {"warn_update_above": None}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            gpt_steps(kwargs)


def test_the_warning_check_changes_no_number(one_thread):
    with warnings.catch_warnings(record=True):
        _, watched = gpt_steps({"warn_update_above": 1.0}, steps=4)
    _, unwatched = gpt_steps({"warn_update_above": None}, steps=4)
    for p, q in zip(watched.parameters(), unwatched.parameters()):
        assert torch.equal(p, q)


def test_warn_update_above_must_be_positive_or_none():
    for bad in (0, -1.0, float("inf"), "high"):
        with pytest.raises(ValueError, match="warn_update_above must be"):
            LEHI([torch.nn.Parameter(torch.zeros(2))], warn_update_above=bad)


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_largest_updates_is_adams_step_size_per_tensor(eps_inside_sqrt, bias_correction):
    """max |m̂/(√v̂+ε)| (or m̂/√(v̂+ε)) per tensor, by hand: m̂ = m/(1−β1^t), v̂ = v/(1−β2^r)
    (v̂ = v without bias correction); an empty tensor's size is 0."""
    beta1, beta2, eps, t, r = 0.9, 0.99, 1e-3, 3, 2
    exp_avgs = [[0.3, -0.6], [], [-0.2]]
    curvatures = [[0.04, 0.01], [], [0.0025]]
    bc1 = 1 - beta1**t
    bc2 = 1 - beta2**r if bias_correction else 1.0
    expected = []
    for m, v in zip(exp_avgs, curvatures):
        if eps_inside_sqrt:
            sizes = [abs(mi) / bc1 / math.sqrt(vi / bc2 + eps) for mi, vi in zip(m, v)]
        else:
            sizes = [abs(mi) / bc1 / (math.sqrt(vi / bc2) + eps) for mi, vi in zip(m, v)]
        expected.append(max(sizes, default=0.0))
    result = largest_updates(
        [torch.tensor(m) for m in exp_avgs],
        [torch.tensor(v) for v in curvatures],
        [torch.tensor(float(t))] * 3,
        [torch.tensor(float(r))] * 3,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        eps_inside_sqrt=eps_inside_sqrt,
        bias_correction=bias_correction,
    )
    torch.testing.assert_close(result, torch.tensor(expected), rtol=1e-5, atol=0)


def squared_gradient_steps(groups, grads_per_step, **kwargs):
    """LEHI(estimator="squared_gradient") (AdamW's step, h = g⊙g) on ``groups`` of
    parameters, one step per entry of ``grads_per_step`` (the gradients, in parameter order);
    returns the UserWarnings raised."""
    opt = LEHI(groups, lr=1e-3, estimator="squared_gradient", **kwargs)
    params = [p for group in opt.param_groups for p in group["params"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for grads in grads_per_step:
            for p, g in zip(params, grads):
                p.grad = torch.tensor(g)
            opt.step()
    return [w for w in caught if issubclass(w.category, UserWarning)]


WARNING = re.compile(
    r"(\w+): the step-(\d+) update of (\S+) \(shape \((.*)\)\) reaches ([\d.e+]+) × lr"
)


@pytest.mark.parametrize("eps_inside_sqrt", [False, True])
def test_the_warning_names_the_largest_tensor_of_all_groups_at_adams_first_step_size(
    eps_inside_sqrt,
):
    """Adam's first step is u = g/(|g|+ε) (m̂ = g, v̂ = g⊙g), or g/√(g²+ε) with ε inside the
    root. With ε = 1 the tensors' max |u| are 0.5/1.5, 0.2/1.2 and 3/4 (0.5/√1.25, 0.2/√1.04,
    3/√10): all exceed 0.1, and the one warning, raised outside the package, names the
    largest (group 1's second tensor), its shape and its size, and the options."""
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(2))
    caught = squared_gradient_steps(
        [{"params": [a]}, {"params": [b, c]}],
        [[[0.5, -0.5], [0.2, 0.2], [3.0, -1.0]]],
        eps=1.0,
        eps_inside_sqrt=eps_inside_sqrt,
        warn_update_above=0.1,
    )
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    # Attributed to a caller of step(), not to the package (here it is this file; mutmut's
    # trampolines add frames, so the exact frame is not asserted).
    assert Path(lehi.__file__).parent not in Path(caught[0].filename).parents
    match = WARNING.match(message)
    assert match, message
    assert match.groups()[:4] == ("LEHI", "1", "param_groups[1][1]", "2,")
    expected = 3 / math.sqrt(9 + 1) if eps_inside_sqrt else 3 / (3 + 1)
    assert float(match.group(5)) == pytest.approx(expected, rel=2e-3)
    assert message.endswith(
        " × lr in max |m̂/(√v̂+ε)| (Adam's stays near 1): set update_clip (e.g. update_clip=1.0)"
        " to bound each coordinate of the step (README: the ablation), or warn_update_above=None"
        " to silence this"
    )


def test_the_warning_names_a_named_parameter_by_its_name():
    small = torch.nn.Parameter(torch.zeros(1))
    big = torch.nn.Parameter(torch.zeros(2))
    caught = squared_gradient_steps(
        [("small", small), ("big", big)], [[[0.1], [3.0, 1.0]]], eps=1.0, warn_update_above=0.5
    )
    assert len(caught) == 1
    assert WARNING.match(str(caught[0].message)).group(3) == "'big'"


def test_a_clipped_update_is_reported_at_the_clip_and_a_tie_names_the_first_tensor():
    """β = (0.9, 0), ε = 0: step 1 with g = 1 is u = 1; step 2 with g = 10⁻³ is
    u = m̂/|g| = ((0.9·0.1 + 0.1·10⁻³)/(1 − 0.9²))/10⁻³ ≈ 474 in both groups, clipped to 10:
    the warning (threshold 5) comes at step 2 only, at 10 × lr, naming the first group's tensor."""
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    caught = squared_gradient_steps(
        [{"params": [p]}, {"params": [q]}],
        [[[1.0, 1.0], [1.0, 1.0]], [[1e-3, 1e-3], [1e-3, 1e-3]]],
        betas=(0.9, 0.0),
        eps=0.0,
        update_clip=10.0,
        warn_update_above=5.0,
    )
    assert len(caught) == 1, [str(w.message) for w in caught]
    match = WARNING.match(str(caught[0].message))
    assert match.group(2, 3) == ("2", "param_groups[0][0]")
    assert float(match.group(5)) == 10.0


def test_an_update_exactly_at_the_threshold_does_not_warn():
    """β = (0, 0), ε = 0: every step is u = g/|g| = ±1 exactly, which a threshold of 1 (or
    an update_clip equal to it) does not exceed."""
    grads = [[[2.0, -4.0]]] * 3
    for kwargs in ({}, {"update_clip": 1.0}, {"update_clip": 2.0}):
        p = torch.nn.Parameter(torch.zeros(2))
        opts = dict(betas=(0.0, 0.0), eps=0.0, warn_update_above=1.0, **kwargs)
        assert squared_gradient_steps([p], grads, **opts) == []


@pytest.mark.parametrize("large_at", [WATCHED_STEPS, WATCHED_STEPS + 1])
def test_the_watch_covers_exactly_the_first_watched_steps(large_at):
    """β = (0.9, 0), ε = 0, g = 1 until the step ``large_at``, whose g = 10⁻³: the earlier
    steps have u = m̂/|g| = 1, that one u = m̂/10⁻³ ≈ 850. Step 10 warns; step 11 is past the
    watch."""
    p = torch.nn.Parameter(torch.zeros(1))
    grads = [[[1.0]]] * (large_at - 1) + [[[1e-3]]]
    caught = squared_gradient_steps([p], grads, betas=(0.9, 0.0), eps=0.0, warn_update_above=5.0)
    m = 1 - 0.9 ** (large_at - 1)
    expected = (0.9 * m + 0.1e-3) / (1 - 0.9**large_at) / 1e-3
    if large_at > WATCHED_STEPS:
        assert caught == []
    else:
        assert len(caught) == 1
        match = WARNING.match(str(caught[0].message))
        assert match.group(2) == str(large_at)
        assert float(match.group(5)) == pytest.approx(expected, rel=2e-3)


def test_a_fresh_watch_validates_its_threshold_and_has_nothing_to_report():
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="warn_update_above must be"):
            UpdateWatch(bad)
    assert UpdateWatch(None).active is False
    watch = UpdateWatch(1.0)
    assert watch.active
    opt = LEHI([torch.nn.Parameter(torch.zeros(2))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        watch.end_step(opt, 0)


def test_largest_updates_stay_on_the_tensors_device_with_an_empty_tensor():
    """An empty tensor's size 0 is made where the other sizes are (the meta device stands in
    for an accelerator: a size on the CPU could not be stacked with them)."""
    exp_avgs = [torch.zeros(0, device="meta"), torch.ones(3, device="meta")]
    result = largest_updates(
        exp_avgs,
        [torch.ones_like(m) for m in exp_avgs],
        [torch.tensor(1.0)] * 2,
        [torch.tensor(1.0)] * 2,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
        eps_inside_sqrt=False,
        bias_correction=True,
    )
    assert result.device.type == "meta"
    assert result.shape == (2,)
