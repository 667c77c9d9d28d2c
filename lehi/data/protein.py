"""UCI "Physicochemical Properties of Protein Tertiary Structure" (CASP.csv), 45,730 rows.

Columns RMSD (the target, in Angstrom) and F1..F9 (features). The header line may be absent,
plain or quoted (copies differ), and line endings vary, so the integrity check is not a file
hash but a sha256 over the parsed numeric rows: the (45730, 10) float64 array in file column
order, little-endian, C order. Parsing uses numpy.loadtxt (correctly rounded decimal to
binary), so the checksum depends only on the numbers. It was computed from the shared copy
(file sha256 79970059d24ea8df7993c6012004d63c3ebc46bb886c9b222e460b197cae962f, header added;
its data rows are byte-identical to copies of the UCI file). Copies rounded by Excel
(column F5) fail the check.

Split: fixed and documented. numpy default_rng(seed).permutation(45730) with seed 0 by default
(a dataset option, independent of the run seed, so every run shares it); the first 10%
(4,573 rows) are validation, the other 41,157 training. Features and target are standardised
with the training mean and population std; target_std converts RMSE back to Angstrom.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from lehi.data.bundle import DataBundle, TensorBatches
from lehi.data.files import DataUnavailableError, DownloadError, fetch_url, resolve_data_dir
from lehi.data.splits import split_indices, standardize

CASP_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00265/CASP.csv"
COLUMNS = ("RMSD", "F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9")
NUM_ROWS = 45_730
ROWS_SHA256 = "7ef1fe7545cf0e288fd88fd1c6a14a2ef5886f8470baca797fff3d2373f6189d"


def csv_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the file lives: <data_dir>/casp/CASP.csv."""
    return resolve_data_dir(data_dir) / "casp" / "CASP.csv"


def _header_lines(path: Path) -> int:
    """0 when the first line is data, 1 when it is a (possibly quoted or commented) header."""
    with open(path, encoding="utf-8-sig") as f:
        line = f.readline()
    fields = [f.strip().strip("\"'") for f in line.strip().lstrip("#").split(",")]
    try:
        [float(f) for f in fields]
        return 0
    except ValueError:
        pass
    if tuple(f.upper() for f in fields) != COLUMNS:
        raise ValueError(f"{path}: header {line.strip()!r} is not {','.join(COLUMNS)}")
    return 1


def read_rows(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse CASP.csv into a float64 array (N, 10): RMSD, F1..F9."""
    path = Path(path)
    try:
        rows = np.loadtxt(
            path,
            delimiter=",",
            skiprows=_header_lines(path),
            dtype=np.float64,
            ndmin=2,
            encoding="utf-8-sig",
        )
    except ValueError as exc:
        raise ValueError(
            f"{path}: not a numeric CASP table ({' '.join(str(exc).split())})"
        ) from None
    if rows.shape[1] != len(COLUMNS) or not np.isfinite(rows).all():
        raise ValueError(f"{path}: expected {len(COLUMNS)} finite columns, got shape {rows.shape}")
    return rows


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of the rows as little-endian float64 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f8").tobytes()).hexdigest()


def check_rows(rows: np.ndarray, path: Path) -> None:
    """Raise ValueError unless `rows` are the 45,730 full-precision CASP rows."""
    digest = rows_sha256(rows)
    if rows.shape != (NUM_ROWS, len(COLUMNS)) or digest != ROWS_SHA256:
        raise ValueError(
            f"{path}: {rows.shape[0]} rows with checksum {digest} are not the {NUM_ROWS} "
            f"full-precision CASP rows ({ROWS_SHA256}); delete it to re-download, or pass "
            "verify_checksums=False"
        )


def load_rows(
    data_dir: str | os.PathLike[str] | None = None, *, verify_checksums: bool = True
) -> np.ndarray:
    """The CASP rows, downloading CASP.csv from UCI first when it is missing."""
    path = csv_path(data_dir)
    if not path.is_file():

        def verify(tmp: Path) -> None:
            rows = read_rows(tmp)  # a download that does not parse is rejected either way
            if verify_checksums:
                check_rows(rows, path)

        try:
            fetch_url(CASP_URL, path, verify=verify)
        except DownloadError as exc:
            raise DataUnavailableError(
                f"CASP.csv missing in {path.parent} and {exc}; copy CASP.csv (UCI protein "
                "tertiary structure, 45,730 rows) there or run once with network access"
            ) from None
    rows = read_rows(path)
    if verify_checksums:
        check_rows(rows, path)
    return rows


def build(
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    val_fraction: float = 0.1,
    verify_checksums: bool = True,
) -> DataBundle:
    """Protein regression: 9 standardised features -> standardised RMSD (N, 1)."""
    rows = load_rows(data_dir, verify_checksums=verify_checksums)
    train_idx, val_idx = split_indices(len(rows), val_fraction, seed)
    (tx, vx), _, _ = standardize(rows[train_idx, 1:], rows[val_idx, 1:])
    (ty, vy), _, y_std = standardize(rows[train_idx, :1], rows[val_idx, :1])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))

    train = TensorBatches(tensor(tx), tensor(ty), batch_size)
    val = TensorBatches(
        tensor(vx), tensor(vy), eval_batch_size or batch_size, shuffle=False, drop_last=False
    )
    return DataBundle("protein", "mse", "rmse", (9,), 1, train, val, target_std=float(y_std[0]))
