"""Token shard files: round trip, header layout, and clear errors for truncated/foreign files."""

from __future__ import annotations

import numpy as np
import pytest

from lehi.data import DataFileError
from lehi.data.bundle import TokenWindows
from lehi.data.shards import HEADER_BYTES, read_header, read_shard, write_shard


def test_round_trip_and_layout(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    path = write_shard(tmp_path / "s.bin", tokens, vocab_size=50257)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 1000
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert header[:4].tolist() == [20240520, 1, 1000, 50257] and not header[4:].any()
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)
    mapped = read_shard(path, vocab_size=50257)
    assert mapped.dtype == np.uint16 and np.array_equal(mapped, tokens)
    assert read_header(path).num_tokens == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left


def test_llmc_header_without_vocab_is_accepted(tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, 5]
    path = tmp_path / "llmc.bin"
    path.write_bytes(header.tobytes() + np.arange(5, dtype="<u2").tobytes())
    assert read_shard(path, vocab_size=50257).tolist() == [0, 1, 2, 3, 4]


def test_truncated_shard_names_the_file(tmp_path):
    path = write_shard(tmp_path / "t.bin", np.arange(100), vocab_size=257)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(
        ValueError, match=r"t\.bin: truncated or padded token shard: header says 100 tokens"
    ):
        read_shard(path)
    path.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match=r"t\.bin: truncated or not a token shard \(10 bytes"):
        read_shard(path)
    with pytest.raises(ValueError, match=r"t\.bin"):
        TokenWindows([path], context=4, batch_size=2, steps_per_epoch=1)


def test_foreign_file_names_the_file(tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(
        np.random.default_rng(1).integers(0, 256, HEADER_BYTES + 64, dtype=np.uint8).tobytes()
    )
    with pytest.raises(ValueError, match=r"foreign\.bin: not a token shard \(magic"):
        read_shard(path)
    with pytest.raises(DataFileError, match=r"missing\.bin: token shard not found"):
        read_shard(tmp_path / "missing.bin")


def test_vocabulary_checks(tmp_path):
    path = write_shard(tmp_path / "v.bin", np.arange(10), vocab_size=257)
    with pytest.raises(ValueError, match="vocabulary of 257 tokens, expected 50257"):
        read_shard(path, vocab_size=50257)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 8\)"):
        write_shard(tmp_path / "w.bin", np.arange(10), vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size"):
        write_shard(tmp_path / "w.bin", np.arange(10), vocab_size=70000)
    assert not (tmp_path / "w.bin").exists()


def test_token_ids_beyond_the_vocabulary_name_the_file(tmp_path):
    # an llm.c-style header records no vocabulary, so only the scan of the ids can catch this
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, 6]
    path = tmp_path / "big.bin"
    path.write_bytes(header.tobytes() + np.array([1, 2, 50257, 3, 65535, 0], "<u2").tobytes())
    with pytest.raises(DataFileError) as err:
        read_shard(path, vocab_size=50257)
    assert str(err.value) == f"{path}: holds token id 65535, outside the vocabulary of 50257 tokens"
    with pytest.raises(DataFileError, match="big.bin: holds token id 65535"):
        TokenWindows([path], context=2, batch_size=1, steps_per_epoch=1, vocab_size=50257)
    # a shard that records its vocabulary is checked against it when no vocabulary is asked for
    recorded = write_shard(tmp_path / "r.bin", np.arange(10), vocab_size=257)
    body = bytearray(recorded.read_bytes())
    body[HEADER_BYTES : HEADER_BYTES + 2] = (300).to_bytes(2, "little")
    recorded.write_bytes(bytes(body))
    with pytest.raises(
        DataFileError, match="r.bin: holds token id 300, outside the vocabulary of 257"
    ):
        read_shard(recorded)
    assert read_shard(path, vocab_size=65536)[2] == 50257
