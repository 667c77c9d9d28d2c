"""FineWeb language modelling from token shards (see lehi.data.fineweb_prepare).

Shards are read from `shard_dir` (default <data_dir>/fineweb): fineweb_val_000000.bin is the
validation shard and fineweb_train_*.bin the training shards (llm.c's names, so llm.c's
FineWeb shards work too). With `text_files`, the folder is first brought up to date with
fineweb_prepare.prepare (a no-op when its shards are complete, a resume when they are not, an
error when they were made with other settings).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from lehi.data.bundle import DataBundle, TokenWindows
from lehi.data.files import DataFileError, DataUnavailableError, resolve_data_dir
from lehi.data.fineweb_prepare import MANIFEST, prepare, read_manifest
from lehi.data.shards import read_header
from lehi.data.tokenizer import VOCAB_SIZES


def find_shards(shard_dir: Path) -> tuple[list[Path], list[Path]] | None:
    """(val shards, train shards) of a finished preparation in `shard_dir`, else None.

    A complete manifest is trusted for the list of files only: each must exist and hold the
    number of tokens the manifest records (DataFileError naming the shard otherwise).
    """
    manifest = shard_dir / MANIFEST
    if manifest.is_file():
        info = read_manifest(manifest)
        if not info["complete"]:
            return None
        if len(info["shards"]) < 2:
            raise DataFileError(
                manifest,
                "corrupt manifest: a complete preparation lists a validation shard "
                "and at least one training shard",
            )
        files = []
        for entry in info["shards"]:
            path = shard_dir / entry["file"]
            if not path.is_file():
                raise DataFileError(path, f"token shard listed in {manifest} is missing")
            tokens = read_header(path).num_tokens
            if tokens != entry["tokens"]:
                raise DataFileError(
                    path, f"holds {tokens} tokens, {manifest} records {entry['tokens']}"
                )
            files.append(path)
        return files[:1], files[1:]
    val = sorted(shard_dir.glob("fineweb_val_*.bin"))
    train = sorted(shard_dir.glob("fineweb_train_*.bin"))
    return (val, train) if val and train else None


def build(
    *,
    data_dir: str | os.PathLike[str] | None,
    shard_dir: str | os.PathLike[str] | None,
    text_files: Sequence[str | os.PathLike[str]] | None,
    context: int,
    batch_size: int,
    steps_per_epoch: int,
    val_steps: int | None,
    eval_batch_size: int | None,
    tokenizer: str,
    val_tokens: int,
    shard_size: int,
    num_tokens: int | None,
) -> DataBundle:
    """Random training windows of `context` tokens (`steps_per_epoch` batches per epoch) and
    sequential validation windows (all of the validation shard, or the first `val_steps` batches).

    val_tokens / shard_size / num_tokens only matter when `text_files` are tokenised here.
    Defaults: conf/dataset/fineweb.yaml (`python -m lehi.data.fineweb_prepare` keeps its own
    command-line defaults for the same sizes, as a separate tool).
    """
    if tokenizer not in VOCAB_SIZES:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; known: {', '.join(VOCAB_SIZES)}")
    folder = Path(shard_dir) if shard_dir is not None else resolve_data_dir(data_dir) / "fineweb"
    if text_files:
        # prepare() returns at once when the shards are complete, refuses other settings, and
        # resumes an interrupted preparation
        prepare(
            folder,
            source="local",
            files=list(text_files),
            num_tokens=num_tokens,
            shard_size=shard_size,
            val_tokens=val_tokens,
            tokenizer=tokenizer,
        )
    shards = find_shards(folder)
    if shards is None:
        raise DataUnavailableError(
            f"no complete FineWeb token shards in {folder} (expected fineweb_val_000000.bin and "
            f"fineweb_train_*.bin); make them with `python -m lehi.data.fineweb_prepare --out {folder}` "
            "(--source hf, or --source local --files ...) or pass text_files"
        )
    val_paths, train_paths = shards
    vocab = VOCAB_SIZES[tokenizer]
    for path in (*val_paths, *train_paths):
        recorded = read_header(path).vocab_size
        if recorded not in (0, vocab):
            raise DataFileError(
                path,
                f"shard vocabulary {recorded} does not match tokenizer {tokenizer!r} ({vocab})",
            )
    train = TokenWindows(
        train_paths, context, batch_size, steps_per_epoch, random=True, vocab_size=vocab
    )
    val = TokenWindows(
        val_paths, context, eval_batch_size or batch_size, val_steps, random=False, vocab_size=vocab
    )
    return DataBundle(
        name="fineweb",
        task="language_model",
        loss="cross_entropy",
        metric="perplexity",
        input_shape=(),
        num_outputs=vocab,
        train=train,
        val=val,
    )
