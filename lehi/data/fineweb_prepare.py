"""Tokenise FineWeb text into token shards: `python -m lehi.data.fineweb_prepare`.

Sources: --source hf streams HuggingFaceFW/fineweb, config sample-10BT, with
datasets.load_dataset(..., streaming=True); --source local reads the --files given, in the
order given: .parquet (column "text"), .jsonl (one JSON object with "text" per line), .json
(a list of such objects), .txt (one document per file).

Every document becomes [<|endoftext|>] + its tokens (llm.c's convention), and the stream of
documents is cut into shards (lehi.data.shards): shard 0 is the validation shard
(fineweb_val_000000.bin, the first --val-tokens tokens), then training shards
fineweb_train_000001.bin, ... of --shard-size tokens (the last one may be shorter), until
--num-tokens tokens in all (val included) or the source ends. Documents may span shards.

Resume: after each shard, fineweb_manifest.json (atomic) records the settings, the shards and
where the next shard starts (document index and token offset inside it). A rerun with the same
settings skips the shards already complete and continues from there; a rerun with other
settings is refused rather than mixing two different token streams.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lehi.data.files import DataFileError, DataUnavailableError, atomic_write_bytes, one_line
from lehi.data.shards import is_complete_shard, write_shard
from lehi.data.tokenizer import get_tokenizer

HF_DATASET = "HuggingFaceFW/fineweb"
HF_CONFIG = "sample-10BT"
MANIFEST = "fineweb_manifest.json"
DEFAULT_VAL_TOKENS = 10_000_000
DEFAULT_SHARD_SIZE = 100_000_000
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json", ".txt")
_DOC_BATCH = 256


def shard_name(index: int) -> str:
    """llm.c's names: shard 0 is validation, the rest training."""
    split = "val" if index == 0 else "train"
    return f"fineweb_{split}_{index:06d}.bin"


def _text_of(record: Any, path: Path) -> str:
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}: every record needs a string field 'text'")
    return record["text"]


def iter_local_documents(files: Sequence[str | os.PathLike[str]]) -> Iterator[str]:
    """The texts of local parquet / jsonl / json / txt files, in the order given."""
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"text file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            if "text" not in pf.schema_arrow.names:
                raise ValueError(
                    f"{path}: parquet file has no 'text' column (has {pf.schema_arrow.names})"
                )
            for batch in pf.iter_batches(columns=["text"], batch_size=1024):
                yield from batch.column(0).to_pylist()
        elif suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield _text_of(json.loads(line), path)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                records = json.load(f)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records with 'text'")
            for record in records:
                yield _text_of(record, path)
        elif suffix == ".txt":
            yield path.read_text(encoding="utf-8")
        else:
            raise ValueError(
                f"{path}: unsupported text file type; allowed: {', '.join(LOCAL_SUFFIXES)}"
            )


def iter_hf_documents(dataset: str = HF_DATASET, config: str = HF_CONFIG) -> Iterator[str]:
    """Stream the texts of a Hugging Face dataset (network)."""
    try:
        from datasets import load_dataset

        stream = load_dataset(dataset, name=config, split="train", streaming=True)
        iterator = iter(stream)
        first = next(iterator)
    except Exception as exc:  # network and hub errors of many kinds
        raise DataUnavailableError(
            f"could not stream {dataset} ({config}) from the Hugging Face hub ({one_line(exc)}); "
            "run with network access or use --source local --files ..."
        ) from None
    yield first["text"]
    for record in iterator:
        yield record["text"]


