"""Where data lives, checksums, atomic writes and downloads with a temp name + rename.

Every dataset module uses these helpers so that a download is either complete and verified
or leaves nothing behind, and so that "offline with data missing" is one clear error.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lehi.io import atomic_write_bytes

__all__ = [
    "DataFileError",
    "DataUnavailableError",
    "DownloadError",
    "atomic_write_bytes",
    "content_key",
    "file_digest",
    "fetch_url",
    "load_cached",
    "store_cached",
]

DATA_DIR_ENV = "LEHI_DATA_DIR"
#: Folder (inside a dataset's folder) of parsed copies of its files; safe to delete.
CACHE_DIR = ".lehi-cache"
DEFAULT_DATA_DIR = "data"
_CHUNK = 1 << 20


class DataUnavailableError(FileNotFoundError):
    """Data is missing locally and could not be obtained (e.g. no network)."""


class DataFileError(ValueError):
    """A data file is not what its format promises: str is the one line "<file>: <problem>".

    For files that are present but malformed, truncated, inconsistent or hostile; a file that
    is missing and cannot be fetched is a DataUnavailableError instead.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")

    def __reduce__(self) -> tuple[type[DataFileError], tuple[Path, str]]:
        # the default reduction would call __init__ with the joined message only
        return (type(self), (self.path, self.problem))


class DownloadError(OSError):
    """A network fetch failed; the message is one line with the reason."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(fd: int) -> None:
    """Give a mkstemp file (created 0600) the usual permissions of a new file (0666 - umask)."""
    os.fchmod(fd, 0o666 & ~_umask())


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Return `data_dir`, else env LEHI_DATA_DIR, else "data" (relative to the working dir)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (`algorithm` is any hashlib name, e.g. "md5", "sha256")."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def missing_dirs(path: Path) -> list[Path]:
    """The ancestors of `path` (itself included) that do not exist yet, outermost first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing[::-1]


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove the given folders, innermost first, where they are empty (cleanup after failure)."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            break


def one_line(exc: BaseException, max_chars: int = 240) -> str:
    """A short one-line description of an exception (for wrapping network errors)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        text = str(exc.reason)
    else:
        text = str(exc)
    text = " ".join(text.split())
    if len(text) > max_chars:
        text = text[: max_chars - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_url(
    url: str,
    dest: str | os.PathLike[str],
    *,
    verify: Callable[[Path], None] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` through a temp name in the same folder, then rename.

    `verify(tmp_path)` runs on the complete download before the rename and raises (ValueError)
    to reject it; the temp file is deleted in every failure case, and folders this call created
    are removed again when the download fails, so nothing is left behind. Network failures
    raise DownloadError with a one-line reason. Also accepts file:// URLs.
    """
    dest = Path(dest)
    created = missing_dirs(dest.parent)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    ok = False
    try:
        make_readable(fd)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "lehi-data/0.1"})
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(request, timeout=timeout) as resp,
            ):
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DownloadError(f"could not download {url}: {one_line(exc)}") from None
        if verify is not None:
            verify(tmp)
        os.replace(tmp, dest)
        ok = True
        return dest
    finally:
        if not ok:
            tmp.unlink(missing_ok=True)
            remove_empty_dirs(created)


def content_key(kind: str, *blobs: bytes) -> str:
    """sha256 naming parsed data: what it is (`kind`, with its format version) and the exact
    bytes it was parsed from, so a cache entry can never describe other contents."""
    h = hashlib.sha256(kind.encode())
    for blob in blobs:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


def load_cached(folder: Path, name: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays store_cached kept as `name` in `folder` under `key`; None when absent, stale
    or unreadable (the caller then parses the source files again)."""
    try:
        with np.load(folder / CACHE_DIR / name, allow_pickle=False) as stored:
            if str(stored["key"]) != key:
                return None
            return {entry: stored[entry] for entry in stored.files if entry != "key"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None


def _writable(folder: Path) -> bool:
    # A folder without write bits is read-only by intent (e.g. a shared copy), even for root.
    try:
        return bool(folder.stat().st_mode & 0o222) and os.access(folder, os.W_OK)
    except OSError:
        return False


def store_cached(folder: Path, name: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Keep `arrays` as <folder>/.lehi-cache/<name> (an .npz without pickled objects) under
    `key`, written atomically. Skipped when `folder` is read-only or the write fails: the
    cache only saves time, and every reader validates what it loads."""
    if not _writable(folder):
        return
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), **arrays)
    try:
        (folder / CACHE_DIR).mkdir(exist_ok=True)
        atomic_write_bytes(folder / CACHE_DIR / name, buffer.getvalue())
    except OSError:
        return
