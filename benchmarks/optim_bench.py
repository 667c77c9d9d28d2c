"""What LEHI costs next to Adam: step time, training-iteration time and peak memory.

Every ratio is measured side by side in one process: the two contenders are built from the
same initial weights and the same batch, warmed up, then called in alternation (A B A B …,
then B A B A … in the next repeat), so that drift in the machine's speed hits both alike. A
ratio is the median over repeats of the per-repeat ratio; the absolute times are medians too.

    python benchmarks/optim_bench.py                 # the README table (2 threads, ~2-3 min)
    python benchmarks/optim_bench.py --quick         # a fast smoke run
    python benchmarks/optim_bench.py --device cuda   # on a GPU

Measures:
- step: ``opt.step()`` alone on ~10M parameters in 50 tensors whose ``.grad`` holds fixed
  random tensors. LEHI's curvature is folded once beforehand by a real auxiliary pass (its
  fold belongs to ``optimizer.backward``, timed in the iteration rows); ``hessian_every`` is
  set beyond the run so no later step asks for a refresh.
- iteration: zero_grad + forward + backward (+ the auxiliary backward and fold on refresh
  steps) + step, for an MLP 784-1024-1024-10 (batch 128) and a small Llama decoder
  (lehi.models "llama" size "small", batch 8 × 128 tokens, vocabulary 4096). With
  ``hessian_every`` = k a repeat is k iterations per side, exactly one of which refreshes the
  curvature. LEHI, LEHIBrid and SophiaG run with their default label sampler
  (``inverse_cdf``, see lehi.curvature), which the table's header line names.
- peak memory: everything allocated from building the model and optimizer through three
  iterations (the first refreshes the curvature), as the peak of the running sum of the
  allocator's events (CPU: torch.profiler's memory events, which see every allocation of
  torch's CPU allocator, autograd's buffers included; CUDA: max_memory_allocated).

LEHI's one-time warning checks the size of its first ``WATCHED_STEPS`` updates (one read of m
and v per tensor on each); every workload runs those steps before it is timed, and the step
row "LEHI / LEHI (no warning)" shows what the check costs afterwards: nothing.

Both sides of every comparison use ``foreach=True`` (torch's multi-tensor path; on CPU it
is not the default) unless the row names ``fused`` (torch's fused Adam kernel) or
``compile`` (LEHI's torch.compile step, compiled during the warm-up).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import lehi.models
from lehi.optim import LEHI, CurvatureOptimizer, LEHIBrid, SophiaG, backward
from lehi.optim.update_watch import WATCHED_STEPS

STEP_SHAPES = [(640, 620), (640,)] * 25  # 50 tensors, 9,936,000 parameters
# Only cost is measured: a tiny learning rate keeps hundreds of steps on one repeated batch
# finite for every optimizer (pure LEHI takes steps up to sqrt(N) times Adam's).
LR = 1e-6
VOCAB = 4096  # a PTB-sized vocabulary order of magnitude; the head is a large share of FLOPs


@dataclass
class Row:
    """One line of the table: contender A against baseline B."""

    measure: str
    workload: str
    a_name: str
    b_name: str
    a_value: float
    b_value: float
    ratio: float
    unit: str
    target: float | None


# ------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(
    run_a: Callable[[], None],
    run_b: Callable[[], None],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    block: int = 1,
) -> tuple[float, float, float]:
    """Median ms of a block of ``block`` calls of each, and the median per-block ratio A/B.

    The calls alternate one by one (A B A B …, then B A B A … in the next block), so even
    within a block both sides see the same moments of the machine.
    """
    for _ in range(warmup * block):
        run_a()
        run_b()
    times: dict[str, list[float]] = {"a": [], "b": []}
    gc.collect()
    gc.disable()  # a collection inside one side's timing would be charged to it alone
    try:
        for r in range(repeats):
            order = (("a", run_a), ("b", run_b)) if r % 2 == 0 else (("b", run_b), ("a", run_a))
            total = {"a": 0.0, "b": 0.0}
            for _ in range(block):
                for key, run in order:
                    _sync(device)
                    start = time.perf_counter()
                    run()
                    _sync(device)
                    total[key] += (time.perf_counter() - start) * 1e3
            times["a"].append(total["a"])
            times["b"].append(total["b"])
    finally:
        gc.enable()
    ratio = statistics.median(a / b for a, b in zip(times["a"], times["b"]))
    return statistics.median(times["a"]), statistics.median(times["b"]), ratio


# ------------------------------------------------------------------------------ memory
@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler backend's own log lines, which it writes straight to fd 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(run: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensor storage alive at once while ``run`` executes (its own allocations).

    CPU: every allocation and free of torch's CPU allocator is a profiler memory event with
    a signed size; the running sum in time order is the memory held, its maximum the peak.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    )
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


# --------------------------------------------------------------------------- workloads
#: The contenders: name → (label, constructor). Learning rates are tiny: only cost counts.
CONTENDERS: dict[str, tuple[str, Callable[[list[Tensor], int], torch.optim.Optimizer]]] = {
    "adam": ("Adam (foreach)", lambda ps, k: torch.optim.Adam(ps, lr=LR, foreach=True)),
    "adam_fused": ("Adam (fused)", lambda ps, k: torch.optim.Adam(ps, lr=LR, fused=True)),
    "adamw": (
        "AdamW (foreach)",
        lambda ps, k: torch.optim.AdamW(ps, lr=LR, weight_decay=0.1, foreach=True),
    ),
    "lehi": (
        "LEHI (foreach)",
        lambda ps, k: LEHI(ps, lr=LR, hessian_every=k, foreach=True, seed=0),
    ),
    "lehi_unwatched": (
        "LEHI (foreach, no warning)",
        lambda ps, k: LEHI(
            ps, lr=LR, hessian_every=k, foreach=True, seed=0, warn_update_above=None
        ),
    ),
    "lehi_compile": (
        "LEHI (compile)",
        lambda ps, k: LEHI(ps, lr=LR, hessian_every=k, compile=True, seed=0),
    ),
    "lehibrid": (
        "LEHIBrid (foreach)",
        lambda ps, k: LEHIBrid(ps, lr=LR, hessian_every=k, foreach=True, seed=0),
    ),
    "sophia": (
        "SophiaG (foreach)",
        lambda ps, k: SophiaG(ps, lr=LR, hessian_every=k, foreach=True, seed=0),
    ),
}


def make_optimizer(spec: str, params: list[Tensor], hessian_every: int) -> torch.optim.Optimizer:
    return CONTENDERS[spec][1](params, hessian_every)


def past_the_watched_steps(run: Callable[[], None]) -> None:
    """Run the steps LEHI's update-size warning checks, so that timing starts after them (the
    tiny lr makes their warning meaningless here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(WATCHED_STEPS):
            run()


