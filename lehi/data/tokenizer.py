"""Tokenizers for the token-shard datasets: GPT-2 BPE through tiktoken (default) and raw bytes.

GPT-2 offline. tiktoken's "gpt2" encoding reads two files, vocab.bpe and encoder.json, from
its cache (TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache, each
file named by the sha1 of its URL) and downloads them on a cache miss, checking sha256s that
tiktoken records. Without internet, this module fills that cache from the GPT-2 merge ranks
in tiktoken's own "r50k_base" format, which PyPI carries inside the openai-whisper sdist
(whisper/assets/gpt2.tiktoken; its sha256 equals tiktoken's recorded r50k_base hash). From
those ranks it rebuilds vocab.bpe and encoder.json byte for byte: merge k is the split of token
256+k into two parts that BPE with the lower ranks produces, and encoder.json is json.dumps of
the byte-to-unicode token map. Both results must match tiktoken's recorded sha256s before they
are written, and tiktoken checks them again when it loads them, so the encoding used is exactly
tiktoken's "gpt2" and never an approximation.

    python -m lehi.data.tokenizer fetch            # pip download the sdist, install the files
    python -m lehi.data.tokenizer install FILE     # from a local gpt2.tiktoken / r50k_base.tiktoken
    python -m lehi.data.tokenizer check            # print where tiktoken's gpt2 comes from

get_tokenizer("gpt2") also installs automatically from the file named by env LEHI_GPT2_RANKS or
from a cached r50k_base.tiktoken. "bytes" (UTF-8 bytes, vocabulary 257, end-of-text 256) needs
no files; it exists for tests and smoke runs of the shard pipeline, never as the default.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lehi.data.files import DataUnavailableError, atomic_write_bytes, one_line

# URLs and sha256s exactly as recorded in tiktoken_ext/openai_public.py (tiktoken 0.7 - 0.14).
GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON_URL = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
)
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

RANKS_ENV = "LEHI_GPT2_RANKS"
WHISPER_REQUIREMENT = "openai-whisper==20250625"
WHISPER_RANKS_MEMBER = "whisper/assets/gpt2.tiktoken"

VOCAB_SIZES = {"gpt2": 50257, "bytes": 257}
GPT2_EOT = 50256
_FIX = (
    f"run `python -m lehi.data.tokenizer fetch` (takes the GPT-2 ranks from PyPI's openai-whisper "
    f"sdist) or set {RANKS_ENV} to a gpt2.tiktoken / r50k_base.tiktoken file"
)


def tiktoken_cache_dir() -> Path | None:
    """The folder tiktoken caches downloads in (None when caching is disabled)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def cache_path(cache_dir: Path, url: str) -> Path:
    """The file tiktoken reads for `url` from its cache."""
    return cache_dir / hashlib.sha1(url.encode()).hexdigest()


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte (as in tiktoken.load)."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (lines "<base64 token> <rank>")."""
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """BPE of `token` using only merges of rank < max_rank (yields the pair that made it)."""
    parts = [bytes([b]) for b in token]
    while True:
        best: tuple[int, int] | None = None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def gpt2_files_from_ranks(ranks_data: bytes) -> tuple[bytes, bytes]:
    """Rebuild GPT-2's (vocab.bpe, encoder.json) from r50k_base ranks; both sha256-checked."""
    actual = hashlib.sha256(ranks_data).hexdigest()
    if actual != R50K_SHA256:
        raise ValueError(
            f"GPT-2 ranks file has sha256 {actual}, expected tiktoken's r50k_base {R50K_SHA256}"
        )
    ranks = parse_ranks(ranks_data)
    to_text = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_text[b] for b in token)

    ordered = sorted(ranks.items(), key=lambda item: item[1])
    merges = ["#version: 0.2"]
    for token, rank in ordered:
        if len(token) > 1:
            first, second = _merge_parts(ranks, token, rank)
            merges.append(f"{text(first)} {text(second)}")
    vocab_bpe = ("\n".join(merges) + "\n").encode()
    encoder = {text(token): rank for token, rank in ordered}
    encoder["<|endoftext|>"] = GPT2_EOT
    encoder_json = json.dumps(encoder).encode()
    for name, data, expected in (
        ("vocab.bpe", vocab_bpe, GPT2_VOCAB_BPE_SHA256),
        ("encoder.json", encoder_json, GPT2_ENCODER_JSON_SHA256),
    ):
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise ValueError(
                f"rebuilt GPT-2 {name} has sha256 {digest}, expected tiktoken's {expected}"
            )
    return vocab_bpe, encoder_json


