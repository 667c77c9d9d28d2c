"""Calls a curvature optimizer used to read silently wrong are one-line errors, raised before
anything is drawn or folded; seed=None leaves torch's global generator alone; a subclass
missing a hook fails at construction."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lehi.optim import LEHI, CurvatureOptimizer, LEHIBrid, SophiaG

VOCAB, T = 7, 5


def lm() -> nn.Module:
    """A tiny language model: (B, T) tokens → (B, T, VOCAB) logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(VOCAB, 8), nn.Tanh(), nn.Linear(8, VOCAB))


def tokens(t: int = T, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(VOCAB, (4, t), generator=gen), torch.randint(VOCAB, (4, t), generator=gen)


def flat_loss(logits: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2), y.flatten(), **kwargs)


def one_step(opt: CurvatureOptimizer, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad()
    logits = model(x)
    opt.backward(flat_loss(logits, y), logits, y)
    opt.step()


def assert_untouched_then_trains_as_fresh(opt: CurvatureOptimizer, model: nn.Module) -> None:
    """After a refused call: nothing folded or drawn; the next valid step is bit-identical to
    a fresh optimizer's."""
    assert opt.curvature_passes == 0 and not opt.state
    x, y = tokens()
    fresh_model = lm()
    fresh = type(opt)(fresh_model.parameters(), seed=0)
    for p in model.parameters():
        p.grad = None
    one_step(opt, model, x, y)
    one_step(fresh, fresh_model, x, y)
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid, SophiaG])
def test_negative_targets_other_than_ignore_index_name_both_values(cls):
    model = lm()
    opt = cls(model.parameters(), seed=0)
    x, y = tokens()
    y[:, -2:] = -1  # nanoGPT's padding; the optimizer was left at -100
    logits = model(x)
    with pytest.raises(ValueError, match=r"targets hold -1, .*ignore_index=-100"):
        opt.backward(flat_loss(logits, y, ignore_index=-1), logits, y)
    assert_untouched_then_trains_as_fresh(opt, model)


def test_targets_beyond_the_classes_are_an_error():
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens()
    y[0, 0] = VOCAB
    logits = model(x)
    with pytest.raises(ValueError, match=rf"targets hold {VOCAB}, outside the {VOCAB} classes"):
        opt.backward(logits.sum(), logits, y)


def test_matching_ignore_index_counts_only_the_kept_terms():
    model = lm()
    opt = LEHI(model.parameters(), ignore_index=-1, seed=0)
    x, y = tokens()
    y[:, -2:] = -1
    logits = model(x)
    opt.backward(flat_loss(logits, y, ignore_index=-1), logits, y)
    assert opt.num_loss_terms == 4 * (T - 2)


def test_a_second_backward_before_step_shows_the_accumulation_call():
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens()
    logits = model(x)
    opt.backward(flat_loss(logits, y) / 2, logits, y)
    logits = model(x)
    with pytest.raises(RuntimeError, match=r"twice before step\(\).*micro_batch=\(i, k\)"):
        opt.backward(flat_loss(logits, y) / 2, logits, y)
    assert opt.curvature_passes == 1
    opt.step()
    assert all(int(opt.state[p]["curvature_step"]) == 1 for p in model.parameters())
    one_step(opt, model, x, y)  # the next step's backward is fine
    assert opt.curvature_passes == 2


def test_two_micro_batches_are_one_refresh():
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens()
    for i in range(2):
        logits = model(x[2 * i : 2 * i + 2])
        target = y[2 * i : 2 * i + 2]
        opt.backward(flat_loss(logits, target) / 2, logits, target, micro_batch=(i, 2))
    opt.step()
    assert opt.curvature_passes == 1 and opt.num_loss_terms == 4 * T


def test_classes_in_dimension_one_is_an_error_naming_the_shapes():
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens()
    logits = model(x).transpose(1, 2)  # (B, C, T): F.cross_entropy's other layout
    with pytest.raises(ValueError, match=r"\(4, 7, 5\) and targets of shape \(4, 5\) do not pair"):
        opt.backward(F.cross_entropy(logits, y), logits, y)
    assert_untouched_then_trains_as_fresh(opt, model)


def test_classes_in_dimension_one_with_t_equal_to_c_is_caught_from_the_loss_graph():
    """T == C: (B, C, T) pairs with (B, T) by shape; the loss's softmax over dim 1 tells."""
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens(t=VOCAB)
    logits = model(x).transpose(1, 2)
    with pytest.raises(ValueError, match=r"classes from dimension 1 .*transpose\(1, -1\)"):
        opt.backward(F.cross_entropy(logits, y), logits, y)
    assert_untouched_then_trains_as_fresh(opt, model)