def step_workload(spec: str, device: torch.device) -> Callable[[], None]:
    """``opt.step`` on the 50-tensor parameter set with fixed random gradients."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in STEP_SHAPES]
    grads = [torch.randn(s, generator=gen).mul_(1e-3).to(device) for s in STEP_SHAPES]
    opt = make_optimizer(spec, params, hessian_every=10**9)
    if isinstance(opt, CurvatureOptimizer):
        # One real curvature pass: a loss that reads every tensor, so every state is folded.
        coef = torch.linspace(-1.0, 1.0, len(params), device=device)
        logits = torch.stack([(p.mean() * c) for p, c in zip(params, coef)]).unsqueeze(0)
        target = torch.zeros(1, dtype=torch.long, device=device)
        opt.backward(F.cross_entropy(logits, target), logits, target)
    for p, g in zip(params, grads):
        p.grad = g
    past_the_watched_steps(opt.step)
    return opt.step


MODELS = {
    "mlp": "MLP 784-1024-1024-10, batch 128",
    "llama": f"Llama small (d=128, 4 layers), batch 8×128 tokens, vocab {VOCAB}",
}


def build_model(name: str, device: torch.device) -> tuple[nn.Module, Tensor, Tensor]:
    """A model and one fixed batch (inputs, targets) for it."""
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    if name == "mlp":
        bundle = SimpleNamespace(input_shape=(784,), num_outputs=10)
        model = lehi.models.build("mlp", bundle, hidden=(1024, 1024))
        x = torch.randn(128, 784, generator=gen)
        y = torch.randint(0, 10, (128,), generator=gen)
    else:
        bundle = SimpleNamespace(input_shape=(), num_outputs=VOCAB)
        model = lehi.models.build("llama", bundle, size="small")
        tokens = torch.randint(0, VOCAB, (8, 129), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
    return model.to(device), x.to(device), y.to(device)


def iteration(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One training iteration as the suite's trainer runs it."""
    opt.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    backward(opt, loss, out, y)
    opt.step()


