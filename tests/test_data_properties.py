"""Properties of the readers of untrusted data files, under random corruption.

For each format (IDX, CIFAR-10 pickle batches, the CASP CSV, PTB text, token shards) a valid
file is generated, corrupted (truncated, bytes flipped, inserted, deleted or overwritten, the
header rewritten) and read. The reader must either raise DataFileError, whose message is one
line starting with the file's path, or return exactly what an independent transcription of the
format (written here, from the format's description) decodes from the same bytes: never
another exception and never a silent wrong read. Uncorrupted files must read back exactly.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lehi.data import DataFileError, cifar10, mnist, protein, ptb
from lehi.data.shards import HEADER_BYTES, MAGIC, read_shard, write_shard

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Invalid(Exception):
    """The reference transcription rejects the bytes."""


@st.composite
def corrupted(draw: st.DrawFn, data: bytes, header: int = 16) -> bytes:
    """`data` unchanged or with one to three random corruptions."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "header", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "header":
            lo = draw(st.integers(0, header))
            data[lo : lo + 4] = draw(st.binary(min_size=4, max_size=4))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def read_or_refuse(read: Any, path: Path, blob: bytes) -> Any:
    """`read(path)` of `blob`, or None after a one-line DataFileError naming the file."""
    path.write_bytes(blob)
    try:
        return read(path)
    except DataFileError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{path}: "), message
        return None


def check(read: Any, reference: Any, path: Path, blob: bytes) -> None:
    """Reading `blob` gives a one-line DataFileError naming the file, or the reference's value."""
    got = read_or_refuse(read, path, blob)
    if got is None:
        return
    try:
        expected = reference(blob)
    except Invalid as exc:
        pytest.fail(f"read accepted bytes the format forbids ({exc}): {blob[:64]!r}")
    assert_same(got, expected)


def assert_same(got: Any, expected: Any) -> None:
    if isinstance(expected, tuple):
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            assert_same(a, b)
    elif isinstance(expected, np.ndarray):
        assert np.asarray(got).shape == expected.shape
        assert np.array_equal(np.asarray(got), expected)
    else:
        assert got == expected


# IDX (MNIST): 0x00 0x00 0x08 ndim, ndim big-endian uint32 sizes, then the uint8 body.


def idx_reference(blob: bytes, ndim: int) -> np.ndarray:
    if len(blob) < 4 or blob[:4] != bytes([0, 0, 8, ndim]):
        raise Invalid("magic")
    if len(blob) < 4 + 4 * ndim:
        raise Invalid("header")
    shape = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    if len(blob) != 4 + 4 * ndim + math.prod(shape):
        raise Invalid("size")
    return np.frombuffer(blob[4 + 4 * ndim :], dtype=np.uint8).reshape(shape)


@st.composite
def idx_files(draw: st.DrawFn) -> tuple[int, bytes, bytes]:
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim)))
    body = draw(st.binary(min_size=math.prod(shape), max_size=math.prod(shape)))
    valid = bytes([0, 0, 8, ndim]) + struct.pack(f">{ndim}I", *shape) + body
    return ndim, valid, draw(corrupted(valid))


@PROPERTY
@given(case=idx_files())
def test_idx_reader(tmp_path, case):
    ndim, valid, blob = case
    path = tmp_path / "images-idx-ubyte"

    def read(p: Path) -> np.ndarray:
        return mnist.read_idx(p, ndim)

    assert_same(read_or_refuse(read, path, valid), idx_reference(valid, ndim))
    check(read, lambda b: idx_reference(b, ndim), path, blob)


# CIFAR-10 batches: a pickled dict with 'data' (uint8 ndarray (N, 3072)) and 'labels' (N ints
# in 0..9), keys bytes or str. The reference unpickler resolves the same few numpy names.

_NUMPY = {
    "_reconstruct": np.zeros(1).__reduce__()[0],
    "_frombuffer": np.zeros(1).__reduce_ex__(5)[0],
    "ndarray": np.ndarray,
    "dtype": np.dtype,
}


