"""Tests of lehi.models: shapes, parameter counts (computed independently from layer shapes),
decoder causality, RoPE, stateful LSTM, shape errors, FLOP estimate, and that gradients flow
(each tiny model overfits a tiny batch)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from helpers.threads import single_thread
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from lehi.models import build, device_peak_flops, flops_per_token, mfu, num_params
from lehi.models.llama import LlamaConfig, apply_rope, rope_cache

#: These tensors are tiny; on the 2-core test machine OpenMP's two-thread hand-offs
#: stall for ~0.25 s on such small convolutions, so one thread is 20x faster here.
one_thread = pytest.fixture(single_thread, autouse=True, scope="module", name="one_thread")


@dataclass
class Shape:
    """Stands in for a DataBundle: build() reads only these two fields."""

    input_shape: tuple[int, ...]
    num_outputs: int


DIGITS, MNIST, PROTEIN = Shape((64,), 10), Shape((1, 28, 28), 10), Shape((9,), 1)
CIFAR, PTB, FINEWEB = Shape((3, 32, 32), 10), Shape((), 10_000), Shape((), 50_257)


def conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k  # no bias: every conv here is followed by BatchNorm


def bn(c: int) -> int:
    return 2 * c  # gamma and beta


def lstm_layer(n_in: int, h: int) -> int:
    return 4 * (n_in * h + h * h + 2 * h)  # 4 gates; PyTorch keeps two bias vectors


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "x", "out"),
    [
        ("mlp", DIGITS, {"hidden": [128, 128]}, torch.randn(5, 64), (5, 10)),
        ("mlp", MNIST, {}, torch.randn(5, 1, 28, 28), (5, 10)),
        ("mlp", PROTEIN, {"activation": "tanh"}, torch.randn(5, 9), (5, 1)),
        ("cnn", CIFAR, {}, torch.randn(2, 3, 32, 32), (2, 10)),
        ("resnet18", CIFAR, {}, torch.randn(2, 3, 32, 32), (2, 10)),
        ("lstm", PTB, {}, torch.randint(0, 10_000, (3, 7)), (3, 7, 10_000)),
        ("llama", Shape((), 300), {"size": "tiny"}, torch.randint(0, 300, (2, 9)), (2, 9, 300)),
    ],
)
def test_output_shapes(name, shape, kwargs, x, out):
    model = build(name, shape, **kwargs).eval()
    with torch.no_grad():
        assert model(x).shape == out


# ---------------------------------------------------------------- parameter counts


def test_mlp_param_counts_match_paper_configs():
    def count(widths):
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

    assert num_params(build("mlp", DIGITS, hidden=[128, 128])) == count([64, 128, 128, 10])
    assert num_params(build("mlp", MNIST, hidden=[256, 256])) == count([784, 256, 256, 10])
    assert num_params(build("mlp", PROTEIN, hidden=[256, 256])) == count([9, 256, 256, 1])


def test_cnn_param_count():
    expected = (
        conv(3, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32)
        + conv(32, 64, 3) + bn(64)
        + conv(64, 128, 3) + bn(128)
        + 128 * 10 + 10
    )  # fmt: skip
    n = num_params(build("cnn", CIFAR))
    assert n == expected == 104_042  # the count docs/experiments.md states


def test_resnet18_param_count_from_layer_shapes():
    total = conv(3, 64, 3) + bn(64)  # CIFAR stem
    c_in = 64
    for i, c in enumerate([64, 128, 256, 512]):
        stride = 1 if i == 0 else 2
        total += conv(c_in, c, 3) + bn(c) + conv(c, c, 3) + bn(c)
        if stride != 1 or c_in != c:
            total += conv(c_in, c, 1) + bn(c)  # projection shortcut
        total += 2 * (conv(c, c, 3) + bn(c))  # second BasicBlock
        c_in = c
    total += 512 * 10 + 10
    assert num_params(build("resnet18", CIFAR)) == total
    assert round(total / 1e6, 2) == 11.17


def test_resnet18_matches_torchvision_with_cifar_stem():
    torchvision = pytest.importorskip("torchvision")
    ref = torchvision.models.resnet18(num_classes=10)
    ref.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    ref.maxpool = nn.Identity()
    ours = build("resnet18", CIFAR)
    assert num_params(ours) == num_params(ref)
    # Same tensor shapes, in the same order, up to naming.
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]


def test_lstm_param_counts():
    V = 10_000
    small = build("lstm", PTB, size="small")
    h = 200
    assert num_params(small) == V * h + lstm_layer(h, h) * 2 + h * V + V
    medium = build("lstm", PTB, size="medium")
    h = 650  # tied: the output layer reuses the embedding, only its bias is new
    assert num_params(medium) == V * h + lstm_layer(h, h) * 2 + V
    assert medium.head.weight is medium.embed.weight


def test_llama_124m_preset_count():
    V, d, L = 50_257, 768, 12
    ffn = 64 * math.ceil(int(8 * d / 3) / 64)  # 8/3·d rounded up to a multiple of 64
    assert ffn == 2048
    per_layer = 4 * d * d + 3 * d * ffn + 2 * d  # q,k,v,o; gate, up, down; two RMSNorms
    expected = V * d + L * per_layer + d  # tied embedding/head, final norm
    with torch.device("meta"):  # shapes only, no memory or init time
        model = build("llama", FINEWEB, size="gpt2_124m")
        untied = build("llama", FINEWEB, size="gpt2_124m", tied=False)
    assert num_params(model) == expected == 123_551_232
    assert abs(expected - 124e6) / 124e6 < 0.05
    assert num_params(model, exclude_embeddings=True) == L * per_layer + d
    assert num_params(untied) == expected + V * d


# ---------------------------------------------------------------- decoder


def tiny_llama(vocab: int = 50, **kwargs) -> nn.Module:
    return build("llama", Shape((), vocab), size="tiny", **kwargs)


def test_decoder_is_causal():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    x = torch.randint(0, 50, (2, 12))
    t = 7
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % 50
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t] - b[:, t]).abs().max() > 1e-4  # the change is seen from t on


def test_decoder_rejects_too_long_input_and_ties_by_default():
    model = tiny_llama()
    assert model.head.weight is model.embed.weight
    with pytest.raises(ValueError, match="context_length=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    head_dim = 16
    cos, sin = rope_cache(head_dim, 64)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(m: int, n: int) -> torch.Tensor:
        qm = apply_rope(q.view(1, head_dim), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, head_dim), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for m, n in [(3, 1), (10, 10), (5, 20)]:
        for shift in (1, 7, 30):
            torch.testing.assert_close(score(m + shift, n + shift), score(m, n))
    assert abs(score(3, 1) - score(4, 1)) > 1e-3  # and they do depend on the offset
    # A rotation preserves norms and position 0 is the identity.
    torch.testing.assert_close(apply_rope(q.view(1, -1), cos[:1], sin[:1]), q.view(1, -1))
    rotated = apply_rope(q.expand(64, -1), cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm().expand(64))


# ---------------------------------------------------------------- LSTM state


def small_lstm(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build("lstm", Shape((), 40), hidden=16, **kwargs)


def test_stateful_lstm_carries_and_resets_state():
    model = small_lstm().eval()
    x = torch.randint(0, 40, (3, 10))
    with torch.no_grad():
        full = model(x)  # one pass over 10 steps
        model.reset_state()
        a, b = model(x[:, :5]), model(x[:, 5:])  # two windows, state carried
        torch.testing.assert_close(torch.cat([a, b], dim=1), full)
        model.reset_state()
        fresh = model(x[:, 5:])
        assert (fresh - b).abs().max() > 1e-4  # reset really forgets
        model.reset_state()
        model(x[:, :5])
        smaller = model(x[:2, 5:])  # batch-size change starts from zeros
        torch.testing.assert_close(smaller, fresh[:2])


def test_stateful_lstm_detaches_between_calls():
    model = small_lstm().train()
    x = torch.randint(0, 40, (3, 10))
    model(x[:, :5]).sum().backward()
    # Without detaching, this backward would run into the freed graph of the first call.
    model(x[:, 5:]).sum().backward()


def test_lstm_keeps_training_state_apart_from_evaluation():
    x = torch.randint(0, 40, (3, 15))
    model = small_lstm()
    with torch.no_grad():
        model(x[:, :5])
        expected = model(x[:, 10:])
        model.reset_state()
        model(x[:, :5])
        model.eval()
        model(x[:, 5:10])
        model.train()
        got = model(x[:, 10:])
    torch.testing.assert_close(got, expected)


def test_stateless_lstm_and_init_and_tying():
    model = small_lstm(stateful=False).eval()
    x = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))
    assert all(p.abs().max() <= 0.1 for p in model.parameters())  # Zaremba's uniform init
    with pytest.raises(ValueError, match="embed_dim == hidden"):
        small_lstm(tied=True, embed_dim=8)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("mlp", CIFAR, {"flatten": False}),
        ("mlp", PTB, {}),
        ("cnn", Shape((784,), 10), {}),
        ("cnn", Shape((3, 4, 4), 10), {}),
        ("resnet18", DIGITS, {}),
        ("lstm", CIFAR, {}),
        ("llama", Shape((64,), 10), {}),
    ],
)
def test_shape_mismatch_is_one_line_value_error(name, shape, kwargs):
    with pytest.raises(ValueError) as err:
        build(name, shape, **kwargs)
    msg = str(err.value)
    assert "\n" not in msg and f"'{name}'" in msg and str(shape.input_shape) in msg


def test_bad_names_and_options():
    with pytest.raises(ValueError, match="known: .*'llama'"):
        build("transformer", CIFAR)
    with pytest.raises(ValueError, match="unknown option.*'depth'"):
        build("cnn", CIFAR, depth=3)
    with pytest.raises(ValueError, match="activation 'swish'"):
        build("mlp", DIGITS, activation="swish")
    with pytest.raises(ValueError, match="size 'huge'"):
        build("llama", FINEWEB, size="huge")
    with pytest.raises(ValueError, match="size 'large'"):
        build("lstm", PTB, size="large")


# ---------------------------------------------------------------- FLOPs


def test_flops_per_token_hand_count():
    cfg = LlamaConfig(
        vocab_size=32, context_length=16, d_model=16, n_layers=2, n_heads=2, multiple_of=16
    )
    # By hand: ffn = 8/3·16 = 42.7 → 48. Matmul weights per layer: q,k,v,o 4·16·16 = 1024;
    # gate, up, down 3·16·48 = 2304. Two layers 6656, lm head 16·32 = 512: N = 7168.
    # Attention at T = 16: 12 · 2 layers · 2 heads · 8 head dim · 16 = 6144.
    hand = 6 * 7168 + 6144
    assert flops_per_token(cfg, 16) == hand == 49_152
    model = build(
        "llama", Shape((), 32), size="tiny", d_model=16, context_length=16, multiple_of=16
    )
    assert flops_per_token(model, 16) == hand
    assert flops_per_token(model) == hand  # seq_len defaults to the context length


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_matches_torch_flop_counter(tied):
    torch.manual_seed(0)
    model = build("llama", Shape((), 64), size="tiny", d_model=32, tied=tied)
    B, T = 2, 24
    x = torch.randint(0, 64, (B, T))
    # The math backend spells attention as matmuls the counter can see (the fused CPU kernel
    # is not counted); it computes the full T×T scores, as the PaLM estimate assumes.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).square().mean().backward()
    assert counter.get_total_flops() == flops_per_token(model, T) * B * T


def test_mfu_and_peak_table():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H200") == device_peak_flops("H100")
    assert device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert mfu(1000.0, 6e9, "NVIDIA A100-SXM4-40GB") == pytest.approx(6e12 / 312e12)
    with pytest.raises(ValueError, match="no peak FLOP/s known"):
        device_peak_flops("Tesla T4")
    with pytest.raises(ValueError, match="LlamaConfig"):
        flops_per_token(build("cnn", CIFAR), 8)


# ---------------------------------------------------------------- gradients flow


def classification(n_in_shape, classes=4, n=16):
    return torch.randn(n, *n_in_shape), torch.randint(0, classes, (n,)), F.cross_entropy


def language(vocab=20, batch=4, length=12):
    stream = torch.randint(0, vocab, (batch, length + 1))

    def lm_loss(logits, y):
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())

    return stream[:, :-1], stream[:, 1:], lm_loss


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "data"),
    [
        ("mlp", Shape((8,), 4), {"hidden": [32]}, lambda: classification((8,))),
        ("mlp", Shape((9,), 1), {"hidden": [32]}, lambda: (*classification((9,))[:1], torch.randn(16, 1), F.mse_loss)),
        ("cnn", Shape((3, 8, 8), 4), {"channels": [8, 8, 8]}, lambda: classification((3, 8, 8))),
        ("resnet18", Shape((3, 8, 8), 4), {"width": 4}, lambda: classification((3, 8, 8), n=8)),
        ("lstm", Shape((), 20), {"hidden": 64, "stateful": False}, language),
        ("llama", Shape((), 20), {"size": "tiny", "d_model": 32, "context_length": 16}, language),
    ],
)  # fmt: skip
def test_tiny_model_overfits_tiny_batch(name, shape, kwargs, data):
    torch.manual_seed(0)
    x, y, loss_fn = data()
    model = build(name, shape, **kwargs).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(50):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], f"{name}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_resetting_the_evaluation_state_keeps_the_training_state():
    x = torch.randint(0, 40, (3, 15))
    model = small_lstm()
    with torch.no_grad():
        model(x[:, :5])
        expected = model(x[:, 10:])
        model.reset_state()
        model(x[:, :5])
        model.eval()
        first = model(x[:, 5:10])
        model.reset_state(training=False)  # what the trainer does before every evaluation
        again = model(x[:, 5:10])
        model.train()
        got = model(x[:, 10:])
    torch.testing.assert_close(again, first)
    torch.testing.assert_close(got, expected)
