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
import shutil
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dhad_api.common import Storage
from dhad_api.layout import split_s3
from dhad_trainer.data.readers import LocalStore as _ReaderLocalStore

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


class LocalStore(_StoreBase, _ReaderLocalStore):
    """A local folder as an object store (local mode, `file://` and plain paths, tests)."""

    @staticmethod
    def path(uri: str) -> Path:
        return Path(uri.removeprefix("file://"))

    def norm(self, uri: str) -> str:
        return str(self.path(uri))

    def open(self, uri: str) -> BinaryIO:
        return open(self.path(uri), "rb")

    def list(self, prefix: str) -> list[str]:
        return list(_ReaderLocalStore.list(self, str(self.path(prefix))))

    def list_dirs(self, uri: str) -> list[str]:
        folder = self.path(uri)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []

    def exists(self, uri: str) -> bool:
        return self.path(uri).exists()

    def size(self, uri: str) -> int:
        p = self.path(uri)
        return sum(f.stat().st_size for f in _files_under(p)) if p.is_dir() else p.stat().st_size

    def put_bytes(self, uri: str, data: bytes) -> None:
        p = self.path(uri)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(p)  # readers never see half a file: a manifest appears whole or not at all

    def get_bytes(self, uri: str) -> bytes:
        return self.path(uri).read_bytes()

    def upload_file(self, path: Path, uri: str) -> FileEntry:
        dest = self.path(uri)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src, open(dest, "wb") as out:
            reader = _Hashing(src)
            shutil.copyfileobj(reader, out, CHUNK)
        return FileEntry(dest.name, reader.size, reader.hash.hexdigest())

    def download_file(self, uri: str, path: Path) -> FileEntry:
        return self.upload_file(self.path(uri), str(path))

    def delete(self, uri: str) -> None:
        self.path(uri).unlink(missing_ok=True)

    def delete_prefix(self, uri: str) -> None:
        p = self.path(uri)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)

    def check_bucket(self) -> None:
        """Nothing to check for a folder; it is created on first write."""




def open_store(uri: str, storage: Storage | None = None):
    """The store for `uri`: S3 for s3:// (endpoint and region from env, else the spec), else a folder."""
    if uri.startswith("s3://"):
        from dhad_trainer.s3store import S3Store

        bucket = split_s3(uri)[0]
        return S3Store(storage.endpoint if storage else None, storage.region if storage else None, bucket)
    return LocalStore()


class RoutingStore:
    """An ObjectStore for data readers that serves both s3:// URIs and local paths."""

    def __init__(self, storage: Storage | None = None) -> None:
        self.storage, self._s3, self._local = storage, None, LocalStore()

    def _for(self, uri: str):
        if uri.startswith("s3://"):
            self._s3 = self._s3 or open_store(uri, self.storage)
            return self._s3
        return self._local

    def open(self, uri: str) -> BinaryIO:
        return self._for(uri).open(uri)

    def list(self, prefix: str) -> Iterator[str] | list[str]:
        return self._for(prefix).list(prefix)

    def size(self, uri: str) -> int:
        return self._for(uri).size(uri)

    def exists(self, uri: str) -> bool:
        return self._for(uri).exists(uri)
