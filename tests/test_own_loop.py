"""LEHI in someone else's loop: the README's example and docs/own_loop.md run as written, on a
small GPT-style model, and train; the one-time warning on a large early update."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

from lehi.optim import LEHI
from lehi.optim.update_watch import largest_updates

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
