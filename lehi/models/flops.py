"""Parameter counts, training FLOPs per token and model FLOPs utilisation (MFU).

Training FLOPs per token follow the PaLM paper (Chowdhery et al. 2022, appendix B) as used
by nanoGPT's ``estimate_mfu``:

    flops_per_token = 6·N + 12·L·H·Q·T

N counts the weights that take part in a matrix multiply: every Linear weight, the lm head
included (for tied embeddings that is the embedding matrix, used once as the output layer).
The embedding lookup and the RMSNorm gains do no matmul, so they are left out. Each weight
costs 2 FLOPs per token forward (multiply + add) and 4 backward (gradients of input and
weight): 6·N. Attention adds q·kᵀ and the weighted sum of v: 2 matmuls of 2·T·Q FLOPs per
head, layer and token forward, ×3 with the backward: 12·L·H·Q·T, with L layers, H heads,
head size Q and sequence length T. The causal mask's skipped half is counted, as in PaLM.
Activation recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from __future__ import annotations

from torch import nn

from lehi.models.llama import LlamaConfig

# Peak dense bf16 tensor-core FLOP/s (no sparsity), SXM parts. The H200 has the H100's
# compute with more and faster memory.
PEAK_FLOPS: dict[str, float] = {"A100": 312e12, "H100": 989e12, "H200": 989e12}


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once).

    ``exclude_embeddings`` drops nn.Embedding tables (Kaplan et al.'s non-embedding N); for a
    tied model this also drops the lm head, which is the same tensor.
    """
    skip = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def matmul_params(model_or_cfg: nn.Module | LlamaConfig) -> int:
    """N of the FLOP estimate: the weights used in matrix multiplies (see module docstring)."""
    if isinstance(model_or_cfg, LlamaConfig):
        c = model_or_cfg
        per_layer = 4 * c.d_model**2 + 3 * c.d_model * c.ffn_hidden  # qkv + proj, gate/up/down
        return c.n_layers * per_layer + c.d_model * c.vocab_size  # + lm head
    weights = {id(m.weight): m.weight for m in model_or_cfg.modules() if isinstance(m, nn.Linear)}
    return sum(w.numel() for w in weights.values())


def flops_per_token(model_or_cfg: nn.Module | LlamaConfig, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token: 6·N + 12·L·H·Q·T.

    Takes a LlamaConfig or a model with such a ``config``; ``seq_len`` defaults to the
    config's context length.
    """
    cfg = (
        model_or_cfg
        if isinstance(model_or_cfg, LlamaConfig)
        else getattr(model_or_cfg, "config", None)
    )
    if not isinstance(cfg, LlamaConfig):
        raise ValueError(
            f"flops_per_token needs a LlamaConfig or a Llama model, got {type(model_or_cfg).__name__}"
        )
    T = cfg.context_length if seq_len is None else seq_len
    return 6.0 * matmul_params(model_or_cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * T


def device_peak_flops(device_name: str) -> float:
    """Peak bf16 FLOP/s of a device, matched by name (e.g. torch.cuda.get_device_name())."""
    for key, value in PEAK_FLOPS.items():
        if key.lower() in device_name.lower():
            return value
    raise ValueError(
        f"no peak FLOP/s known for device {device_name!r}; known: {sorted(PEAK_FLOPS)}"
    )


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | str) -> float:
    """Model FLOPs utilisation: achieved training FLOP/s over the device's peak.

    ``peak_flops`` is FLOP/s or a device name looked up in PEAK_FLOPS.
    """
    peak = device_peak_flops(peak_flops) if isinstance(peak_flops, str) else float(peak_flops)
    return tokens_per_s * flops_per_token / peak
