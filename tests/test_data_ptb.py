"""Penn Treebank: small files in Mikolov's format, md5 checks, downloads through file:// URLs,
the offline error, and the shared real files."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.net import closed_port_url

import lehi.data as data
from lehi.data import ptb
from lehi.data.files import DataUnavailableError

SHARED = Path(
    os.environ.get("LEHI_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
TEXT = {
    "train": [" the cat sat on the mat ", " the dog sat on the <unk> ", " a cat and a dog "] * 20,
    "valid": [" the cat saw a bird ", " a dog sat "] * 5,
    "test": [" the mat sat on the cat "] * 6,
}


def write_ptb(folder: Path, text: dict[str, list[str]] = TEXT) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, lines in text.items():
        (folder / f"ptb.{split}.txt").write_text("".join(line + "\n" for line in lines))


def test_small_files_vocab_and_bptt(tmp_path):
    write_ptb(tmp_path / "ptb")
    vocab, ids = ptb.load_corpus(tmp_path, verify_checksums=False)
    words = [w for line in TEXT["train"] for w in [*line.split(), "<eos>"]]
    counts = Counter(words)
    assert set(vocab) == set(counts) and sorted(vocab.values()) == list(range(len(counts)))
    assert vocab["the"] == 0 and all(
        counts[a] >= counts[b]
        for a, b in zip(sorted(vocab, key=vocab.get), sorted(vocab, key=vocab.get)[1:])
    )
    inverse = {i: w for w, i in vocab.items()}
    assert [inverse[i] for i in ids["train"].tolist()] == words
    valid_words = [w for line in TEXT["valid"] for w in [*line.split(), "<eos>"]]
    assert [inverse[i] for i in ids["valid"].tolist()] == [
        w if w in vocab else "<unk>" for w in valid_words
    ]

    bundle = data.build(
        "ptb",
        data_dir=tmp_path,
        batch_size=3,
        bptt=5,
        eval_batch_size=None,
        verify_checksums=False,
    )
    assert (bundle.loss, bundle.metric, bundle.input_shape) == ("cross_entropy", "perplexity", ())
    assert bundle.num_outputs == len(vocab) and bundle.task == "language_model"
    stream = ids["train"]
    column = len(stream) // 3
    x, y = next(bundle.train.iter_epoch(0, 0))
    assert x.shape == (3, 5) and x.dtype == torch.int64
    assert torch.equal(x[1], stream[column : column + 5]) and torch.equal(
        y[1], stream[column + 1 : column + 6]
    )
    test_bundle = data.build(
        "ptb",
        data_dir=tmp_path,
        batch_size=2,
        bptt=4,
        eval_batch_size=None,
        val_split="test",
        verify_checksums=False,
    )
    assert torch.equal(next(test_bundle.val.iter_epoch(0, 0))[0][0], ids["test"][:4])
    with pytest.raises(ValueError, match="val_split"):
        data.build("ptb", data_dir=tmp_path, val_split="train", verify_checksums=False)


def test_unknown_word_without_unk_is_an_error(tmp_path):
    write_ptb(tmp_path / "ptb", {"train": [" a b "] * 3, "valid": [" a c "], "test": [" a "]})
    with pytest.raises(ValueError, match="ptb.valid.txt: word 'c'"):
        ptb.load_corpus(tmp_path, verify_checksums=False)


def test_md5_mismatch_is_an_error_and_the_file_is_kept(tmp_path):
    write_ptb(tmp_path / "ptb")
    with pytest.raises(
        ValueError, match=r"ptb.train.txt: md5 \w+ does not match the PTB original f26c4b92"
    ):
        data.build("ptb", data_dir=tmp_path)
    assert (tmp_path / "ptb" / "ptb.train.txt").is_file()


def test_download_through_temp_name(tmp_path, monkeypatch):
    write_ptb(tmp_path / "remote")
    monkeypatch.setattr(ptb, "BASE_URL", (tmp_path / "remote").as_uri() + "/")
    target = tmp_path / "data"
    paths = ptb.ensure_files(target, verify_checksums=False)
    for split, path in paths.items():
        assert path.read_bytes() == (tmp_path / "remote" / f"ptb.{split}.txt").read_bytes()
    assert sorted(p.name for p in (target / "ptb").iterdir()) == [
        "ptb.test.txt",
        "ptb.train.txt",
        "ptb.valid.txt",
    ]


def test_download_md5_mismatch_leaves_nothing(tmp_path, monkeypatch):
    write_ptb(tmp_path / "remote")
    monkeypatch.setattr(ptb, "BASE_URL", (tmp_path / "remote").as_uri() + "/")
    target = tmp_path / "data"
    with pytest.raises(ValueError, match="ptb.train.txt: md5"):
        data.build("ptb", data_dir=target)
    assert not target.exists()


def test_offline_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ptb, "BASE_URL", closed_port_url())
    target = tmp_path / "data"
    with pytest.raises(DataUnavailableError) as err:
        data.build("ptb", data_dir=target)
    message = str(err.value)
    assert "\n" not in message and f"PTB files missing in {target / 'ptb'}" in message
    assert "ptb.train.txt, ptb.valid.txt, ptb.test.txt" in message
    assert not target.exists()


@pytest.mark.skipif(not (SHARED / "ptb").is_dir(), reason="shared PTB not available")
def test_shared_ptb():
    vocab, ids = ptb.load_corpus(SHARED, verify_checksums=True)
    assert len(vocab) == 10000 and "<unk>" in vocab and "<eos>" in vocab
    # words + one <eos> per line, from the shared README's line and word counts
    assert len(ids["train"]) == 887_521 + 42_068
    assert len(ids["valid"]) == 70_390 + 3_370
    assert len(ids["test"]) == 78_669 + 3_761
    bundle = data.build("ptb", data_dir=SHARED)
    assert bundle.num_outputs == 10000
    assert bundle.train.steps_per_epoch == (929_589 // 20 - 1) // 35


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "holds no words; expected PTB text, one sentence per line"),
        (b" \n\n  \n", "holds no words"),
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe",
            "binary data, not PTB text (invalid UTF-8",
        ),
        (b" the cat \x00 sat \n", "binary data, not PTB text (control character 0x00"),
    ],
)
def test_bad_text_file_names_that_file(tmp_path, split, content, expected):
    write_ptb(tmp_path / "ptb")
    path = tmp_path / "ptb" / f"ptb.{split}.txt"
    path.write_bytes(content)
    with pytest.raises(data.DataFileError) as err:
        data.build("ptb", data_dir=tmp_path, verify_checksums=False, val_split="valid")
    message = str(err.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


def test_stream_too_short_for_a_batch_names_the_file(tmp_path):
    write_ptb(tmp_path / "ptb", {**TEXT, "valid": [" a cat "]})
    with pytest.raises(data.DataFileError) as err:
        data.build(
            "ptb",
            data_dir=tmp_path,
            verify_checksums=False,
            batch_size=2,
            bptt=5,
            eval_batch_size=None,
        )
    assert str(err.value) == (
        f"{tmp_path / 'ptb' / 'ptb.valid.txt'}: 3 tokens are too few for one batch of 2 x 6"
    )


def test_line_endings_read_as_text_mode_does(tmp_path):
    path = tmp_path / "ptb.train.txt"
    path.write_bytes(" a b \r\n c \r d\u2028e\x85f \n\n g".encode())
    with open(path, encoding="utf-8") as f:
        expected = [w for line in f for w in [*line.split(), "<eos>"]]
    assert ptb.read_words(path) == expected
    assert expected.count("<eos>") == 5


def test_tokenised_corpus_is_cached_by_content_and_checked(tmp_path):
    write_ptb(tmp_path / "ptb")
    fresh = ptb.load_corpus(tmp_path, verify_checksums=False)
    cache = tmp_path / "ptb" / ".lehi-cache" / "ptb-tokens.npz"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns

    def same(a, b):
        return a[0] == b[0] and all(torch.equal(a[1][s], b[1][s]) for s in ptb.SPLITS)

    assert same(ptb.load_corpus(tmp_path, verify_checksums=False), fresh)
    assert cache.stat().st_mtime_ns == stamp  # served from the cache, not rewritten
    # an edit of the same size (and, here, the same mtime) is a different key
    train = tmp_path / "ptb" / "ptb.train.txt"
    stat = train.stat()
    train.write_text(train.read_text().replace("cat", "cow"))
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    edited = ptb.load_corpus(tmp_path, verify_checksums=False)
    assert "cow" in edited[0] and "cat" not in edited[0]
    # a corrupted or tampered entry is never used: the corpus is tokenised again
    cache.write_bytes(cache.read_bytes()[:100])
    assert same(ptb.load_corpus(tmp_path, verify_checksums=False), edited)
    stored = dict(np.load(cache))
    stored["train"] = stored["train"] + len(edited[0])  # ids beyond the vocabulary, same key
    np.savez(cache, **stored)
    assert same(ptb.load_corpus(tmp_path, verify_checksums=False), edited)


def test_read_only_folder_gets_no_cache(tmp_path):
    write_ptb(tmp_path / "ptb")
    (tmp_path / "ptb").chmod(0o555)
    try:
        vocab, _ = ptb.load_corpus(tmp_path, verify_checksums=False)
        assert not (tmp_path / "ptb" / ".lehi-cache").exists() and "cat" in vocab
    finally:
        (tmp_path / "ptb").chmod(0o755)