def install_gpt2(
    ranks: bytes | str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Put tiktoken's gpt2 (and r50k_base) files into its cache, built from r50k_base ranks."""
    data = ranks if isinstance(ranks, bytes) else Path(ranks).read_bytes()
    target = Path(cache_dir) if cache_dir is not None else tiktoken_cache_dir()
    if target is None:
        raise ValueError(
            "tiktoken caching is disabled (TIKTOKEN_CACHE_DIR is empty); set it to a folder"
        )
    vocab_bpe, encoder_json = gpt2_files_from_ranks(data)
    atomic_write_bytes(cache_path(target, R50K_URL), data)
    atomic_write_bytes(cache_path(target, GPT2_VOCAB_BPE_URL), vocab_bpe)
    atomic_write_bytes(cache_path(target, GPT2_ENCODER_JSON_URL), encoder_json)
    return target


def _member_bytes(archive: Path, suffix: str) -> bytes | None:
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.name.endswith(suffix) and member.isfile():
                    f = tar.extractfile(member)
                    return f.read() if f is not None else None
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.endswith(suffix):
                    return zf.read(name)
    return None


def fetch_ranks_from_pypi(requirement: str = WHISPER_REQUIREMENT) -> bytes:
    """Download `requirement` with pip (no dependencies, not installed) and return its gpt2 ranks."""
    with tempfile.TemporaryDirectory(prefix="lehi-gpt2-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            tmp,
            requirement,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = " ".join(result.stderr.split())[-300:]
            raise DataUnavailableError(f"`pip download {requirement}` failed: {tail}")
        for archive in sorted(Path(tmp).iterdir()):
            data = _member_bytes(archive, WHISPER_RANKS_MEMBER)
            if data is not None:
                return data
    raise DataUnavailableError(f"{requirement} holds no {WHISPER_RANKS_MEMBER}")


def _gpt2_cached(cache_dir: Path | None) -> bool:
    return cache_dir is not None and all(
        cache_path(cache_dir, url).is_file() for url in (GPT2_VOCAB_BPE_URL, GPT2_ENCODER_JSON_URL)
    )


def _local_ranks(cache_dir: Path | None) -> Path | None:
    """A ranks file to install from: env LEHI_GPT2_RANKS, else a cached r50k_base.tiktoken."""
    env = os.environ.get(RANKS_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise DataUnavailableError(f"{RANKS_ENV}={env} does not name a file; {_FIX}")
        return path
    if cache_dir is not None and cache_path(cache_dir, R50K_URL).is_file():
        return cache_path(cache_dir, R50K_URL)
    return None


def gpt2_encoding() -> Any:
    """tiktoken's "gpt2" Encoding, filling its cache from local ranks first when needed."""
    import tiktoken

    cache_dir = tiktoken_cache_dir()
    if not _gpt2_cached(cache_dir):
        ranks = _local_ranks(cache_dir)
        if ranks is not None:
            install_gpt2(ranks, cache_dir)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # requests' ConnectionError, tiktoken's hash ValueError, ...
        raise DataUnavailableError(
            f"tiktoken's GPT-2 files (vocab.bpe, encoder.json) are not in its cache {cache_dir} and "
            f"could not be downloaded ({one_line(exc)}); {_FIX}"
        ) from None


@dataclass(frozen=True)
class Tokenizer:
    """Turns documents into token ids; `eot` separates documents."""

    name: str
    vocab_size: int
    eot: int
    encoding: Any = field(default=None, repr=False)  # the tiktoken Encoding (None for "bytes")

    def encode_documents(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids (int64) of each text, each prefixed by the end-of-text token."""
        if self.name == "bytes":
            encoded = [
                np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts
            ]
        else:
            encoded = [
                np.asarray(ids, dtype=np.int64)
                for ids in self.encoding.encode_ordinary_batch(list(texts))
            ]
        return [np.concatenate([[self.eot], ids]).astype(np.int64) for ids in encoded]


def get_tokenizer(name: str = "gpt2") -> Tokenizer:
    """ "gpt2" (tiktoken, 50,257 tokens, <|endoftext|> = 50256) or "bytes" (257 tokens, eot 256)."""
    if name == "gpt2":
        enc = gpt2_encoding()
        return Tokenizer("gpt2", enc.n_vocab, enc.eot_token, enc)
    if name == "bytes":
        return Tokenizer("bytes", VOCAB_SIZES["bytes"], 256)
    raise ValueError(f"unknown tokenizer {name!r}; known: {', '.join(VOCAB_SIZES)}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: fetch | install FILE | check."""
    parser = argparse.ArgumentParser(
        prog="python -m lehi.data.tokenizer", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser(
        "fetch", help="pip download the openai-whisper sdist and install tiktoken's gpt2 files"
    )
    fetch.add_argument("--requirement", default=WHISPER_REQUIREMENT)
    fetch.add_argument("--cache-dir", default=None, help="default: tiktoken's cache folder")
    install = sub.add_parser(
        "install", help="install tiktoken's gpt2 files from a local ranks file"
    )
    install.add_argument("ranks", help="gpt2.tiktoken / r50k_base.tiktoken")
    install.add_argument("--cache-dir", default=None, help="default: tiktoken's cache folder")
    sub.add_parser("check", help="load tiktoken's gpt2 and print a test encoding")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            enc = gpt2_encoding()
            sample = enc.encode_ordinary("Hello world")
            print(
                f"gpt2 from {tiktoken_cache_dir()}: n_vocab {enc.n_vocab}, 'Hello world' -> {sample}"
            )
        else:
            ranks = (
                fetch_ranks_from_pypi(args.requirement) if args.command == "fetch" else args.ranks
            )
            print(f"installed tiktoken gpt2 files in {install_gpt2(ranks, args.cache_dir)}")
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))  # one clear line and exit status 2, no traceback
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