class _Reference(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("numpy") and name in _NUMPY:
            return _NUMPY[name]
        if (module, name) == ("_codecs", "encode"):
            return lambda text, encoding: text.encode(encoding)
        if (module, name) in (("builtins", "bytes"), ("__builtin__", "bytes")):
            return bytes
        raise Invalid(f"global {module}.{name}")


def cifar_reference(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        entry = _Reference(io.BytesIO(blob), encoding="bytes").load()
    except Invalid:
        raise
    except Exception as exc:
        raise Invalid(f"pickle: {exc!r}") from None
    if not isinstance(entry, dict):
        raise Invalid("not a dict")
    entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data, labels = entry.get("data"), entry.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2):
        raise Invalid("data")
    if data.shape[1] != 3072:
        raise Invalid("data width")
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    if not isinstance(labels, list) or any(type(v) is not int for v in labels):
        raise Invalid("labels")
    if len(labels) != len(data) or any(not 0 <= v <= 9 for v in labels):
        raise Invalid("label values")
    return data.reshape(-1, 3, 32, 32), np.array(labels, dtype=np.int64)


@st.composite
def cifar_batches(draw: st.DrawFn) -> tuple[bytes, bytes]:
    n = draw(st.integers(0, 3))
    pixels = draw(st.binary(min_size=3072 * n, max_size=3072 * n))
    labels = draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    key = draw(st.sampled_from([str, lambda k: k.encode()]))
    entry = {
        key("batch_label"): "sample",
        key("labels"): labels,
        key("data"): np.frombuffer(pixels, dtype=np.uint8).reshape(n, 3072),
    }
    valid = pickle.dumps(entry, protocol=draw(st.sampled_from([0, 2, 4, 5])))
    return valid, draw(corrupted(valid, header=len(valid)))


@PROPERTY
@given(case=cifar_batches())
def test_cifar_batch_reader(tmp_path, case):
    valid, blob = case
    path = tmp_path / "data_batch_1"
    assert_same(read_or_refuse(cifar10.read_batch, path, valid), cifar_reference(valid))
    check(cifar10.read_batch, cifar_reference, path, blob)


# CASP.csv: an optional header (RMSD,F1..F9, possibly quoted or after "#"), then rows of ten
# comma-separated finite decimal numbers; blank lines are skipped.

_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def casp_reference(blob: bytes) -> np.ndarray:
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("utf-8") from None
    text = text.removeprefix("\ufeff")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    first = [f.strip(" \t").strip("\"'") for f in lines[0].strip().lstrip("#").split(",")]
    if [f.upper() for f in first] == list(protein.COLUMNS):
        lines = lines[1:]
    rows = []
    for line in lines:
        if not line.strip():
            continue
        fields = [f.strip(" \t") for f in line.split(",")]
        if len(fields) != 10 or not all(_NUMBER.fullmatch(f) for f in fields):
            raise Invalid(f"row {line!r}")
        rows.append([float(f) for f in fields])
    if not rows:
        raise Invalid("no rows")
    array = np.array(rows, dtype=np.float64)
    if not np.isfinite(array).all():
        raise Invalid("not finite")
    return array


@st.composite
def casp_files(draw: st.DrawFn) -> tuple[bytes, bytes]:
    n = draw(st.integers(1, 5))
    values = st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: repr(round(v, 4)))
    rows = draw(st.lists(st.lists(values, min_size=10, max_size=10), min_size=n, max_size=n))
    header = draw(
        st.sampled_from(
            [
                "",
                "RMSD,F1,F2,F3,F4,F5,F6,F7,F8,F9\n",
                '# "RMSD","F1","F2","F3","F4","F5","F6","F7","F8","F9"\n',
            ]
        )
    )
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    valid = (header + newline.join(",".join(r) for r in rows) + newline).encode()
    return valid, draw(corrupted(valid, header=len(valid)))


@PROPERTY
@given(case=casp_files())
def test_casp_reader(tmp_path, case):
    valid, blob = case
    path = tmp_path / "CASP.csv"
    assert_same(read_or_refuse(protein.read_rows, path, valid), casp_reference(valid))
    check(protein.read_rows, casp_reference, path, blob)


# PTB text: UTF-8 without control characters other than whitespace; whitespace-separated words,
# "<eos>" after every line (universal newlines); at least one word.


def ptb_reference(blob: bytes) -> list[str]:
    try:
        text = blob.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("utf-8") from None
    if any(ord(c) < 32 and c not in "\t\n\v\f\r" or c == "\x7f" for c in text):
        raise Invalid("control character")
    with io.StringIO(text, newline=None) as f:
        words = [w for line in f for w in [*line.split(), "<eos>"]]
    if all(w == "<eos>" for w in words):
        raise Invalid("no words")
    return words


@st.composite
def ptb_files(draw: st.DrawFn) -> tuple[bytes, bytes]:
    word = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=6)
    lines = draw(st.lists(st.lists(word, min_size=0, max_size=5), min_size=1, max_size=6))
    valid = "".join(" " + " ".join(line) + " \n" for line in lines).encode()
    return valid, draw(corrupted(valid, header=len(valid)))


@PROPERTY
@given(case=ptb_files())
def test_ptb_reader(tmp_path, case):
    valid, blob = case
    path = tmp_path / "ptb.train.txt"
    try:
        expected = ptb_reference(valid)
    except Invalid:
        expected = None  # lines of empty words only: the reader must refuse them too
    assert_same(read_or_refuse(ptb.read_words, path, valid), expected)
    check(ptb.read_words, ptb_reference, path, blob)


# Token shards: 256 little-endian int32 (magic 20240520, version 1, token count, vocabulary
# size or 0, zeros), then the tokens as little-endian uint16, all below the vocabulary size.


def shard_reference(blob: bytes, vocab: int) -> np.ndarray:
    if len(blob) < HEADER_BYTES:
        raise Invalid("short header")
    header = struct.unpack("<256i", blob[:HEADER_BYTES])
    if header[0] != MAGIC or header[1] != 1 or header[2] < 0 or header[3] not in (0, vocab):
        raise Invalid("header")
    if len(blob) != HEADER_BYTES + 2 * header[2]:
        raise Invalid("size")
    tokens = np.frombuffer(blob[HEADER_BYTES:], dtype="<u2")
    if tokens.size and tokens.max() >= vocab:
        raise Invalid("token id")
    return tokens


@st.composite
def shard_files(draw: st.DrawFn, tmp: Path) -> tuple[int, bytes, bytes]:
    vocab = draw(st.sampled_from([257, 50257]))
    tokens = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    valid = write_shard(tmp / "source.bin", np.array(tokens, dtype=np.int64), vocab).read_bytes()
    return vocab, valid, draw(corrupted(valid, header=HEADER_BYTES + 8))


@PROPERTY
@given(data=st.data())
def test_shard_reader(tmp_path, data):
    vocab, valid, blob = data.draw(shard_files(tmp_path))
    path = tmp_path / "fineweb_train_000001.bin"

    def read(p: Path) -> np.ndarray:
        return np.array(read_shard(p, vocab_size=vocab))

    assert_same(read_or_refuse(read, path, valid), shard_reference(valid, vocab))
    check(read, lambda b: shard_reference(b, vocab), path, blob)
