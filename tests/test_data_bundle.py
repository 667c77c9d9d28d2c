"""Batch iterators (determinism, resume, layouts), augmentation, building datasets from their\nconfigs (`_target_`, YAML defaults, option errors) and digits."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

import lehi.data as data
from lehi.data.augment import RandomCropFlip
from lehi.data.bundle import BPTTBatches, TensorBatches, TokenWindows, make_generator
from lehi.data.shards import write_shard
from lehi.data.splits import split_indices


def _collect(batches, epoch, seed, start_step=0):
    return [(x.clone(), y.clone()) for x, y in batches.iter_epoch(epoch, seed, start_step)]


def _same(a, b):
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


def test_tensor_batches_deterministic_resumable_and_complete():
    n = 103
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    y = torch.arange(n)
    tb = TensorBatches(x, y, 10)
    assert tb.steps_per_epoch == 10 and tb.num_examples == n
    first = _collect(tb, epoch=2, seed=7)
    assert _same(first, _collect(tb, epoch=2, seed=7))
    assert _same(first[4:], _collect(tb, epoch=2, seed=7, start_step=4))
    assert _collect(tb, epoch=2, seed=7, start_step=10) == []
    assert not _same(first, _collect(tb, epoch=3, seed=7))
    assert not _same(first, _collect(tb, epoch=2, seed=8))
    ids = torch.cat([b[1] for b in first])
    assert len(ids) == 100 and len(set(ids.tolist())) == 100  # drop_last, no repeats
    for bx, by in first:
        assert torch.equal(bx, x[by])  # inputs stay paired with their targets
    assert _same(first, _collect(tb.to("cpu"), epoch=2, seed=7))
    with pytest.raises(ValueError, match="start_step"):
        list(tb.iter_epoch(0, 0, start_step=11))


def test_tensor_batches_eval_keeps_order_and_last_partial_batch():
    y = torch.arange(23)
    tb = TensorBatches(y.float().unsqueeze(1), y, 5, shuffle=False, drop_last=False)
    batches = _collect(tb, 0, 0)
    assert tb.steps_per_epoch == 5 and [len(b[1]) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    assert _same(batches, _collect(tb, 4, 99))


def test_tensor_batches_bad_input():
    with pytest.raises(ValueError, match="larger than the split"):
        TensorBatches(torch.zeros(3, 2), torch.zeros(3), 4)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatches(torch.zeros(3, 2), torch.zeros(3), 0)
    with pytest.raises(ValueError, match="differ in length"):
        TensorBatches(torch.zeros(3, 2), torch.zeros(4), 1)
    with pytest.raises(ValueError, match=">= 0"):
        make_generator(-1, 0)


def _reference_candidates(img: np.ndarray, pad: int, fill: list[float]) -> list[np.ndarray]:
    """All crops (with and without flip) of one (C, H, W) image padded by `pad` with `fill`."""
    c, h, w = img.shape
    padded = np.stack([np.pad(img[k], pad, constant_values=fill[k]) for k in range(c)])
    out = []
    for dy in range(2 * pad + 1):
        for dx in range(2 * pad + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            out += [crop, crop[:, :, ::-1]]
    return out


def test_random_crop_flip_matches_padded_crops():
    torch.manual_seed(0)
    x = torch.randn(64, 3, 6, 6)
    fill = [-1.5, 0.25, 2.0]
    out = RandomCropFlip(2, fill=fill)(x, make_generator(0, 0, 1))
    assert out.shape == x.shape
    flips = 0
    for img, res in zip(x.numpy(), out.numpy()):
        cands = _reference_candidates(img, 2, fill)
        hits = [k for k, c in enumerate(cands) if np.array_equal(c, res)]
        assert hits, "augmented image is not a padded crop (or its mirror) of the input"
        flips += all(k % 2 for k in hits)
    assert 0 < flips < 64  # both flipped and unflipped images occur
    assert not torch.equal(out, RandomCropFlip(2, fill=fill)(x, make_generator(0, 0, 2)))


def test_augmented_batches_resume_exactly():
    x = torch.randn(40, 3, 8, 8)
    tb = TensorBatches(x, torch.arange(40), 8, augment=RandomCropFlip(4, fill=0.0))
    full = _collect(tb, 1, 3)
    assert _same(full, _collect(tb, 1, 3))
    assert _same(full[2:], _collect(tb, 1, 3, start_step=2))


def test_bptt_batches_layout():
    stream = torch.arange(1000)
    bb = BPTTBatches(stream, batch_size=4, bptt=7)
    assert bb.steps_per_epoch == (250 - 1) // 7
    batches = _collect(bb, 0, 0)
    for i, (x, y) in enumerate(batches):
        assert x.shape == (4, 7) and x.dtype == torch.int64
        for b in range(4):
            start = b * 250 + i * 7
            assert torch.equal(x[b], stream[start : start + 7])
            assert torch.equal(y[b], stream[start + 1 : start + 8])
    assert _same(batches, _collect(bb, 5, 123))  # sequential: the seed does not matter
    assert _same(batches[10:], _collect(bb, 0, 0, start_step=10))
    with pytest.raises(ValueError, match="too short"):
        BPTTBatches(torch.arange(10), 4, 7)


def test_token_windows_random_and_sequential(tmp_path):
    a = write_shard(tmp_path / "a.bin", np.arange(1000), vocab_size=20000)
    b = write_shard(tmp_path / "b.bin", np.arange(10000, 10500), vocab_size=20000)
    tw = TokenWindows([a, b], context=16, batch_size=8, steps_per_epoch=12, vocab_size=20000)
    assert tw.num_examples == 1500 and tw.steps_per_epoch == 12
    batches = _collect(tw, 0, 1)
    assert _same(batches, _collect(tw, 0, 1))
    assert _same(batches[5:], _collect(tw, 0, 1, start_step=5))
    assert not _same(batches, _collect(tw, 1, 1))
    starts = []
    for x, y in batches:
        assert x.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        # windows are contiguous slices of one shard (never spanning the two)
        assert torch.equal(y - x, torch.ones_like(x))
        starts += x[:, 0].tolist()
    assert any(s < 1000 for s in starts) and any(s >= 10000 for s in starts)

    seq = TokenWindows([a, b], context=16, batch_size=8, random=False)
    n_windows = (1000 - 1) // 16 + (500 - 1) // 16
    assert seq.steps_per_epoch == -(-n_windows // 8)
    rows = torch.cat([x for x, _ in _collect(seq, 0, 0)])
    expected = [list(range(o, o + 16)) for o in range(0, 1000 - 16, 16)]
    expected += [list(range(10000 + o, 10000 + o + 16)) for o in range(0, 500 - 16, 16)]
    assert rows.tolist() == expected
    assert TokenWindows([a, b], 16, 8, 3, random=False).steps_per_epoch == 3
    with pytest.raises(ValueError, match="steps_per_epoch is required"):
        TokenWindows([a], 16, 8)
    with pytest.raises(ValueError, match="no window"):
        TokenWindows([a], 1000, 8, 1)


def test_unknown_dataset_lists_the_known_ones():
    assert data.known_datasets() == ["cifar10", "digits", "fineweb", "mnist", "protein", "ptb"]
    with pytest.raises(ValueError) as err:
        data.build("imagenet")
    assert str(err.value) == (
        "unknown dataset 'imagenet'; known: cifar10, digits, fineweb, mnist, protein, ptb"
    )


@pytest.mark.parametrize("name", ["cifar10", "digits", "fineweb", "mnist", "protein", "ptb"])
def test_yaml_holds_every_option_and_the_builder_no_default(name):
    config = data.dataset_config(name)
    assert config["name"] == name and config["_target_"] == f"lehi.data.{name}.build"
    builder = importlib.import_module(f"lehi.data.{name}").build
    parameters = inspect.signature(builder).parameters
    assert list(parameters) == list(data.options(name))
    assert all(
        p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is inspect.Parameter.empty
        for p in parameters.values()
    )


def test_option_errors_name_the_key():
    with pytest.raises(ValueError) as err:
        data.build("digits", colour=1)
    assert str(err.value) == (
        "unknown option dataset.colour for lehi.data.digits.build; "
        "allowed: seed, val_fraction, batch_size, eval_batch_size"
    )
    with pytest.raises(ValueError) as err:
        data.build({"_target_": "lehi.data.digits.build", "name": "digits", "seed": 0})
    assert str(err.value).startswith("dataset.val_fraction is required by lehi.data.digits.build")
    with pytest.raises(ValueError, match="dataset._target_ is missing"):
        data.build({"name": "digits", "seed": 0})
    with pytest.raises(
        ValueError, match="dataset._target_='lehi.data.nope.build' cannot be"
    ) as err:
        data.build("digits", _target_="lehi.data.nope.build")
    assert "No module named 'lehi.data.nope'" in str(err.value)  # the cause, kept
    assert isinstance(err.value.__cause__, ModuleNotFoundError)
    # a TypeError raised inside a builder is a bug, not a bad option: it keeps its traceback
    with pytest.raises(TypeError) as err:
        data.build("digits", val_fraction="a fifth")
    assert err.traceback[-1].path.name == "splits.py"
    assert data.options("ptb")["bptt"] == 35


def test_builds_from_the_composed_hydra_config(tmp_path):
    cfg = compose_config(["dataset=digits", "dataset.batch_size=32"])
    bundle = data.build(cfg.dataset)
    by_name = data.build("digits", batch_size=32)
    assert torch.equal(bundle.train.inputs, by_name.train.inputs)
    assert bundle.train.batch_size == 32 and bundle.task == "classification"
    assert data.build(OmegaConf.to_container(cfg.dataset, resolve=True)).val.num_examples == 359
    with pytest.raises(ValueError, match="unknown option dataset.colour"):
        data.build(compose_config(["dataset=digits", "+dataset.colour=red"]).dataset)


def test_bundle_task_is_explicit_and_checked():
    bundle = data.build("digits")
    assert bundle.task == "classification" and bundle.to("cpu").task == "classification"
    with pytest.raises(ValueError, match="DataBundle.task must be one of classification"):
        dataclasses.replace(bundle, task="sequence")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bundle.task = "regression"


def test_digits_bundle():
    bundle = data.build("digits", batch_size=64)
    assert (bundle.loss, bundle.metric, bundle.input_shape, bundle.num_outputs) == (
        "cross_entropy",
        "accuracy",
        (64,),
        10,
    )
    assert bundle.train.num_examples == 1438 and bundle.val.num_examples == 359
    x, y = next(bundle.train.iter_epoch(0, 0))
    assert x.shape == (64, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(bundle.train.inputs.min()) and float(bundle.train.inputs.max()) <= 1.0
    assert set(bundle.val.targets.tolist()) == set(range(10))
    again = data.build("digits", batch_size=32)
    assert torch.equal(again.val.inputs, bundle.val.inputs)  # the split does not follow the run
    assert not torch.equal(data.build("digits", seed=1).val.inputs, bundle.val.inputs)
    train_idx, val_idx = split_indices(1797, 0.2, 0)
    assert len(np.intersect1d(train_idx, val_idx)) == 0 and len(train_idx) + len(val_idx) == 1797
    from sklearn.datasets import load_digits

    pixels = load_digits().data[val_idx] / 16.0
    assert np.allclose(bundle.val.inputs.numpy(), pixels)


def test_digits_come_from_scikit_learns_file_without_importing_it():
    from sklearn.datasets import load_digits

    from lehi.data import digits

    pixels, labels = digits.load_arrays()
    reference = load_digits()
    assert np.array_equal(pixels, reference.data) and np.array_equal(labels, reference.target)
    code = "import sys, lehi.data; lehi.data.build('digits'); print('sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
