"""Token shard files: a 1024-byte header followed by uint16 token ids.

Layout (little-endian), compatible with llm.c's data shards:

    header: 256 x int32
        [0] magic   20240520
        [1] version 1 (uint16 tokens)
        [2] number of tokens N
        [3] vocabulary size (0 = not recorded, as in llm.c's files); ids must be below it
        [4..255] zero
    body:   N x uint16

Writers are atomic (temp file + os.replace), so a shard that exists with a valid header and the
matching size is complete. Readers memory-map the body after checking the header and the size,
so a truncated or foreign file fails with an error naming the file.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lehi.data.files import DataFileError, make_readable, one_line

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_DTYPE = np.dtype("<u2")
MAX_VOCAB = 1 << 16
_SCAN_CHUNK = 1 << 24  # tokens per step of the id-range scan (32 MiB)


@dataclass(frozen=True)
class ShardHeader:
    """The parsed header of a token shard."""

    num_tokens: int
    vocab_size: int  # 0 when not recorded
    version: int


def write_shard(path: str | os.PathLike[str], tokens: np.ndarray, vocab_size: int) -> Path:
    """Write `tokens` (ids in [0, vocab_size)) as a shard at `path`, atomically."""
    path = Path(path)
    if not 0 < vocab_size <= MAX_VOCAB:
        raise ValueError(
            f"vocab_size must be in [1, {MAX_VOCAB}] for uint16 shards, got {vocab_size}"
        )
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise ValueError(
            f"token ids must be in [0, {vocab_size}), got [{tokens.min()}, {tokens.max()}] for {path}"
        )
    if tokens.size >= 1 << 31:
        raise ValueError(f"a shard holds fewer than 2**31 tokens, got {tokens.size} for {path}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2], header[3] = MAGIC, VERSION, tokens.size, vocab_size
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        make_readable(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_header(path: str | os.PathLike[str]) -> ShardHeader:
    """Parse and validate the header of the shard at `path` (and that its size matches)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataFileError(path, "token shard not found") from None
    except OSError as exc:
        raise DataFileError(path, f"unreadable token shard ({one_line(exc)})") from None
    if len(raw) < HEADER_BYTES:
        raise DataFileError(
            path,
            f"truncated or not a token shard ({size} bytes, less than the {HEADER_BYTES}-byte header)",
        )
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, num_tokens, vocab_size = (int(v) for v in header[:4])
    if magic != MAGIC:
        raise DataFileError(path, f"not a token shard (magic {magic}, expected {MAGIC})")
    if version != VERSION:
        raise DataFileError(
            path, f"unsupported token shard version {version} (supported: {VERSION})"
        )
    if num_tokens < 0 or not 0 <= vocab_size <= MAX_VOCAB:
        raise DataFileError(
            path, f"corrupt token shard header (tokens {num_tokens}, vocab {vocab_size})"
        )
    expected = HEADER_BYTES + num_tokens * TOKEN_DTYPE.itemsize
    if size != expected:
        raise DataFileError(
            path,
            f"truncated or padded token shard: header says {num_tokens} tokens "
            f"({expected} bytes) but the file has {size} bytes",
        )
    return ShardHeader(num_tokens=num_tokens, vocab_size=vocab_size, version=version)


# (path, inode, size, mtime_ns) -> largest token id, so that a shard read again in the same
# process (e.g. by TokenWindows.to) is not scanned twice; a rewritten file changes the key.
_MAX_IDS: dict[tuple[str, int, int, int], int] = {}


def max_token_id(path: Path, tokens: np.ndarray) -> int:
    """The largest id in `tokens` (the body of the shard at `path`), -1 when empty."""
    stat = path.stat()
    key = (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _MAX_IDS:
        largest = -1
        for lo in range(0, len(tokens), _SCAN_CHUNK):
            largest = max(largest, int(tokens[lo : lo + _SCAN_CHUNK].max()))
        _MAX_IDS[key] = largest
    return _MAX_IDS[key]


def read_shard(path: str | os.PathLike[str], vocab_size: int | None = None) -> np.ndarray:
    """Memory-map the tokens of a validated shard (read-only uint16 array).

    With `vocab_size`, a shard that records a different vocabulary size is rejected; a shard
    holding an id of `vocab_size` (else of its recorded vocabulary size) or more is rejected
    too. Errors are DataFileErrors naming the file.
    """
    path = Path(path)
    header = read_header(path)
    if vocab_size is not None and header.vocab_size not in (0, vocab_size):
        raise DataFileError(
            path,
            f"shard was written for a vocabulary of {header.vocab_size} tokens, "
            f"expected {vocab_size}",
        )
    if header.num_tokens == 0:
        return np.zeros(0, dtype=TOKEN_DTYPE)
    tokens = np.memmap(
        path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(header.num_tokens,)
    )
    limit = vocab_size if vocab_size is not None else header.vocab_size or None
    if limit is not None:
        largest = max_token_id(path, tokens)
        if largest >= limit:
            raise DataFileError(
                path, f"holds token id {largest}, outside the vocabulary of {limit} tokens"
            )
    return tokens


def is_complete_shard(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a shard with a valid header and the size the header promises."""
    try:
        read_header(path)
    except (OSError, ValueError):
        return False
    return True
