"""The draws of v: the categorical samplers on known uniforms and on frequencies.

The inverse-CDF sampler must return, for its uniform u, the first class whose cumulative
probability exceeds u·total. The uniforms are known here by reading the generator's stream
ahead on a copy of the generator, so boundary values (u = 0, u just below 1, u·total equal
to a cumulative sum) are exercised on the real sampler, not on a re-implementation. Rows of
hundreds of classes, with mass and zeros placed across the whole row, reach every level of a
sampler that searches blocks of classes before classes.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from lehi.curvature import (
    SAMPLERS,
    aux_loss,
    aux_vector,
    is_mean_cross_entropy,
    per_example_curvature,
    sample_categorical,
)

#: torch.rand's float32 uniforms are k / 2^24, k = 0 … 2^24 − 1.
LARGEST_U = 1.0 - 2.0**-24


def copy_of(generator: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(generator.get_state())
    return twin


def coming_uniforms(generator: torch.Generator, rows: int) -> torch.Tensor:
    """The (rows, 1) uniforms the inverse-CDF sampler will draw next from ``generator``."""
    return torch.rand((rows, 1), generator=copy_of(generator))


def generator_before(value: float) -> torch.Generator:
    """A generator whose next float32 uniform is ``value`` (found by reading its stream)."""
    generator = torch.Generator()
    generator.set_state(state_before(value))
    return generator


@functools.cache
def state_before(value: float, seed: int = 0, chunk: int = 1 << 22) -> torch.Tensor:
    search = torch.Generator().manual_seed(seed)
    skipped = 0
    for _ in range(64):
        hits = torch.nonzero(torch.rand(chunk, generator=search) == value)
        if len(hits):
            skipped += int(hits[0])
            break
        skipped += chunk
    else:
        raise AssertionError(f"no uniform equal to {value} in the first {64 * chunk} draws")
    generator = torch.Generator().manual_seed(seed)
    torch.rand(skipped, generator=generator)
    return generator.get_state()


def first_class_above(cdf_row: torch.Tensor, threshold: float) -> int:
    return next(j for j, c in enumerate(cdf_row.tolist()) if c > threshold)


#: (first, second) classes holding a row's mass, zeros elsewhere: neighbours, far apart, at
#: both ends, in one block of classes and across blocks of any power-of-two width up to 512.
PAIRS = [(0, 1), (0, 999), (5, 6), (63, 64), (64, 65), (127, 128), (100, 900), (511, 512)]


def two_class_rows(first_mass: torch.Tensor, classes: int = 1000) -> list[torch.Tensor]:
    """For each pair of PAIRS, rows with mass (m, 1 − m) on its two classes."""
    out = []
    for first, second in PAIRS:
        probs = torch.zeros(len(first_mass), classes)
        probs[:, first] = first_mass
        probs[:, second] = 1 - first_mass
        out.append(probs)
    return out


# ------------------------------------------------------------------------ known uniforms
@pytest.mark.parametrize("classes", [6, 300])
def test_inverse_cdf_picks_the_first_class_whose_cumulative_sum_exceeds_u(classes):
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(500, classes, generator=g)
    weights[weights < 0.6] = 0.0  # zero-probability classes anywhere in a row
    weights[:, 2] += 0.01  # no row without mass
    probs = weights / weights.sum(-1, keepdim=True)
    u = coming_uniforms(g, len(probs))
    drawn = sample_categorical(probs, g, "inverse_cdf")
    cdf = probs.cumsum(-1)
    expected = [first_class_above(cdf[i], float(u[i] * cdf[i, -1])) for i in range(len(probs))]
    assert drawn.shape == (len(probs), 1)
    assert drawn[:, 0].tolist() == expected
    assert bool((probs.gather(1, drawn) > 0).all())


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_u_equal_to_a_cumulative_sum_takes_the_next_class_with_mass(pair):
    """Mass u on one class, 1 − u on a later one: u·total equals the cumulative sum at the
    first and at every zero class after it, so the draw is the second class."""
    g = torch.Generator().manual_seed(2)
    u = coming_uniforms(g, 200)[:, 0]
    probs = two_class_rows(u)[pair]
    first, second = PAIRS[pair]
    total = probs.sum(-1)
    exact = (u * total == u) & (u + (1 - u) == total)
    assert int(exact.sum()) > 150  # the premise: most rows hit the boundary exactly
    drawn = sample_categorical(probs, g, "inverse_cdf")[:, 0]
    assert drawn[exact].tolist() == [second] * int(exact.sum())
    assert set(drawn.tolist()) <= {first, second}


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_u_zero_skips_leading_zero_probability_classes(pair):
    g = generator_before(0.0)
    assert coming_uniforms(g, 1).item() == 0.0
    probs = two_class_rows(torch.full((1,), 0.25))[pair]
    assert sample_categorical(probs, g, "inverse_cdf").item() == PAIRS[pair][0]


@pytest.mark.parametrize("pair", range(len(PAIRS)))
def test_u_just_below_one_never_reaches_trailing_zero_probability_classes(pair):
    g = generator_before(LARGEST_U)
    assert coming_uniforms(g, 1).item() == LARGEST_U
    probs = two_class_rows(torch.full((1,), 0.25))[pair]
    assert sample_categorical(probs, g, "inverse_cdf").item() == PAIRS[pair][1]


def test_a_row_without_mass_gives_the_last_class_not_an_index_past_it():
    g = torch.Generator().manual_seed(3)
    probs = torch.tensor([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    drawn = sample_categorical(probs, g, "inverse_cdf")[:, 0]
    assert drawn[0].item() == 2
    assert 0 <= drawn[1].item() <= 2


def test_sharded_draws_are_the_slices_of_the_global_draw():
    """A rank of a data-parallel run draws what one process draws for the global batch."""
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(12, 5, generator=g), -1)
    whole = sample_categorical(probs, torch.Generator().manual_seed(9), "inverse_cdf")
    for rank in range(3):
        rows = probs[rank * 4 : (rank + 1) * 4]
        part = sample_categorical(rows, torch.Generator().manual_seed(9), "inverse_cdf", (rank, 3))
        assert torch.equal(part, whole[rank * 4 : (rank + 1) * 4])


def test_multinomial_sampler_makes_torch_multinomials_draws():
    probs = torch.softmax(torch.randn(50, 7, generator=torch.Generator().manual_seed(5)), -1)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(6))
    drawn = sample_categorical(probs, torch.Generator().manual_seed(6), "multinomial")
    assert torch.equal(drawn, expected)


def test_unknown_sampler_names_the_allowed_ones():
    with pytest.raises(ValueError, match="sampler='gumbel' is not one of multinomial, inverse_cdf"):
        sample_categorical(torch.ones(1, 2) / 2, torch.Generator(), "gumbel")


# --------------------------------------------------------------------------- frequencies
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_frequencies_match_the_probabilities(sampler):
    """Chi-square goodness of fit per row, fixed seed, generous bound; zeros never drawn."""
    probs = torch.tensor(
        [
            [0.0, 0.1, 0.0, 0.6, 0.3, 0.0],
            [0.5, 0.0, 0.0, 0.0, 0.0, 0.5],
            [0.05, 0.15, 0.2, 0.25, 0.35, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0, 0.0],
        ]
    )
    draws = 20000
    g = torch.Generator().manual_seed(7)
    drawn = sample_categorical(probs.repeat(draws, 1), g, sampler).reshape(draws, len(probs))
    for row, p in enumerate(probs):
        counts = torch.bincount(drawn[:, row], minlength=p.numel()).double()
        assert bool((counts[p == 0] == 0).all()), (row, counts)
        support = p > 0
        if int(support.sum()) > 1:
            expected = p[support].double() / p[support].double().sum() * draws
            result = stats.chisquare(counts[support].numpy(), expected.numpy())
            assert result.pvalue > 1e-4, (row, counts, result)


# --------------------------------------------------------------------------- v itself
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cross_entropy_v_is_softmax_minus_the_drawn_one_hot(sampler):
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(10, 4, generator=g)
    targets = torch.randint(0, 4, (10,), generator=g)
    targets[[1, 6]] = -100
    probs = torch.softmax(logits, -1)
    labels = sample_categorical(probs, copy_of(g), sampler)[:, 0]
    v = aux_vector("cross_entropy", logits, targets, g, sampler=sampler)
    expected = probs - torch.nn.functional.one_hot(labels, 4).float()
    expected[[1, 6]] = 0.0  # ignored targets carry no curvature
    torch.testing.assert_close(v, expected)


@pytest.mark.parametrize("shape", [(4000, 3), (4000, 1), (4000,)])
def test_mse_v_is_a_scaled_rademacher_vector(shape):
    """v = ±sqrt(2/q): the Hessian diagonal of MSELoss(mean) over q outputs per example
    (q = 1 for one output per example, also when outputs are a flat vector), random signs."""
    g = torch.Generator().manual_seed(9)
    outputs = torch.randn(shape)
    v = aux_vector("mse", outputs, torch.zeros(shape), g)
    q = shape[1] if len(shape) > 1 else 1
    assert v.shape == outputs.shape
    assert bool((v.abs() == math.sqrt(2.0 / q)).all())
    positive = int((v > 0).sum())
    assert stats.binomtest(positive, v.numel(), 0.5).pvalue > 1e-4


def test_low_precision_logits_draw_from_the_float32_softmax():
    """bf16 logits: v is softmax(z) in float32 minus the drawn one-hot (labels drawn from the
    float32 probabilities), rounded once to bf16 at the end, in the logits' dtype."""
    g = torch.Generator().manual_seed(10)
    logits = (3 * torch.randn(40, 5, generator=g)).to(torch.bfloat16)
    targets = torch.randint(0, 5, (40,), generator=g)
    targets[:4] = -100
    probs = torch.softmax(logits.float(), -1)
    labels = sample_categorical(probs, copy_of(g), "inverse_cdf")[:, 0]
    v = aux_vector("cross_entropy", logits, targets, g)
    expected = probs - torch.nn.functional.one_hot(labels, 5).float()
    expected[:4] = 0.0
    assert v.dtype == torch.bfloat16
    assert torch.equal(v, expected.to(torch.bfloat16))


