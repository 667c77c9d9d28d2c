"""GPU training throughput of LEHI next to Adam on the Llama decoder: tokens/s, peak memory, MFU.

Every optimizer trains its own copy of one initial model (lehi.models "llama") on the same
synthetic random tokens with the trainer's step: one bf16-autocast forward, the loss in
float32, ``lehi.optim.backward(opt, loss, logits, targets)`` (the auxiliary backward of a
curvature-aware optimizer included), gradient clipping to norm 1.0, ``opt.step()``. Adam and
AdamW use torch's fused CUDA kernels, LEHI, LEHIBrid and SophiaG their foreach paths.

Measures, per optimizer:
- tokens/s: blocks of ``--steps`` steps timed with CUDA events (the GPU's own clock; the
  host waits only at the end of a block). The optimizers take turns block by block, in a
  rotated order each repeat, so drift in the GPU's clock hits all alike; a ratio to Adam is
  the median over repeats of the per-repeat ratio, the absolute numbers are medians too.
- peak memory: torch.cuda.max_memory_allocated over building the model and the optimizer
  and the warm-up steps, run for one optimizer at a time and counted above what was
  allocated before it (the other optimizers' copies, idle and without gradients).
- MFU: the model's training FLOPs (6N + attention, lehi.models.flops) per second over the
  device's peak bf16 FLOP/s. The auxiliary backward is overhead, not model FLOPs, so it
  lowers the MFU of a curvature-aware optimizer instead of being counted as useful work.

``--compile`` wraps every model in torch.compile, with AOTAutograd's donated buffers off for
all of them: the auxiliary pass backpropagates a second time through the same graph.

Only cost is measured: the default learning rate is tiny so hundreds of steps on random
tokens stay finite for every optimizer (LEHI's early steps can exceed Adam's by up to
sqrt(N), N = tokens per batch).

    python benchmarks/gpu_throughput.py                        # gpt2_124m, batch 8 x 1024
    python benchmarks/gpu_throughput.py --compile --optimizers adam,lehi
    python benchmarks/gpu_throughput.py --allow-cpu --size tiny --steps 3 --warmup 1 \
        --batch 2 --context 32                                  # CPU smoke run of this script

Without a CUDA device it exits with status 2 and one line, unless ``--allow-cpu`` is given
with ``--size tiny`` (then everything runs on the CPU, with wall-clock timing and no
memory or MFU numbers).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import lehi.models
from lehi.models.flops import device_peak_flops, flops_per_token, mfu
from lehi.optim import LEHI, LEHIBrid, SophiaG, backward

SIZES = ("gpt2_124m", "small", "tiny")
OPTIMIZERS = ("adam", "adamw", "lehi", "lehibrid", "sophia")
#: The update path each optimizer takes on CUDA (on the CPU every one runs foreach).
PATHS = {
    "adam": "fused",
    "adamw": "fused",
    "lehi": "foreach",
    "lehibrid": "foreach",
    "sophia": "foreach",
}
SAMPLERS = ("multinomial", "inverse_cdf")
GRAD_CLIP = 1.0
POOL = 4  # distinct batches the steps cycle through
GIB = 2**30


def build_optimizer(
    name: str, params: Iterable[Tensor], device: torch.device, lr: float, sampler: str
) -> torch.optim.Optimizer:
    """The contender ``name`` on its fastest path for ``device``."""
    params = list(params)
    cuda = device.type == "cuda"
    # torch's fused Adam(W) is its fastest CUDA step; the CPU smoke run keeps foreach.
    fast = {"fused": True} if cuda else {"foreach": True}
    curvature = dict(lr=lr, foreach=True, sampler=sampler, seed=0)
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adam": lambda: torch.optim.Adam(params, lr=lr, **fast),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=0.1, **fast),
        "lehi": lambda: LEHI(params, **curvature),
        "lehibrid": lambda: LEHIBrid(params, **curvature),
        "sophia": lambda: SophiaG(params, **curvature),
    }
    return factories[name]()


@dataclass
class Contender:
    """One optimizer with its own copy of the model, and what was measured for it."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    peak_bytes: int | None = None
    seconds: list[float] = field(default_factory=list)
    last_loss: float = float("nan")


