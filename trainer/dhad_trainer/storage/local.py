"""A local folder as an object store: local mode, `file://` and plain paths, tests, and the data readers'
default. Same methods and URIs as the S3 store, so callers never care which one they hold.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import BinaryIO

from dhad_trainer.storage.base import CHUNK, FileEntry, _files_under, _Hashing, _StoreBase, sha256_file


class LocalStore(_StoreBase):
    """Local files by path or `file://` URI; `list(prefix)` is every file whose path starts with `prefix`."""

    @staticmethod
    def path(uri: str) -> Path:
        return Path(uri.removeprefix("file://"))

    def norm(self, uri: str) -> str:
        return str(self.path(uri))

    def open(self, uri: str) -> BinaryIO:
        return open(self.path(uri), "rb")

    def list(self, prefix: str) -> list[str]:
        prefix = str(self.path(prefix)) if prefix.startswith("file://") else prefix
        if os.path.isfile(prefix):  # a file: itself (siblings sharing the prefix are not wanted here)
            return [prefix]
        base = prefix if os.path.isdir(prefix) else os.path.dirname(prefix) or "."
        out = []
        for root, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(root, name)
                if base == "." and not prefix.startswith("."):
                    path = os.path.relpath(path)
                if path.startswith(prefix):
                    out.append(path)
        return sorted(out)

    def describe(self, uris: list[str]) -> list[tuple[str, int, str]]:
        """(path, size, "sha256:<hex>") of each file: a local file's identity is its content."""
        return [(u, self.path(u).stat().st_size, "sha256:" + sha256_file(self.path(u))) for u in uris]

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
