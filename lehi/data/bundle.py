"""The data types every dataset returns: DataBundle and its batch iterators.

Determinism contract of `Batches.iter_epoch(epoch, seed, start_step)`: the batches depend only
on (epoch, seed) and the data; calling it with `start_step=k` yields exactly the batches k, k+1,
... of the full epoch. To make resuming exact, every random draw is taken from a generator
seeded from (seed, epoch, stream[, step]) rather than from a generator that advances across
steps, and the generators live on the CPU so the batches are the same on every device.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from lehi.data.shards import read_shard

# Independent random streams derived from (seed, epoch); values are part of the data order.
_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1
_WINDOW_STREAM = 2

Augment = Callable[[Tensor, torch.Generator], Tensor]


def make_generator(seed: int, epoch: int, *keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from (seed, epoch, *keys) via numpy's SeedSequence."""
    words = [seed, epoch, *keys]
    if any(int(k) < 0 for k in words):
        raise ValueError(f"seed, epoch and step must be >= 0, got {tuple(words)}")
    state = np.random.SeedSequence([int(k) for k in words]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


def _check_start(start_step: int, steps_per_epoch: int) -> None:
    if not 0 <= start_step <= steps_per_epoch:
        raise ValueError(f"start_step must be in [0, {steps_per_epoch}], got {start_step}")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Batches(ABC):
    """One split as an iterator of (inputs, targets) batches, deterministic per (epoch, seed)."""

    steps_per_epoch: int
    num_examples: int

    @abstractmethod
    def iter_epoch(
        self, epoch: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield the batches of `epoch` from step `start_step` on."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Batches:
        """A copy whose batches are produced on `device`."""


#: What a bundle's examples are; the trainer and the models branch on this, never on shapes.
#: classification: one class per example (cross-entropy, accuracy); regression: real targets
#: (MSE, RMSE in the target's units); language_model: a target token per input token
#: (cross-entropy per token, perplexity).
TASKS = ("classification", "regression", "language_model")


@dataclass(frozen=True)
class DataBundle:
    """Everything the trainer needs to know about a dataset."""

    name: str
    task: str  # one of TASKS
    loss: str  # "cross_entropy" | "mse"
    metric: str  # "accuracy" | "rmse" | "perplexity"
    input_shape: tuple[int, ...]  # of one example; () for token sequences
    num_outputs: int  # classes, regression targets or vocabulary size
    train: Batches
    val: Batches
    target_std: float = 1.0  # regression: converts the standardised RMSE to the target's units
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(
                f"DataBundle.task must be one of {', '.join(TASKS)}, got {self.task!r}"
            )

    def to(self, device: torch.device | str) -> DataBundle:
        """A copy with both splits moved to `device`."""
        return replace(self, train=self.train.to(device), val=self.val.to(device))


class TensorBatches(Batches):
    """A whole split held as tensors (on any device), reshuffled each epoch.

    With `shuffle`, the order of epoch e is torch.randperm from a generator seeded by
    (seed, e). `augment(x, generator)` (e.g. RandomCropFlip) is applied to whole batches on the
    tensors' device with a generator seeded by (seed, epoch, step). With `drop_last` the last
    partial batch is skipped (training); otherwise it is yielded (evaluation).
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        augment: Augment | None = None,
    ) -> None:
        _check_positive("batch_size", batch_size)
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"inputs and targets differ in length: {inputs.shape[0]} vs {targets.shape[0]}"
            )
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.num_examples = int(inputs.shape[0])
        if drop_last:
            self.steps_per_epoch = self.num_examples // batch_size
        else:
            self.steps_per_epoch = math.ceil(self.num_examples / batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"batch_size {batch_size} is larger than the split ({self.num_examples} examples)"
            )

    def iter_epoch(
        self, epoch: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        _check_start(start_step, self.steps_per_epoch)
        order = None
        if self.shuffle:
            perm = torch.randperm(
                self.num_examples, generator=make_generator(seed, epoch, _SHUFFLE_STREAM)
            )
            order = perm.to(self.inputs.device)
        for step in range(start_step, self.steps_per_epoch):
            lo = step * self.batch_size
            hi = min(lo + self.batch_size, self.num_examples)
            if order is None:
                x, y = self.inputs[lo:hi], self.targets[lo:hi]
            else:
                idx = order[lo:hi]
                x, y = self.inputs[idx], self.targets[idx]
            if self.augment is not None:
                x = self.augment(x, make_generator(seed, epoch, _AUGMENT_STREAM, step))
            yield x, y

    def to(self, device: torch.device | str) -> TensorBatches:
        return TensorBatches(
            self.inputs.to(device),
            self.targets.to(device),
            self.batch_size,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            augment=self.augment,
        )


class BPTTBatches(Batches):
    """A token stream cut into `batch_size` contiguous columns, read in windows of `bptt`.

    As in Zaremba et al.'s reader: the stream (1-D int64) is truncated to a multiple of
    batch_size and reshaped to (batch_size, L); step i yields x = data[:, i*T:(i+1)*T] and
    y = data[:, i*T+1:(i+1)*T+1], both (B, T). Order is sequential (a recurrent model carries
    its state from one window to the next), so `seed` does not change the batches. There are
    (L - 1) // bptt steps; the few tokens of an incomplete last window are not used.
    `num_examples` is the number of predicted tokens per epoch.
    """

    def __init__(self, stream: Tensor, batch_size: int, bptt: int) -> None:
        _check_positive("batch_size", batch_size)
        _check_positive("bptt", bptt)
        if stream.dim() != 1:
            raise ValueError(f"the token stream must be 1-D, got shape {tuple(stream.shape)}")
        self.stream = stream
        self.batch_size = batch_size
        self.bptt = bptt
        length = stream.numel() // batch_size
        self.data = stream[: length * batch_size].view(batch_size, length)
        self.steps_per_epoch = (length - 1) // bptt
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"token stream of {stream.numel()} tokens is too short for batch_size "
                f"{batch_size} x bptt {bptt}"
            )
        self.num_examples = self.steps_per_epoch * batch_size * bptt

    def iter_epoch(
        self, epoch: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        _check_start(start_step, self.steps_per_epoch)
        t = self.bptt
        for step in range(start_step, self.steps_per_epoch):
            lo = step * t
            yield (
                self.data[:, lo : lo + t].contiguous(),
                self.data[:, lo + 1 : lo + t + 1].contiguous(),
            )

    def to(self, device: torch.device | str) -> BPTTBatches:
        return BPTTBatches(self.stream.to(device), self.batch_size, self.bptt)


class TokenWindows(Batches):
    """Windows of context+1 tokens from memory-mapped uint16 token shards.

    random=True (training): each step draws `batch_size` window starts uniformly over all
    positions of all shards where a whole window fits (windows never span two shards), from a
    generator seeded by (seed, epoch, step); `steps_per_epoch` is required.
    random=False (evaluation): non-overlapping windows at offsets 0, context, 2*context, ...
    of each shard in order, every token predicted once; steps_per_epoch caps the number of
    batches (None = all windows; the last batch may be smaller).
    x = window[:-1], y = window[1:], both int64 (B, context). `num_examples` is the number of
    tokens in the shards.
    """

    def __init__(
        self,
        shards: Sequence[str | os.PathLike[str]],
        context: int,
        batch_size: int,
        steps_per_epoch: int | None = None,
        *,
        random: bool = True,
        vocab_size: int | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        _check_positive("context", context)
        _check_positive("batch_size", batch_size)
        if not shards:
            raise ValueError("TokenWindows needs at least one token shard")
        self.paths = [os.fspath(p) for p in shards]
        self.context = context
        self.batch_size = batch_size
        self.random = random
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self._tokens = [read_shard(p, vocab_size=vocab_size) for p in self.paths]
        self.num_examples = int(sum(len(t) for t in self._tokens))
        width = context + 1
        if random:
            if steps_per_epoch is None:
                raise ValueError("steps_per_epoch is required for random token windows")
            _check_positive("steps_per_epoch", steps_per_epoch)
            counts = np.array([max(len(t) - width + 1, 0) for t in self._tokens], dtype=np.int64)
        else:
            counts = np.array(
                [max((len(t) - 1) // context, 0) for t in self._tokens], dtype=np.int64
            )
        if counts.sum() == 0:
            raise ValueError(
                f"token shards {self.paths} hold no window of {width} tokens (context {context})"
            )
        self._cum = np.cumsum(counts)
        self._first_ids = self._cum - counts  # global id of each shard's first window
        self._num_windows = int(self._cum[-1])
        if random:
            self.steps_per_epoch = steps_per_epoch
        else:
            if steps_per_epoch is not None:
                _check_positive("steps_per_epoch", steps_per_epoch)
            available = math.ceil(self._num_windows / batch_size)
            self.steps_per_epoch = (
                available if steps_per_epoch is None else min(steps_per_epoch, available)
            )

    def _window_batch(self, window_ids: np.ndarray) -> tuple[Tensor, Tensor]:
        shard_ids = np.searchsorted(self._cum, window_ids, side="right")
        local = window_ids - self._first_ids[shard_ids]
        starts = local if self.random else local * self.context
        width = self.context + 1
        rows = [self._tokens[s][o : o + width] for s, o in zip(shard_ids.tolist(), starts.tolist())]
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))
        if self.device.type != "cpu":
            batch = batch.to(self.device, non_blocking=False)
        return batch[:, :-1], batch[:, 1:]

    def iter_epoch(
        self, epoch: int, seed: int, start_step: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        _check_start(start_step, self.steps_per_epoch)
        for step in range(start_step, self.steps_per_epoch):
            if self.random:
                gen = make_generator(seed, epoch, _WINDOW_STREAM, step)
                ids = torch.randint(0, self._num_windows, (self.batch_size,), generator=gen).numpy()
            else:
                lo = step * self.batch_size
                ids = np.arange(lo, min(lo + self.batch_size, self._num_windows), dtype=np.int64)
            yield self._window_batch(ids)

    def to(self, device: torch.device | str) -> TokenWindows:
        return TokenWindows(
            self.paths,
            self.context,
            self.batch_size,
            self.steps_per_epoch,
            random=self.random,
            vocab_size=self.vocab_size,
            device=device,
        )