class Clock:
    """Times a block of GPU work with CUDA events, or wall-clock time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._start: torch.cuda.Event | float | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def stop(self) -> float:
        """Seconds since :meth:`start`, once the device has finished the work."""
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self._start.elapsed_time(end) / 1e3
        return time.perf_counter() - self._start


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    autocast: AbstractContextManager,
) -> Tensor:
    """The trainer's step (lehi.train.Trainer.train_step) with clipping to GRAD_CLIP."""
    opt.zero_grad(set_to_none=True)
    with autocast:
        logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    backward(opt, loss, logits, y)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return loss.detach()


def fail(message: str) -> None:
    """One line on stderr and exit status 2 (bad usage or no usable device)."""
    print(f"gpu_throughput: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=SIZES, default="gpt2_124m", help="llama preset")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--context", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per optimizer")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks per optimizer")
    parser.add_argument("--compile", action="store_true", help="torch.compile each model")
    parser.add_argument(
        "--optimizers",
        default="adam,lehi,lehibrid",
        help=f"comma-separated, from {', '.join(OPTIMIZERS)}; ratios are to adam "
        "(or to the first one when adam is not listed)",
    )
    parser.add_argument("--lr", type=float, default=1e-6, help="learning rate of every optimizer")
    parser.add_argument("--sampler", choices=SAMPLERS, default="multinomial")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary (GPT-2 BPE)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without CUDA, run --size tiny on the CPU"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names or len(set(names)) != len(names):
        fail(f"--optimizers={args.optimizers!r}: give distinct names from {', '.join(OPTIMIZERS)}")
    args.optimizers = names
    lows = {"batch": 1, "context": 2, "steps": 1, "warmup": 1, "repeats": 1, "vocab": 2}
    for key, low in lows.items():
        if getattr(args, key) < low:
            fail(f"--{key} must be >= {low}, got {getattr(args, key)}")
    if not args.lr > 0:
        fail(f"--lr must be > 0, got {args.lr}")
    return args


def pick_device(args: argparse.Namespace) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not args.allow_cpu:
        fail(
            f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "run on a GPU machine, or pass --allow-cpu --size tiny for a CPU smoke run"
        )
    if args.size != "tiny":
        fail(f"--allow-cpu runs only --size tiny on the CPU, got --size {args.size}")
    return torch.device("cpu")


def keep_saved_buffers_for_a_second_backward() -> None:
    """Let a compiled model's backward run twice over one graph.

    AOTAutograd donates (reuses in place) the buffers saved for the backward by default,
    which forbids the ``retain_graph=True`` backward that the auxiliary pass of a
    curvature-aware optimizer runs through the same graph ("compiled with non-empty donated
    buffers which requires ... retain_graph=False"). Set for every contender, so all are
    compiled alike.
    """
    from torch._functorch import config

    if hasattr(config, "donated_buffer"):
        config.donated_buffer = False


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def prime(base: nn.Module, batch: tuple[Tensor, Tensor], autocast, device) -> None:
    """One forward and backward on a throwaway copy: the first kernels' one-off setup
    (cuBLAS handles and workspace, attention kernels) is then nobody's peak memory."""
    model = copy.deepcopy(base).to(device)
    x, y = batch
    with autocast:
        logits = model(x)
    F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1)).backward()
    del model, logits
    free_memory(device)


def build_contenders(
    args: argparse.Namespace,
    base: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    autocast,
    device: torch.device,
) -> list[Contender]:
    """Each optimizer on its own model copy, warmed up alone so its peak memory is its own."""
    contenders = []
    cuda = device.type == "cuda"
    for name in args.optimizers:
        free_memory(device)
        if cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        model = copy.deepcopy(base).to(device)
        if args.compile:
            model = torch.compile(model)
        opt = build_optimizer(name, model.parameters(), device, args.lr, args.sampler)
        for step in range(args.warmup):
            x, y = batches[step % len(batches)]
            train_step(model, opt, x, y, autocast)
        contender = Contender(name, model, opt)
        if cuda:
            torch.cuda.synchronize()
            contender.peak_bytes = torch.cuda.max_memory_allocated() - before
        opt.zero_grad(set_to_none=True)
        contenders.append(contender)
    return contenders


