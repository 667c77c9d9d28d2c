"""Llama-style decoder-only transformer (Touvron et al. 2023), nanoGPT-sized.

    tokens (B, T) → embedding → L × [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))]
                  → RMSNorm → lm head (tied to the embedding by default) → logits (B, T, V)

No biases, no learned positions: rotary embeddings (RoPE, Su et al. 2021) rotate q and k so
attention scores depend only on relative position. Causal attention through
F.scaled_dot_product_attention(is_causal=True). SwiGLU hidden width: 8/3·d rounded up to a
multiple of ``multiple_of``. Init as nanoGPT: N(0, 0.02), residual output projections scaled
by 1/sqrt(2L) so the residual stream's variance does not grow with depth.

Presets (vocab from the dataset; 50,257 for GPT-2 BPE):
    tiny       d=64,  2 layers,  2 heads, context 64     CPU tests
    small      d=128, 4 layers,  4 heads, context 128    CPU experiment preset
    gpt2_124m  d=768, 12 layers, 12 heads, context 2048  the paper-scale run: 123,551,232
               parameters with tied 50,257 vocab (embedding 38,597,376 + 12 × 7,079,424
               per layer + final norm 768)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class LlamaConfig:
    """Shape of a decoder; ``ffn_hidden`` and ``head_dim`` follow from it."""

    vocab_size: int
    context_length: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    multiple_of: int = 64
    tied: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_hidden(self) -> int:
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


PRESETS: dict[str, dict] = {
    "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 2, "context_length": 64},
    "small": {"d_model": 128, "n_layers": 4, "n_heads": 4, "context_length": 128},
    "gpt2_124m": {"d_model": 768, "n_layers": 12, "n_heads": 12, "context_length": 2048},
}


def rope_cache(
    head_dim: int, length: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos·θ^(-2i/head_dim), each (length, head_dim/2)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (..., T, head_dim) by position angles.

    Pairing adjacent dimensions is Meta's complex-number form. Done in float32 so bf16
    activations do not lose the phase at long positions.
    """
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
            for t in self.qkv(x).split(C, dim=2)
        )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only language model; forward maps (B, T) token ids to (B, T, V) logits."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        if cfg.d_model % cfg.n_heads or cfg.head_dim % 2:
            raise ValueError(
                f"llama d_model={cfg.d_model} must split into n_heads={cfg.n_heads} heads of even size"
            )
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tied:
            self.head.weight = self.embed.weight
        # Not persistent: recomputed from the config, so checkpoints stay small.
        cos, sin = rope_cache(cfg.head_dim, cfg.context_length, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for block in self.blocks:
            for residual_out in (block.attn.proj, block.mlp.down):
                nn.init.normal_(residual_out.weight, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 with T <= context_length → (B, T, vocab_size) logits."""
        T = idx.shape[1]
        if T > self.config.context_length:
            raise ValueError(
                f"llama input length {T} exceeds context_length={self.config.context_length}"
            )
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.head(self.norm(x))


def build(
    input_shape: tuple[int, ...],
    num_outputs: int,
    size: str = "gpt2_124m",
    d_model: int | None = None,
    n_layers: int | None = None,
    n_heads: int | None = None,
    context_length: int | None = None,
    multiple_of: int = 64,
    tied: bool = True,
    norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
) -> Llama:
    """Llama from a preset (``size``); d_model/n_layers/n_heads/context_length override it."""
    if tuple(input_shape) != ():
        raise ValueError(
            f"model 'llama' does not fit input_shape {tuple(input_shape)}: it needs a token "
            "dataset (input_shape ())"
        )
    if size not in PRESETS:
        raise ValueError(f"llama size {size!r} is unknown; allowed: {sorted(PRESETS)}")
    overrides = {
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "context_length": context_length,
    }
    shape = {**PRESETS[size], **{k: v for k, v in overrides.items() if v is not None}}
    cfg = LlamaConfig(
        vocab_size=num_outputs,
        multiple_of=multiple_of,
        tied=tied,
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        **shape,
    )
    return Llama(cfg)
