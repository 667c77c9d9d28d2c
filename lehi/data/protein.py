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
import io
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from lehi.data.bundle import DataBundle, TensorBatches
from lehi.data.files import (
    DataFileError,
    DataUnavailableError,
    DownloadError,
    content_key,
    fetch_url,
    load_cached,
    one_line,
    resolve_data_dir,
    store_cached,
)
from lehi.data.splits import split_indices, standardize

CASP_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/00265/CASP.csv"
COLUMNS = ("RMSD", "F1", "F2", "F3", "F4", "F5", "F6", "F7", "F8", "F9")
NUM_ROWS = 45_730
ROWS_SHA256 = "7ef1fe7545cf0e288fd88fd1c6a14a2ef5886f8470baca797fff3d2373f6189d"
# Cache entry of the parsed table; bump the version when parsing changes.
_CACHE_NAME, _CACHE_KIND = "casp-rows.npz", "casp-rows v1"
# anything but printable ASCII, tab and line breaks: binary data or a corrupted byte
_NOT_TEXT = re.compile(rb"[^\x20-\x7e\t\r\n]")


def csv_path(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the file lives: <data_dir>/casp/CASP.csv."""
    return resolve_data_dir(data_dir) / "casp" / "CASP.csv"


def _header_lines(path: Path, first_line: str) -> int:
    """0 when the first line is data, 1 when it is a (possibly quoted or commented) header."""
    if not first_line.strip():
        raise DataFileError(path, f"empty first line; expected {','.join(COLUMNS)} or a data row")
    fields = [f.strip().strip("\"'") for f in first_line.strip().lstrip("#").split(",")]
    try:
        [float(f) for f in fields]
        return 0
    except ValueError:
        pass
    if tuple(f.upper() for f in fields) != COLUMNS:
        shown = first_line.strip()[:80]
        raise DataFileError(path, f"header {shown!r} is not {','.join(COLUMNS)}")
    return 1


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataFileError(path, f"unreadable ({one_line(exc)})") from None


def read_rows(path: str | os.PathLike[str]) -> np.ndarray:
    """Parse CASP.csv into a float64 array (N, 10): RMSD, F1..F9 (see rows_of)."""
    path = Path(path)
    return rows_of(path, _read_bytes(path))


def rows_of(path: Path, raw: bytes) -> np.ndarray:
    """Parse `raw`, the bytes of the CASP table `path`, into a float64 array (N, 10).

    The bytes are untrusted: they must be printable ASCII text (after an optional UTF-8 BOM),
    with the expected header if any, ten numbers on every non-blank row and every value
    finite; any fault is a DataFileError naming the file.
    """
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    stray = _NOT_TEXT.search(raw)
    if stray is not None:
        raise DataFileError(
            path,
            f"not a CSV text table (byte {stray.group()[0]:#04x} at offset {stray.start()})",
        )
    text = io.StringIO(raw.decode("ascii"), newline=None)
    first_line = text.readline()
    text.seek(0)
    try:
        with warnings.catch_warnings():
            # an empty table is refused below; numpy's "input contained no data" adds nothing
            warnings.simplefilter("ignore", UserWarning)
            rows = np.loadtxt(
                text,
                delimiter=",",
                comments=None,  # a "#" inside the table is corruption, not a comment
                skiprows=_header_lines(path, first_line),
                dtype=np.float64,
                ndmin=2,
            )
    except ValueError as exc:
        raise DataFileError(path, f"not a numeric CASP table ({exc})") from None
    if rows.shape[0] == 0 or rows.shape[1] != len(COLUMNS):
        raise DataFileError(
            path, f"expected rows of {len(COLUMNS)} columns ({','.join(COLUMNS)}), got {rows.shape}"
        )
    bad = ~np.isfinite(rows)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataFileError(
            path, f"{COLUMNS[col]} of data row {row + 1} is {rows[row, col]}; values must be finite"
        )
    return rows


def rows_sha256(rows: np.ndarray) -> str:
    """sha256 of the rows as little-endian float64 bytes in C order."""
    return hashlib.sha256(np.ascontiguousarray(rows, dtype="<f8").tobytes()).hexdigest()


def check_rows(rows: np.ndarray, path: Path) -> None:
    """Raise ValueError unless `rows` are the 45,730 full-precision CASP rows."""
    digest = rows_sha256(rows)
    if rows.shape != (NUM_ROWS, len(COLUMNS)) or digest != ROWS_SHA256:
        raise DataFileError(
            path,
            f"{rows.shape[0]} rows with checksum {digest} are not the {NUM_ROWS} "
            f"full-precision CASP rows ({ROWS_SHA256}); delete it to re-download, or pass "
            "verify_checksums=False",
        )


def _check_standardized(
    path: Path, mean: np.ndarray, std: np.ndarray, parts: tuple[np.ndarray, ...]
) -> None:
    """Refuse columns whose standardisation overflows (e.g. one cell of 1e308 makes the std
    infinite, which would silently turn the whole feature into zeros)."""
    finite = np.isfinite(mean) & np.isfinite(std)
    for part in parts:
        finite &= np.isfinite(part).all(axis=0)
    if not finite.all():
        col = int(np.argmin(finite))
        raise DataFileError(
            path,
            f"column {COLUMNS[col]} cannot be standardised in float64 (training mean {mean[col]:g}, "
            f"std {std[col]:g}); its values are too large",
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
    rows = _cached_rows(path)
    if verify_checksums:
        check_rows(rows, path)
    return rows


def _cached_rows(path: Path) -> np.ndarray:
    """read_rows through a cache in <folder>/.lehi-cache/ keyed on the sha256 of the file's
    bytes (read on every call, so an edited file is never served stale); a cached table that
    is not (N, 10) finite float64 is parsed again."""
    raw = _read_bytes(path)
    key = content_key(_CACHE_KIND, raw)
    stored = load_cached(path.parent, _CACHE_NAME, key)
    rows = None if stored is None else stored.get("rows")
    if (
        rows is not None
        and rows.dtype == np.float64
        and rows.ndim == 2
        and rows.shape[0] > 0
        and rows.shape[1] == len(COLUMNS)
        and np.isfinite(rows).all()
    ):
        return rows
    rows = rows_of(path, raw)
    store_cached(path.parent, _CACHE_NAME, key, {"rows": rows})
    return rows


def build(
    *,
    data_dir: str | os.PathLike[str] | None,
    seed: int,
    val_fraction: float,
    batch_size: int,
    eval_batch_size: int | None,
    verify_checksums: bool,
) -> DataBundle:
    """Protein regression: 9 standardised features -> standardised RMSD (N, 1).

    Defaults: conf/dataset/protein.yaml.
    """
    rows = load_rows(data_dir, verify_checksums=verify_checksums)
    train_idx, val_idx = split_indices(len(rows), val_fraction, seed)
    with np.errstate(over="ignore", invalid="ignore"):
        (train_rows, val_rows), mean, std = standardize(rows[train_idx], rows[val_idx])
    _check_standardized(csv_path(data_dir), mean, std, (train_rows, val_rows))
    # column 0 is the target (RMSD), columns 1..9 the features
    tx, ty, vx, vy = train_rows[:, 1:], train_rows[:, :1], val_rows[:, 1:], val_rows[:, :1]

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32))

    train = TensorBatches(tensor(tx), tensor(ty), batch_size)
    val = TensorBatches(
        tensor(vx), tensor(vy), eval_batch_size or batch_size, shuffle=False, drop_last=False
    )
    return DataBundle(
        name="protein",
        task="regression",
        loss="mse",
        metric="rmse",
        input_shape=(9,),
        num_outputs=1,
        train=train,
        val=val,
        target_std=float(std[0]),
    )