def _settings(
    source: str,
    files: Sequence[str | os.PathLike[str]],
    tokenizer: str,
    num_tokens: int | None,
    shard_size: int,
    val_tokens: int,
) -> dict[str, Any]:
    return {
        "source": source if source == "local" else f"hf:{HF_DATASET}/{HF_CONFIG}",
        "files": [os.path.abspath(f) for f in files],
        "tokenizer": tokenizer,
        "num_tokens": num_tokens,
        "shard_size": shard_size,
        "val_tokens": val_tokens,
    }


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at `path`, its structure checked (a DataFileError naming it otherwise)."""
    try:
        manifest = json.loads(path.read_bytes())
    except OSError as exc:
        raise DataFileError(path, f"unreadable manifest ({one_line(exc)})") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise DataFileError(path, f"corrupt manifest, not JSON ({exc})") from None
    expected = (
        "expected a JSON object with 'settings' (object), 'complete' (bool) and 'shards' "
        "(list of {file, tokens, next_doc, next_offset})"
    )
    if (
        not isinstance(manifest, dict)
        or not isinstance(manifest.get("settings"), dict)
        or not isinstance(manifest.get("complete"), bool)
        or not isinstance(manifest.get("shards"), list)
    ):
        raise DataFileError(path, f"corrupt manifest: {expected}")
    for index, entry in enumerate(manifest["shards"]):
        if (
            not isinstance(entry, dict)
            or entry.get("file") != shard_name(index)
            or not isinstance(entry.get("tokens"), int)
            or isinstance(entry.get("tokens"), bool)
            or entry["tokens"] < 0
        ):
            raise DataFileError(
                path,
                f"corrupt manifest: shard entry {index} must be {{'file': {shard_name(index)!r}, "
                f"'tokens': count, ...}}, got {json.dumps(entry)[:120]}",
            )
    return manifest


def _load_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {"settings": settings, "shards": [], "complete": False}
    manifest = read_manifest(path)
    old = manifest.get("settings", {})
    for key, value in settings.items():
        if old.get(key) != value:
            raise ValueError(
                f"{path}: shards were made with {key}={old.get(key)!r}, not {value!r}; "
                "use another --out folder (or delete this one) to prepare with other settings"
            )
    # keep only the leading shards that are still complete on disk
    kept = []
    for entry in manifest["shards"]:
        if not is_complete_shard(out / entry["file"]):
            break
        kept.append(entry)
    if len(kept) < len(manifest["shards"]):
        manifest["complete"] = False
    manifest["shards"] = kept
    return manifest


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(out / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _token_stream(
    docs: Iterator[str], tokenizer: Any, start_doc: int, start_offset: int
) -> Iterator[tuple[int, np.ndarray, int]]:
    """(document index, its tokens, first position to use) from document `start_doc` on; the
    first position is `start_offset` for that document and 0 for the others."""
    batch: list[str] = []
    first_index = start_doc

    def flush() -> Iterator[tuple[int, np.ndarray, int]]:
        for k, ids in enumerate(tokenizer.encode_documents(batch)):
            index = first_index + k
            yield index, ids, start_offset if index == start_doc else 0

    for index, text in enumerate(docs):
        if index < start_doc:
            continue
        if not batch:
            first_index = index
        batch.append(text)
        if len(batch) == _DOC_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def prepare(
    out: str | os.PathLike[str],
    *,
    source: str = "local",
    files: Sequence[str | os.PathLike[str]] = (),
    num_tokens: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    val_tokens: int = DEFAULT_VAL_TOKENS,
    tokenizer: str = "gpt2",
) -> list[Path]:
    """Write (or finish) the shards in `out`; returns their paths, validation shard first."""
    if source not in ("hf", "local"):
        raise ValueError(f"source must be 'hf' or 'local', got {source!r}")
    if source == "local" and not files:
        raise ValueError("source 'local' needs at least one text file (--files)")
    for name, value in (("shard_size", shard_size), ("val_tokens", val_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if num_tokens is not None and num_tokens <= val_tokens:
        raise ValueError(f"num_tokens ({num_tokens}) must exceed val_tokens ({val_tokens})")
    if source == "local":
        for name in files:
            if not Path(name).is_file():
                raise FileNotFoundError(f"text file not found: {name}")
    out = Path(out)
    settings = _settings(source, files, tokenizer, num_tokens, shard_size, val_tokens)
    manifest = _load_manifest(out, settings)
    if manifest["complete"]:
        return [out / e["file"] for e in manifest["shards"]]

    tok = get_tokenizer(tokenizer)
    done = manifest["shards"]
    written = sum(e["tokens"] for e in done)
    start_doc, start_offset = (done[-1]["next_doc"], done[-1]["next_offset"]) if done else (0, 0)
    docs = iter_local_documents(files) if source == "local" else iter_hf_documents()

    def target(index: int) -> int:
        size = val_tokens if index == 0 else shard_size
        return size if num_tokens is None else min(size, num_tokens - written)

    pending: list[np.ndarray] = []
    have = 0
    finished = num_tokens is not None and written >= num_tokens
    if not finished:
        for doc_index, ids, pos in _token_stream(docs, tok, start_doc, start_offset):
            while pos < len(ids):
                take = ids[pos : pos + target(len(done)) - have]
                # int32 halves the buffer of a 100M-token shard compared with int64
                pending.append(take.astype(np.int32))
                have += len(take)
                pos += len(take)
                if have == target(len(done)):
                    index = len(done)
                    write_shard(out / shard_name(index), np.concatenate(pending), tok.vocab_size)
                    next_doc, next_offset = (
                        (doc_index, pos) if pos < len(ids) else (doc_index + 1, 0)
                    )
                    done.append(
                        {
                            "file": shard_name(index),
                            "tokens": have,
                            "next_doc": next_doc,
                            "next_offset": next_offset,
                        }
                    )
                    written += have
                    pending, have = [], 0
                    _save_manifest(out, manifest)
                    if num_tokens is not None and written >= num_tokens:
                        finished = True
                        break
            if finished:
                break
    if have and done:
        # the source ended inside a training shard: keep the shorter last shard
        index = len(done)
        write_shard(out / shard_name(index), np.concatenate(pending), tok.vocab_size)
        done.append(
            {"file": shard_name(index), "tokens": have, "next_doc": None, "next_offset": None}
        )
        written += have
    if len(done) < 2:
        raise ValueError(
            f"the source holds only {written + have} tokens, not enough for the {val_tokens}-token "
            "validation shard plus training data; lower val_tokens or add text"
        )
    manifest["complete"] = True
    manifest["total_tokens"] = written
    _save_manifest(out, manifest)
    return [out / e["file"] for e in done]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m lehi.data.fineweb_prepare",
        description="Tokenise FineWeb into token shards.",
    )
    parser.add_argument("--out", required=True, help="output folder for the shards and manifest")
    parser.add_argument(
        "--num-tokens", type=int, default=None, help="total tokens incl. validation (default: all)"
    )
    parser.add_argument(
        "--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="tokens per training shard"
    )
    parser.add_argument(
        "--val-tokens", type=int, default=DEFAULT_VAL_TOKENS, help="tokens in the validation shard"
    )
    parser.add_argument("--source", choices=("hf", "local"), default="hf")
    parser.add_argument(
        "--files", nargs="*", default=[], help="local .parquet/.jsonl/.json/.txt files"
    )
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 (default) or bytes")
    args = parser.parse_args(argv)
    try:
        paths = prepare(
            args.out,
            source=args.source,
            files=args.files,
            num_tokens=args.num_tokens,
            shard_size=args.shard_size,
            val_tokens=args.val_tokens,
            tokenizer=args.tokenizer,
        )
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))  # one clear line and exit status 2, no traceback
    print(f"{len(paths)} shards in {args.out} ({paths[0].name} is validation)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
