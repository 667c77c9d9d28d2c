"""FineWeb: local text readers, shard preparation (order, sizes, resume), the fineweb builder,
and tiktoken's GPT-2 encoding (offline install from the r50k_base ranks; skipped when the
ranks cannot be obtained)."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import lehi.data as data
from lehi.data import fineweb_prepare, tokenizer
from lehi.data.files import DataUnavailableError
from lehi.data.fineweb_prepare import iter_local_documents, prepare
from lehi.data.shards import read_shard

SHARED = Path(
    os.environ.get("LEHI_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
SAMPLE = SHARED / "fineweb" / "fineweb_first300docs.parquet"
DOCS = [f"Document {i}: " + "héllo wörld, " * (i % 7 + 1) + "✓" * (i % 3) for i in range(60)]


def byte_stream(docs: list[str]) -> np.ndarray:
    """The expected token stream of the bytes tokenizer: [256] + UTF-8 bytes per document."""
    return np.concatenate([np.array([256, *d.encode("utf-8")]) for d in docs])


def shard_stream(paths: list[Path]) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]).astype(np.int64)


def write_sources(folder: Path, docs: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = folder / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    js = folder / "docs.json"
    js.write_text(json.dumps([{"text": d} for d in docs]))
    parquet = folder / "docs.parquet"
    pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), parquet)
    txt = folder / "one.txt"
    txt.write_text(docs[0])
    return {"jsonl": jsonl, "json": js, "parquet": parquet, "txt": txt}


def test_local_readers(tmp_path):
    files = write_sources(tmp_path, DOCS)
    for kind in ("jsonl", "json", "parquet"):
        assert list(iter_local_documents([files[kind]])) == DOCS
    assert list(iter_local_documents([files["txt"], files["jsonl"]])) == [DOCS[0], *DOCS]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: every record needs a string field 'text'"):
        list(iter_local_documents([bad]))
    csv = tmp_path / "x.csv"
    csv.write_text("a")
    with pytest.raises(ValueError, match="x.csv: unsupported text file type"):
        list(iter_local_documents([csv]))
    with pytest.raises(FileNotFoundError, match="text file not found"):
        list(iter_local_documents([tmp_path / "absent.jsonl"]))


def test_prepare_order_sizes_and_manifest(tmp_path):
    files = write_sources(tmp_path / "src", DOCS)
    out = tmp_path / "shards"
    paths = prepare(
        out, files=[files["parquet"]], tokenizer="bytes", val_tokens=300, shard_size=500
    )
    expected = byte_stream(DOCS)
    assert np.array_equal(shard_stream(paths), expected)
    sizes = [len(read_shard(p, vocab_size=257)) for p in paths]
    assert sizes[0] == 300 and all(s == 500 for s in sizes[1:-1]) and 0 < sizes[-1] <= 500
    assert paths[0].name == "fineweb_val_000000.bin" and paths[1].name == "fineweb_train_000001.bin"
    manifest = json.loads((out / "fineweb_manifest.json").read_text())
    assert manifest["complete"] and manifest["total_tokens"] == len(expected)
    limited = prepare(
        tmp_path / "limited",
        files=[files["jsonl"]],
        tokenizer="bytes",
        val_tokens=300,
        shard_size=500,
        num_tokens=1100,
    )
    assert [len(read_shard(p)) for p in limited] == [300, 500, 300]
    assert np.array_equal(shard_stream(limited), expected[:1100])
    with pytest.raises(ValueError, match=f"only {len(DOCS[0].encode()) + 1} tokens"):
        prepare(tmp_path / "tiny", files=[files["txt"]], tokenizer="bytes", val_tokens=300)
    with pytest.raises(ValueError, match="shard_size=500, not 400"):
        prepare(out, files=[files["parquet"]], tokenizer="bytes", val_tokens=300, shard_size=400)


LONG_DOCS = [f"{i} " + "long document text " * 60 for i in range(4)]


@pytest.mark.parametrize(
    ("docs", "val_tokens", "shard_size", "crash_at"),
    [(DOCS, 250, 400, 3), (LONG_DOCS, 100, 150, 4)],  # the second resumes inside a long document
)
def test_prepare_resumes_after_interruption(
    tmp_path, monkeypatch, docs, val_tokens, shard_size, crash_at
):
    files = write_sources(tmp_path / "src", docs)
    settings = dict(
        files=[files["jsonl"]], tokenizer="bytes", val_tokens=val_tokens, shard_size=shard_size
    )
    reference = prepare(tmp_path / "reference", **settings)

    real_write = fineweb_prepare.write_shard
    calls = []

    def crash(path, tokens, vocab_size):
        calls.append(path)
        if len(calls) == crash_at:
            raise KeyboardInterrupt  # the process dies while writing this shard
        return real_write(path, tokens, vocab_size)

    out = tmp_path / "out"
    monkeypatch.setattr(fineweb_prepare, "write_shard", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare(out, **settings)
    monkeypatch.setattr(fineweb_prepare, "write_shard", real_write)
    manifest = json.loads((out / "fineweb_manifest.json").read_text())
    assert not manifest["complete"] and len(manifest["shards"]) == crash_at - 1
    if docs is LONG_DOCS:
        assert manifest["shards"][-1]["next_offset"] > 0  # the resume point is inside a document
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert len(before) == crash_at - 1

    resumed = prepare(out, **settings)
    assert [p.name for p in resumed] == [p.name for p in reference]
    assert np.array_equal(shard_stream(resumed), byte_stream(docs))
    ref_manifest = json.loads((tmp_path / "reference" / "fineweb_manifest.json").read_text())
    assert (
        json.loads((out / "fineweb_manifest.json").read_text())["shards"] == ref_manifest["shards"]
    )
    for a, b in zip(resumed, reference):
        assert a.read_bytes() == b.read_bytes()
    assert all(out.joinpath(n).stat().st_mtime_ns == t for n, t in before.items())  # not rewritten

    resumed[2].unlink()  # a lost shard is rebuilt identically
    again = prepare(out, **settings)
    assert again[2].read_bytes() == reference[2].read_bytes()
    assert not list(out.glob(".*"))  # no temp files left


def test_fineweb_builder_prepares_text_files(tmp_path):
    files = write_sources(tmp_path / "src", DOCS)
    options = dict(
        data_dir=tmp_path / "data",
        text_files=[str(files["json"])],
        tokenizer="bytes",
        val_tokens=256,
        shard_size=600,
    )
    bundle = data.build("fineweb", context=32, batch_size=4, steps_per_epoch=7, **options)
    assert (bundle.loss, bundle.metric, bundle.input_shape, bundle.num_outputs) == (
        "cross_entropy",
        "perplexity",
        (),
        257,
    )
    assert bundle.task == "language_model"
    assert (tmp_path / "data" / "fineweb" / "fineweb_val_000000.bin").is_file()
    batches = list(bundle.train.iter_epoch(0, 3))
    assert (
        len(batches) == 7 and batches[0][0].shape == (4, 32) and batches[0][0].dtype == torch.int64
    )
    again = list(bundle.train.iter_epoch(0, 3, start_step=4))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches[4:], again)
    )
    stream = byte_stream(DOCS)
    val_x = torch.cat([x for x, _ in bundle.val.iter_epoch(0, 0)])
    assert (
        val_x.shape == ((256 - 1) // 32, 32)
        and val_x.flatten().tolist() == stream[: 7 * 32].tolist()
    )
    # a second build reuses the shards; a vocabulary mismatch is refused
    assert (
        data.build(
            "fineweb",
            context=32,
            batch_size=4,
            steps_per_epoch=2,
            data_dir=tmp_path / "data",
            tokenizer="bytes",
        ).val.num_examples
        == 256
    )
    with pytest.raises(ValueError, match="vocabulary 257 does not match tokenizer 'gpt2'"):
        data.build("fineweb", context=32, data_dir=tmp_path / "data")


def test_fineweb_missing_shards_is_one_clear_error(tmp_path):
    with pytest.raises(DataUnavailableError) as err:
        data.build("fineweb", data_dir=tmp_path)
    message = str(err.value)
    assert (
        "\n" not in message
        and f"no complete FineWeb token shards in {tmp_path / 'fineweb'}" in message
    )
    assert "python -m lehi.data.fineweb_prepare" in message


def test_hf_source_offline_is_one_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(
            "Couldn't reach 'HuggingFaceFW/fineweb' on the Hub (LocalEntryNotFoundError)"
        )

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataUnavailableError, match="could not stream HuggingFaceFW/fineweb .sample-10BT."
    ):
        prepare(tmp_path / "out", source="hf", tokenizer="bytes", val_tokens=10)
    assert not (tmp_path / "out").exists()


def test_command_line(tmp_path, capsys):
    files = write_sources(tmp_path / "src", DOCS)
    argv = [
        "--out",
        str(tmp_path / "cli"),
        "--source",
        "local",
        "--files",
        str(files["parquet"]),
        "--tokenizer",
        "bytes",
        "--val-tokens",
        "300",
        "--shard-size",
        "1000",
    ]
    assert fineweb_prepare.main(argv) == 0
    assert "shards in" in capsys.readouterr().out
    assert np.array_equal(
        shard_stream(sorted((tmp_path / "cli").glob("*.bin"), key=lambda p: p.name[-10:])),
        byte_stream(DOCS),
    )


# ---------------------------------------------------------------- GPT-2 through tiktoken


def _tiktoken_gpt2_hashes() -> list[str]:
    """The sha256s tiktoken itself records for vocab.bpe and encoder.json (read from its source)."""
    import tiktoken_ext.openai_public as public

    return re.findall(r'"([0-9a-f]{64})"', inspect.getsource(public.gpt2))


@pytest.fixture(scope="module")
def gpt2():
    try:
        return tokenizer.get_tokenizer("gpt2")
    except DataUnavailableError as exc:
        pytest.skip(f"GPT-2 BPE files not obtainable here: {exc}")


@pytest.fixture(scope="module")
def ranks_file():
    env = os.environ.get(tokenizer.RANKS_ENV)
    cache = tokenizer.tiktoken_cache_dir()
    for path in ([Path(env)] if env else []) + (
        [tokenizer.cache_path(cache, tokenizer.R50K_URL)] if cache else []
    ):
        if path.is_file():
            return path
    pytest.skip("no GPT-2 ranks file (run `python -m lehi.data.tokenizer fetch`)")


def test_install_rebuilds_tiktoken_gpt2_files_offline(ranks_file, tmp_path, monkeypatch):
    import tiktoken
    import tiktoken.load
    import tiktoken.registry

    cache = tmp_path / "cache"
    tokenizer.install_gpt2(ranks_file, cache)
    written = {hashlib.sha256(p.read_bytes()).hexdigest() for p in cache.iterdir()}
    assert set(_tiktoken_gpt2_hashes()) <= written

    def no_network(url):
        raise ConnectionError(f"offline test: {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    enc = tiktoken.get_encoding("gpt2")
    # "Hello world" -> [15496, 995] as documented for the GPT-2 tokenizer
    assert enc.encode_ordinary("Hello world") == [15496, 995] and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_bad_ranks_file_is_rejected(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(b"IQ== 0\n")
    with pytest.raises(ValueError, match="expected tiktoken's r50k_base"):
        tokenizer.install_gpt2(bad, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_gpt2_files_is_one_clear_error(tmp_path, monkeypatch):
    import tiktoken.load
    import tiktoken.registry

    def no_network(url):
        raise ConnectionError(f"offline test: {url}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.delenv(tokenizer.RANKS_ENV, raising=False)
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    with pytest.raises(DataUnavailableError) as err:
        tokenizer.get_tokenizer("gpt2")
    message = str(err.value)
    assert (
        "\n" not in message
        and "python -m lehi.data.tokenizer fetch" in message
        and "vocab.bpe" in message
    )
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'"):
        tokenizer.get_tokenizer("llama")


@pytest.mark.skipif(not SAMPLE.is_file(), reason="shared FineWeb sample not available")
def test_shared_sample_gpt2_shards(gpt2, tmp_path):
    docs = pq.read_table(SAMPLE, columns=["text", "token_count"]).to_pydict()
    out = tmp_path / "fineweb"
    paths = prepare(out, files=[SAMPLE], val_tokens=16384, shard_size=65536)
    stream = shard_stream(paths)
    enc = gpt2.encoding
    counts = [len(enc.encode_ordinary(t)) for t in docs["text"]]
    assert len(stream) == sum(counts) + 300 and int((stream == 50256).sum()) == 300
    assert stream[0] == 50256 and stream[1 : 1 + counts[0]].tolist() == enc.encode_ordinary(
        docs["text"][0]
    )
    # FineWeb's own token_count column (GPT-2 counts by its pipeline) agrees for nearly all documents
    agree = np.mean(np.array(counts) == np.array(docs["token_count"]))
    assert agree > 0.95 and abs(sum(counts) - sum(docs["token_count"])) < 0.001 * sum(counts)
    bundle = data.build("fineweb", shard_dir=out, context=128, batch_size=16, steps_per_epoch=3)
    assert bundle.num_outputs == 50257
    x, y = next(bundle.train.iter_epoch(0, 0))
    assert x.shape == (16, 128) and int(x.max()) < 50257
    assert bundle.val.steps_per_epoch == -(-((16384 - 1) // 128) // 16)


def _prepared(tmp_path: Path) -> Path:
    files = write_sources(tmp_path / "src", DOCS)
    out = tmp_path / "data" / "fineweb"
    prepare(out, files=[files["json"]], tokenizer="bytes", val_tokens=256, shard_size=600)
    return out


def _build(folder: Path) -> data.DataBundle:
    return data.build(
        "fineweb", shard_dir=folder, tokenizer="bytes", context=32, batch_size=4, steps_per_epoch=2
    )


def test_missing_shard_of_a_complete_preparation_names_it(tmp_path):
    out = _prepared(tmp_path)
    (out / "fineweb_train_000002.bin").unlink()
    with pytest.raises(data.DataFileError) as err:
        _build(out)
    assert str(err.value) == (
        f"{out / 'fineweb_train_000002.bin'}: token shard listed in "
        f"{out / fineweb_prepare.MANIFEST} is missing"
    )


def test_shard_with_ids_beyond_the_vocabulary_names_it(tmp_path):
    out = _prepared(tmp_path)
    shard = out / "fineweb_train_000001.bin"
    raw = bytearray(shard.read_bytes())
    raw[1024 + 2 * 50 : 1024 + 2 * 51] = (257).to_bytes(2, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(data.DataFileError) as err:
        _build(out)
    assert str(err.value) == f"{shard}: holds token id 257, outside the vocabulary of 257 tokens"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda text: text[: len(text) // 2], "corrupt manifest, not JSON"),
        (lambda text: "[]", "corrupt manifest: expected a JSON object"),
        (lambda text: text.replace('"complete": true', '"complete": "yes"'), "expected a JSON"),
        (
            lambda text: text.replace("fineweb_train_000001.bin", "../../etc/passwd"),
            "corrupt manifest: shard entry 1 must be {'file': 'fineweb_train_000001.bin'",
        ),
        (lambda text: text.replace('"tokens": 600', '"tokens": 601', 1), "holds 600 tokens"),
    ],
)
def test_corrupt_manifest_names_it(tmp_path, edit, expected):
    out = _prepared(tmp_path)
    manifest = out / fineweb_prepare.MANIFEST
    manifest.write_text(edit(manifest.read_text()))
    with pytest.raises(data.DataFileError) as err:
        _build(out)
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith(str(out))
