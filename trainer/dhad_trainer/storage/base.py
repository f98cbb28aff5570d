"""Object storage for checkpoints, models and data: S3 (MinIO SDK) and a local-folder twin.

Both stores take full URIs (`s3://bucket/key` or a path / `file://` path), so callers never build keys by
hand, and both satisfy `dhad_trainer.data.readers.ObjectStore` (`open`, `list`). Whole folders move with
a thread pool (files in parallel; big files as multipart uploads with parallel parts), hashing each file
on the fly so a checkpoint manifest costs no second read. Credentials come from the environment or
the SDK's provider chain (IAM / web identity) and are scrubbed from every error message.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

CHUNK = 4 * 1024 * 1024
WORKERS = int(os.environ.get("DHAD_STORAGE_WORKERS", "8"))


class StorageError(Exception):
    """The object store failed or could not be reached (retryable: maps to StorageUnavailable)."""


@dataclass(frozen=True)
class FileEntry:
    """One stored file: its path relative to the folder it was uploaded from, size and sha256."""

    path: str
    size: int
    sha256: str


class _Hashing(io.RawIOBase):
    """Reads through a file while hashing it, so an upload and its checksum take one pass."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hash, self.size = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        self.size += len(data)
        return data


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


class _StoreBase:
    """Folder transfers in terms of the per-file primitives each store implements."""

    workers = WORKERS

    def norm(self, uri: str) -> str:
        return uri

    def upload_file(self, path: Path, uri: str) -> FileEntry:  # pragma: no cover - abstract
        raise NotImplementedError

    def download_file(self, uri: str, path: Path) -> FileEntry:  # pragma: no cover - abstract
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def upload_dir(self, folder: str | Path, uri: str, on_file: Callable[[FileEntry], None] | None = None) -> list[FileEntry]:
        """Uploads every file under `folder` to `uri/<relative path>`; returns entries sorted by path."""
        folder, base = Path(folder), uri.rstrip("/")
        files = _files_under(folder)

        def one(p: Path) -> FileEntry:
            rel = p.relative_to(folder).as_posix()
            entry = self.upload_file(p, f"{base}/{rel}")
            entry = FileEntry(rel, entry.size, entry.sha256)
            if on_file:
                on_file(entry)
            return entry

        return self._parallel(one, files)

    def download_dir(self, uri: str, folder: str | Path, paths: Iterable[str] | None = None) -> list[FileEntry]:
        """Downloads `uri/<p>` to `folder/<p>` for each relative path `p` (default: everything under uri)."""
        folder, base = Path(folder), self.norm(uri).rstrip("/")
        if paths is None:
            paths = [k[len(base) + 1 :] for k in self.list(base + "/")]
        return self._parallel(lambda rel: self._fetch(f"{base}/{rel}", folder / rel, rel), list(paths))

    def _fetch(self, uri: str, path: Path, rel: str) -> FileEntry:
        entry = self.download_file(uri, path)
        return FileEntry(rel, entry.size, entry.sha256)

    def _parallel(self, fn, items: list) -> list[FileEntry]:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.workers, len(items))) as pool:
            return sorted(pool.map(fn, items), key=lambda e: e.path)
