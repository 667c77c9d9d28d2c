"""UCI CASP (protein): header/line-ending forms, the fixed split and standardisation, downloads
through a file:// URL, checksum and offline errors, and the shared real file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers.net import closed_port_url

import lehi.data as data
from lehi.data import protein
from lehi.data.files import DataUnavailableError

SHARED = Path(
    os.environ.get("LEHI_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
SHARED_CSV = SHARED / "casp" / "CASP.csv"
HEADERS = {
    "plain": "RMSD,F1,F2,F3,F4,F5,F6,F7,F8,F9",
    "quoted": '"RMSD","F1","F2","F3","F4","F5","F6","F7","F8","F9"',
    "comment": '# "RMSD","F1","F2","F3","F4","F5","F6","F7","F8","F9"',
    "none": None,
}


def make_rows(n: int = 200) -> np.ndarray:
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(n, 10)) * rng.uniform(0.1, 1000, size=10)
    rows[:, 0] = np.abs(rows[:, 0])
    return rows


def write_csv(path: Path, rows: np.ndarray, header: str | None, newline: str = "\n") -> Path:
    lines = ([header] if header else []) + [",".join(repr(float(v)) for v in row) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((newline.join(lines) + newline).encode())
    return path


@pytest.mark.parametrize("form", sorted(HEADERS))
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_header_and_line_ending_forms_parse_identically(tmp_path, form, newline):
    rows = make_rows()
    path = write_csv(tmp_path / "CASP.csv", rows, HEADERS[form], newline)
    parsed = protein.read_rows(path)
    assert np.array_equal(parsed, rows)
    assert protein.rows_sha256(parsed) == protein.rows_sha256(rows)


def test_wrong_header_names_the_file(tmp_path):
    path = write_csv(tmp_path / "CASP.csv", make_rows(), "A,B,C,D,E,F,G,H,I,J")
    with pytest.raises(ValueError, match="CASP.csv: header"):
        protein.read_rows(path)


def test_split_and_standardisation(tmp_path):
    rows = make_rows()
    write_csv(tmp_path / "casp" / "CASP.csv", rows, HEADERS["plain"])
    bundle = data.build("protein", data_dir=tmp_path, batch_size=16, verify_checksums=False)
    assert (bundle.loss, bundle.metric, bundle.input_shape, bundle.num_outputs) == (
        "mse",
        "rmse",
        (9,),
        1,
    )
    assert bundle.task == "regression"
    # the documented split: default_rng(seed).permutation(N), the first 10% are validation
    perm = np.random.default_rng(0).permutation(200)
    val_idx, train_idx = np.sort(perm[:20]), np.sort(perm[20:])
    train, val = rows[train_idx], rows[val_idx]
    mean, std = train.mean(axis=0), train.std(axis=0)
    assert np.allclose(bundle.train.inputs.numpy(), (train[:, 1:] - mean[1:]) / std[1:], atol=1e-5)
    assert np.allclose(bundle.val.targets.numpy(), (val[:, :1] - mean[0]) / std[0], atol=1e-5)
    assert bundle.train.targets.shape == (180, 1) and bundle.val.targets.shape == (20, 1)
    assert bundle.target_std == pytest.approx(std[0])
    x, y = next(bundle.train.iter_epoch(0, 0))
    assert x.shape == (16, 9) and y.shape == (16, 1)
    same = data.build("protein", data_dir=tmp_path, batch_size=64, verify_checksums=False)
    assert np.array_equal(same.val.inputs.numpy(), bundle.val.inputs.numpy())
    other = data.build("protein", data_dir=tmp_path, seed=1, verify_checksums=False)
    assert not np.array_equal(other.val.inputs.numpy(), bundle.val.inputs.numpy())


def test_download_through_temp_name(tmp_path, monkeypatch):
    source = write_csv(tmp_path / "remote" / "CASP.csv", make_rows(), HEADERS["quoted"], "\r\n")
    monkeypatch.setattr(protein, "CASP_URL", source.as_uri())
    target = tmp_path / "data"
    rows = protein.load_rows(target, verify_checksums=False)
    assert rows.shape == (200, 10)
    assert (target / "casp" / "CASP.csv").read_bytes() == source.read_bytes()
    # the download left no temp file; the parsed table is cached next to it
    assert sorted(p.name for p in (target / "casp").iterdir()) == [".lehi-cache", "CASP.csv"]


def test_download_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    source = write_csv(tmp_path / "remote" / "CASP.csv", make_rows(), HEADERS["plain"])
    monkeypatch.setattr(protein, "CASP_URL", source.as_uri())
    target = tmp_path / "data"
    with pytest.raises(ValueError, match="are not the 45730 full-precision CASP rows"):
        protein.load_rows(target)
    assert not target.exists()


def test_existing_file_with_wrong_rows_is_not_used(tmp_path):
    path = write_csv(tmp_path / "casp" / "CASP.csv", make_rows(), HEADERS["plain"])
    with pytest.raises(ValueError, match=str(path)):
        data.build("protein", data_dir=tmp_path)
    assert path.is_file()  # reported, not deleted behind the user's back


def test_offline_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(protein, "CASP_URL", closed_port_url("CASP.csv"))
    target = tmp_path / "data"
    with pytest.raises(DataUnavailableError) as err:
        data.build("protein", data_dir=target)
    message = str(err.value)
    assert "\n" not in message and f"CASP.csv missing in {target / 'casp'}" in message
    assert "could not download" in message
    assert not target.exists()


@pytest.mark.skipif(not SHARED_CSV.is_file(), reason="shared CASP.csv not available")
def test_shared_casp(tmp_path):
    rows = protein.load_rows(SHARED, verify_checksums=True)
    assert rows.shape == (45730, 10)
    assert rows[:, 0].mean() == pytest.approx(7.7485, abs=1e-4)
    assert rows[:, 0].min() == 0.0 and rows[:, 0].max() == pytest.approx(20.999)
    # the same rows with a quoted header and CRLF line endings have the same checksum
    lines = SHARED_CSV.read_text().splitlines()
    variant = tmp_path / "CASP_quoted_crlf.csv"
    variant.write_text("\r\n".join([HEADERS["quoted"], *lines[1:]]) + "\r\n", newline="")
    protein.check_rows(protein.read_rows(variant), variant)
    bundle = data.build("protein", data_dir=SHARED)
    assert bundle.train.num_examples == 41157 and bundle.val.num_examples == 4573
    train_idx = np.sort(np.random.default_rng(0).permutation(45730)[4573:])
    assert bundle.target_std == pytest.approx(rows[train_idx, 0].std())


def test_huge_cell_is_refused_not_zeroed(tmp_path):
    rows = make_rows()
    rows[17, 4] = 1e308  # finite, but the column's std overflows: F4 would become all zeros
    write_csv(tmp_path / "casp" / "CASP.csv", rows, HEADERS["plain"])
    with pytest.raises(data.DataFileError) as err:
        data.build("protein", data_dir=tmp_path, verify_checksums=False)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'casp' / 'CASP.csv'}: column F4 cannot be standardised")
    assert "\n" not in message


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("1,2,3,4,5,6,7,8,9,nan\n", "F9 of data row 2 is nan; values must be finite"),
        ("1,2,3,4,5,6,7,8,9,1e999\n", "F9 of data row 2 is inf"),
        ("1,2,3,4,5,6,7,8,9\n", "not a numeric CASP table"),
        ("1,2,3,4,5,6,7,8,9,x\n", "not a numeric CASP table"),
    ],
)
def test_bad_cells_name_the_file(tmp_path, body, expected):
    path = tmp_path / "CASP.csv"
    path.write_text(HEADERS["plain"] + "\n1,2,3,4,5,6,7,8,9,10\n" + body)
    with pytest.raises(data.DataFileError) as err:
        protein.read_rows(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "empty first line"),
        (HEADERS["plain"].encode() + b"\n", "expected rows of 10 columns"),
        (
            b"1,2,3\n4,5,6\n",
            "expected rows of 10 columns (RMSD,F1,F2,F3,F4,F5,F6,F7,F8,F9), got (2, 3)",
        ),
        (b"\xff\xfe\x00R\x00M", "not a CSV text table (byte 0xff at offset 0)"),
        (b"1,2,3,4,5,6,7,8,9,\x0b1\n", "not a CSV text table (byte 0x0b at offset 18)"),
    ],
)
def test_empty_binary_and_narrow_files_name_the_file(tmp_path, content, expected):
    path = tmp_path / "CASP.csv"
    path.write_bytes(content)
    with pytest.raises(data.DataFileError) as err:
        protein.read_rows(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value)


def test_parsed_rows_are_cached_by_content_and_checked(tmp_path):
    rows = make_rows()
    path = write_csv(tmp_path / "casp" / "CASP.csv", rows, HEADERS["plain"])
    assert np.array_equal(protein.load_rows(tmp_path, verify_checksums=False), rows)
    cache = tmp_path / "casp" / ".lehi-cache" / "casp-rows.npz"
    assert cache.is_file()
    assert np.array_equal(protein.load_rows(tmp_path, verify_checksums=False), rows)
    rows[3, 2] = 42.0
    write_csv(path, rows, HEADERS["plain"])
    assert np.array_equal(protein.load_rows(tmp_path, verify_checksums=False), rows)
    stored = dict(np.load(cache))
    stored["rows"][0, 0] = np.inf  # a tampered entry under the right key is parsed again
    np.savez(cache, **stored)
    assert np.array_equal(protein.load_rows(tmp_path, verify_checksums=False), rows)