def time_interleaved(
    args: argparse.Namespace,
    contenders: list[Contender],
    batches: list[tuple[Tensor, Tensor]],
    autocast,
    device: torch.device,
) -> None:
    """``repeats`` rounds; each round every contender runs one timed block of ``steps``."""
    clock = Clock(device)
    for repeat in range(args.repeats):
        shift = repeat % len(contenders)
        for c in contenders[shift:] + contenders[:shift]:
            clock.start()
            for step in range(args.steps):
                x, y = batches[step % len(batches)]
                loss = train_step(c.model, c.opt, x, y, autocast)
            c.seconds.append(clock.stop())
            c.last_loss = loss.item()
            c.opt.zero_grad(set_to_none=True)


def report(
    args: argparse.Namespace,
    contenders: list[Contender],
    base: nn.Module,
    device: torch.device,
) -> str:
    """The Markdown table: absolute numbers per optimizer and ratios to the baseline."""
    tokens = args.batch * args.context * args.steps
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    peak_flops = None
    if device.type == "cuda":
        try:
            peak_flops = device_peak_flops(device_name)
        except ValueError:
            peak_flops = None
    model_flops = flops_per_token(base.config, args.context)
    baseline = next((c for c in contenders if c.name == "adam"), contenders[0])
    compiled = "on, no donated buffers" if args.compile else "off"
    lines = [
        f"## Training throughput: llama {args.size} "
        f"({lehi.models.num_params(base) / 1e6:.1f}M parameters, vocab {args.vocab})",
        "",
        f"device: {device_name} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
        f"bf16 autocast | compile: {compiled} | batch {args.batch} x context {args.context} "
        f"| {args.repeats} interleaved blocks of {args.steps} steps "
        f"after {args.warmup} warm-up | lr {args.lr:g} | sampler {args.sampler}",
        "",
        f"| optimizer | ms/step | tokens/s | tokens/s ÷ {baseline.name} | MFU "
        f"| peak memory (GiB) | peak memory ÷ {baseline.name} | curvature passes | last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contenders:
        seconds = statistics.median(c.seconds)
        tokens_per_s = tokens / seconds
        speed_ratio = statistics.median(
            b / s for s, b in zip(c.seconds, baseline.seconds, strict=True)
        )
        util = "n/a" if peak_flops is None else f"{mfu(tokens_per_s, model_flops, peak_flops):.1%}"
        if c.peak_bytes is None:
            memory, memory_ratio = "n/a", "n/a"
        else:
            memory = f"{c.peak_bytes / GIB:.2f}"
            memory_ratio = f"{c.peak_bytes / baseline.peak_bytes:.2f}"
        path = PATHS[c.name] if device.type == "cuda" else "foreach"
        lines.append(
            f"| {c.name} ({path}) | {1e3 * seconds / args.steps:.2f} | {tokens_per_s:,.0f} "
            f"| {speed_ratio:.3f} | {util} | {memory} | {memory_ratio} "
            f"| {getattr(c.opt, 'curvature_passes', 0)} | {c.last_loss:.4f} |"
        )
    if device.type != "cuda":
        lines += ["", "CPU smoke run: wall-clock timing, no memory or MFU numbers."]
    elif peak_flops is None:
        lines += ["", f"MFU: no peak FLOP/s known for {device_name!r} (lehi.models.flops)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = pick_device(args)
    torch.manual_seed(0)
    shape = SimpleNamespace(input_shape=(), num_outputs=args.vocab)
    base = lehi.models.build("llama", shape, size=args.size, context_length=args.context)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(POOL):
        tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g)
        tokens = tokens.to(device)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if args.compile:
        keep_saved_buffers_for_a_second_backward()
    prime(base, batches[0], autocast, device)
    contenders = build_contenders(args, base, batches, autocast, device)
    time_interleaved(args, contenders, batches, autocast, device)
    print(report(args, contenders, base, device))


if __name__ == "__main__":
    main()