def test_the_suggested_transpose_gives_the_classes_last_layouts_h():
    """The fix the error names: the loss on (B, C, T) logits, their transpose as outputs."""
    x, y = tokens(t=VOCAB)
    curvatures = []
    for layout in ("classes_last", "classes_in_dim_1"):
        model = lm()
        opt = LEHI(model.parameters(), seed=0)
        logits = model(x)
        if layout == "classes_last":
            opt.backward(flat_loss(logits, y), logits, y)
        else:
            by_class = logits.transpose(1, 2)
            opt.backward(F.cross_entropy(by_class, y), by_class.transpose(1, -1), y)
        curvatures.append([opt.state[p]["exp_avg_curvature"] for p in model.parameters()])
    for a, b in zip(*curvatures):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["one_hot", "probabilities"])
def test_one_hot_or_probability_targets_are_refused(kind):
    model = lm()
    opt = LEHI(model.parameters(), seed=0)
    x, y = tokens()
    logits = model(x)
    soft = F.one_hot(y, VOCAB).float()
    if kind == "probabilities":
        soft = torch.softmax(torch.randn(4, T, VOCAB), -1)
    with pytest.raises(ValueError, match="one-hot rows: .* class indices of shape \\(4, 5\\)"):
        opt.backward(F.cross_entropy(logits.flatten(0, 1), soft.flatten(0, 1)), logits, soft)
    assert_untouched_then_trains_as_fresh(opt, model)


def test_mse_targets_of_another_size_are_an_error():
    model = nn.Linear(3, 2)
    opt = LEHI(model.parameters(), loss="mse", seed=0)
    x = torch.randn(4, 3)
    out = model(x)
    with pytest.raises(ValueError, match=r"mse: targets of shape \(4,\) do not match .*\(4, 2\)"):
        opt.backward(F.mse_loss(out[:, 0], torch.zeros(4)), out, torch.zeros(4))


@pytest.mark.parametrize("cls", [LEHI, SophiaG])
def test_seed_none_leaves_the_global_generator_alone_and_follows_manual_seed(cls):
    model, seeded_model = lm(), lm()  # lm() seeds torch itself: built first
    torch.manual_seed(0)
    expected = torch.randint(0, 10**6, (3,))
    torch.manual_seed(0)
    opt = cls(model.parameters())
    assert torch.equal(torch.randint(0, 10**6, (3,)), expected)
    assert opt.seed == 0
    # seed=None after manual_seed(s) draws exactly what seed=s draws.
    seeded = cls(seeded_model.parameters(), seed=0)
    x, y = tokens()
    for _ in range(2):
        one_step(opt, model, x, y)
        one_step(seeded, seeded_model, x, y)
    for p, q in zip(model.parameters(), seeded_model.parameters()):
        assert torch.equal(p, q)


def test_a_subclass_missing_a_hook_fails_at_construction():
    class NoFold(CurvatureOptimizer):
        def _init_state(self, p, state):
            state["step"] = torch.tensor(0.0)

    class NoInitState(CurvatureOptimizer):
        def _fold(self, params, groups, aux_grads, n):
            pass

    options = dict(loss="cross_entropy", ignore_index=-100, seed=0, estimator="sampled")
    for cls, missing in ((NoFold, "_fold"), (NoInitState, "_init_state")):
        with pytest.raises(TypeError, match=f"abstract method.*{missing}"):
            cls(
                nn.Linear(2, 2).parameters(),
                {"hessian_every": 1},
                estimators=("sampled",),
                **options,
            )


@pytest.mark.parametrize("cls", [LEHI, LEHIBrid])
def test_a_default_seed_near_two_to_the_64_gives_each_data_parallel_rank_a_stream(cls):
    """torch's random default seed can be any 64-bit value; a rank's multinomial stream derived
    from it must still be a valid generator seed, and differ from the other rank's."""
    torch.manual_seed(2**64 - 1)
    firsts = []
    for rank in (0, 1):
        model = lm()
        torch.manual_seed(2**64 - 1)
        opt = cls(model.parameters(), sampler="multinomial")
        opt.configure_data_parallel(lambda tensors: None, rank=rank, world_size=2)
        firsts.append(torch.rand(4, generator=opt.curvature_generator(torch.device("cpu"))))
    assert 0 <= opt.seed < 2**63
    assert not torch.equal(firsts[0], firsts[1])