def test_mse_v_of_a_single_scalar_prediction():
    """A 0-d output is one example with one output: v = ±sqrt(2), shaped like the output."""
    g = torch.Generator().manual_seed(11)
    draws = [aux_vector("mse", torch.tensor(0.3), torch.tensor(0.1), g) for _ in range(40)]
    assert all(v.shape == () and bool(v.abs() == math.sqrt(2.0)) for v in draws)
    assert {float(v) > 0 for v in draws} == {True, False}


# ------------------------------------------------------ the auxiliary loss and its shortcut
def inverse_cdf_labels(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The first class whose cumulative probability exceeds u·total, row by row."""
    cdf = probs.cumsum(-1)
    rows = range(len(probs))
    return torch.tensor([first_class_above(cdf[i], float(u[i] * cdf[i, -1])) for i in rows])


@pytest.mark.parametrize(
    ("ignored", "shard"), [(5, (0, 1)), (0, (1, 2))], ids=["one_term_left", "second_rank"]
)
def test_aux_loss_is_the_mean_of_v_dot_z_over_the_kept_terms(ignored, shard):
    """L_aux = (1/N) Σ_n v_n·z_n with v = softmax(z) − onehot(ĉ), 0 on ignored rows, N the
    kept rows (here also N = 1); rank r of R draws rows r·n … (r+1)·n − 1 of the global
    uniforms. Its gradient at z is v/N."""
    g = torch.Generator().manual_seed(12)
    z = torch.randn(6, 4, generator=g, requires_grad=True)
    y = torch.randint(0, 4, (6,), generator=g)
    y[:ignored] = -1
    rank, ranks = shard
    uniforms = torch.rand((6 * ranks, 1), generator=copy_of(g))
    probs = torch.softmax(z.detach(), -1)
    labels = inverse_cdf_labels(probs, uniforms[rank * 6 : (rank + 1) * 6])
    if ranks > 1:  # the premise: this rank's draws are not the first rows' draws
        assert not torch.equal(labels, inverse_cdf_labels(probs, uniforms[:6]))
    v = (probs - torch.nn.functional.one_hot(labels, 4).float()) * (y != -1).unsqueeze(1)
    n = 6 - ignored
    aux, terms = aux_loss(
        "cross_entropy", z, y, g, ignore_index=-1, sampler="inverse_cdf", shard=shard
    )
    assert terms == n
    torch.testing.assert_close(aux, (v * z.detach()).sum() / n)
    (grad,) = torch.autograd.grad(aux, z)
    torch.testing.assert_close(grad, v / n)


@pytest.mark.parametrize("examples", [1, 5])
def test_per_example_curvature_of_a_flat_output_regression(examples):
    """z_n = w·x_n + b, one output per example, MSE: v_n = ±sqrt(2), so (J_nᵀ v_n)² is
    2·x_n² for w and 2 for b whatever the signs; h = Σ_n … / N² (N = 1 included)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Flatten(0))
    x = torch.randn(examples, 3)
    h = per_example_curvature(
        model, x, torch.zeros(examples), "mse", torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(h["0.weight"], 2 * x.square().sum(0, keepdim=True) / examples**2)
    torch.testing.assert_close(h["0.bias"], torch.tensor([2.0 / examples]))


def test_only_the_plain_mean_cross_entropy_of_the_outputs_is_recognised():
    """Recognised: F.cross_entropy of (B, T, C) outputs viewed as rows, with any
    ignore_index (a pad id above 126, the most negative int64). Refused: NLL of the outputs
    themselves, and a log-softmax over the batch instead of the classes."""
    out = torch.randn(2, 3, 6, requires_grad=True) * 1.0
    y = torch.randint(0, 6, (2, 3))
    rows, labels = out.reshape(-1, 6), y.reshape(-1)
    assert is_mean_cross_entropy(F.cross_entropy(rows, labels), out, -100)
    assert is_mean_cross_entropy(F.cross_entropy(out.view(6, 6), labels), out, -100)
    for pad in (200, 50256, -(2**63)):
        assert is_mean_cross_entropy(F.cross_entropy(rows, labels, ignore_index=pad), out, pad)
    flat = torch.randn(4, 6, requires_grad=True) * 1.0
    target = torch.randint(0, 6, (4,))
    assert is_mean_cross_entropy(F.nll_loss(F.log_softmax(flat, 1), target), flat, -100)
    # torch saves dim=-1 as 2^64 - 1: it is the class dimension all the same.
    assert is_mean_cross_entropy(F.nll_loss(F.log_softmax(flat, -1), target), flat, -100)
    assert not is_mean_cross_entropy(F.nll_loss(flat, target), flat, -100)
    assert not is_mean_cross_entropy(F.nll_loss(F.log_softmax(flat, 0), target), flat, -100)