def iteration_workload(
    model: nn.Module, x: Tensor, y: Tensor, spec: str, hessian_every: int
) -> tuple[Callable[[], None], Callable[[], None]]:
    """One training iteration on a private copy of ``model``, and a check that it is finite."""
    model = copy.deepcopy(model)
    opt = make_optimizer(spec, list(model.parameters()), hessian_every)

    def check() -> None:
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            raise RuntimeError(f"{spec} diverged: timings of non-finite arithmetic are void")

    def run() -> None:
        iteration(model, opt, x, y)

    past_the_watched_steps(run)
    return run, check


def training_peak(model_name: str, spec: str, hessian_every: int, device: torch.device) -> int:
    """Peak bytes from building model and optimizer through three training iterations."""

    def run() -> None:
        model, x, y = build_model(model_name, device)
        opt = make_optimizer(spec, list(model.parameters()), hessian_every)
        for _ in range(3):
            iteration(model, opt, x, y)

    return peak_bytes(run, device)


# ------------------------------------------------------------------------------- table
def render(rows: list[Row]) -> str:
    """The Markdown table."""
    lines = [
        "| measure | workload | A | B | A | B | A/B | target |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        if r.unit == "ms":
            a, b = f"{r.a_value:.2f} ms", f"{r.b_value:.2f} ms"
        else:
            a, b = f"{r.a_value / 2**20:.1f} MiB", f"{r.b_value / 2**20:.1f} MiB"
        target = "—"
        if r.target is not None:
            verdict = "met" if r.ratio <= r.target else "**missed**"
            target = f"≤ {r.target:.2f} {verdict}"
        lines.append(
            f"| {r.measure} | {r.workload} | {r.a_name} | {r.b_name} | {a} | {b} "
            f"| {r.ratio:.3f} | {target} |"
        )
    return "\n".join(lines)


def compile_available() -> bool:
    """Whether torch.compile can build a kernel here (on CPU it needs a C++ compiler)."""
    try:
        fn = torch.compile(lambda t: t * 2 + 1, fullgraph=True)
        return bool(torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:  # noqa: BLE001 - any failure means "not available here"
        return False


# -------------------------------------------------------------------------------- main
#: (measure, A, B, hessian_every, target) per model. The targets are the issue's.
ITERATION_ROWS = {
    "mlp": [
        ("lehi", "adam", 1, 1.75),
        ("lehi", "adam", 10, 1.08),
        ("lehibrid", "adam", 1, None),
        ("sophia", "adamw", 10, None),
    ],
    "llama": [
        ("lehi", "adam", 1, 1.75),
        ("lehi", "adam", 10, 1.08),
        ("sophia", "adamw", 10, 1.10),
    ],
}
PEAK_ROWS = {
    "mlp": [("lehi", "adam", 1, 1.10), ("sophia", "adamw", 10, None)],
    "llama": [
        ("lehi", "adam", 1, 1.10),
        ("sophia", "adamw", 10, None),
    ],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per k=1 row")
    parser.add_argument("--quick", action="store_true", help="3 repeats and no compile row")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled LEHI row")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda, got {args.device!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 20)
    k_blocks = max(3, (repeats * 2) // 5)  # blocks of ten iterations for the k = 10 rows
    warmup = 1 if args.quick else 2
    load_before = os.getloadavg()[0]
    begin = time.perf_counter()
    rows: list[Row] = []

    def add_timing(
        measure: str,
        workload: str,
        a: str,
        b: str,
        run_a: Callable[[], None],
        run_b: Callable[[], None],
        target: float | None,
        reps: int,
        block: int = 1,
    ) -> None:
        ms_a, ms_b, ratio = time_pair(
            run_a, run_b, device=device, warmup=warmup, repeats=reps, block=block
        )
        ms_a, ms_b = ms_a / block, ms_b / block  # per call
        rows.append(
            Row(
                measure,
                workload,
                CONTENDERS[a][0],
                CONTENDERS[b][0],
                ms_a,
                ms_b,
                ratio,
                "ms",
                target,
            )
        )
        print(f"  {measure}, {workload}: {a}/{b} = {ratio:.3f}", file=sys.stderr, flush=True)

    step_pairs = [
        ("lehi", "adam", 1.05),
        ("sophia", "adamw", None),
        ("lehi", "adam_fused", None),
        # The update-size warning after its watched steps: one attribute test per step.
        ("lehi", "lehi_unwatched", 1.02),
    ]
    if not (args.quick or args.no_compile) and compile_available():
        step_pairs.append(("lehi_compile", "adam_fused", 1.2))
    for a, b, target in step_pairs:
        run_a, run_b = step_workload(a, device), step_workload(b, device)
        add_timing("step", "~10M params in 50 tensors", a, b, run_a, run_b, target, 2 * repeats)
        del run_a, run_b
        gc.collect()

    for name, label in MODELS.items():
        model, x, y = build_model(name, device)
        for a, b, k, target in ITERATION_ROWS[name]:
            # A block of k iterations holds exactly one refresh (warm-up is whole blocks).
            reps = repeats if k == 1 else k_blocks
            run_a, check_a = iteration_workload(model, x, y, a, k)
            run_b, check_b = iteration_workload(model, x, y, b, k)
            add_timing(f"iteration, k={k}", label, a, b, run_a, run_b, target, reps, k)
            check_a()
            check_b()
        for a, b, k, target in PEAK_ROWS[name]:
            peak_a = training_peak(name, a, k, device)
            peak_b = training_peak(name, b, k, device)
            rows.append(
                Row(
                    f"peak memory, k={k}",
                    label,
                    CONTENDERS[a][0],
                    CONTENDERS[b][0],
                    peak_a,
                    peak_b,
                    peak_a / peak_b,
                    "bytes",
                    target,
                )
            )
        gc.collect()

    samplers = {
        CONTENDERS[s][0]: make_optimizer(s, [nn.Parameter(torch.zeros(1))], 1).sampler
        for s in CONTENDERS
        if s in ("lehi", "lehibrid", "sophia")
    }
    print(
        "label sampler: " + ", ".join(f"{k} {v}" for k, v in samplers.items()) + "; "
        f"torch {torch.__version__}, {device}, {args.threads} threads, {platform.machine()}; "
        f"medians of {repeats} interleaved repeats (step rows {2 * repeats}, k=10 rows "
        f"{k_blocks} blocks of 10 iterations); {time.perf_counter() - begin:.0f} s in all; "
        # Other processes on the cores skew timings (ratios less, being interleaved).
        f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after\n"
    )
    print(render(rows))


if __name__ == "__main__":
    main()
