"""Which store serves a URI: S3 for `s3://`, a local folder otherwise. Lives apart from both stores so
neither implementation imports the other.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from dhad_api.common import Storage
from dhad_api.layout import split_s3
from dhad_trainer.storage.local import LocalStore


def open_store(uri: str, storage: Storage | None = None):
    """The store for `uri`: S3 for s3:// (endpoint and region from env, else the spec), else a folder."""
    if uri.startswith("s3://"):
        from dhad_trainer.storage.s3 import S3Store

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

    def describe(self, uris: list[str]) -> list[tuple[str, int, str]]:
        return [row for uri in uris for row in self._for(uri).describe([uri])] if len(
            {u.startswith("s3://") for u in uris}) > 1 else (self._for(uris[0]).describe(uris) if uris else [])

    def exists(self, uri: str) -> bool:
        return self._for(uri).exists(uri)
