"""The S3 store (MinIO SDK): the production twin of `storage.LocalStore`, same methods, same URIs.

Endpoint, region and keys come from AWS_* env (the operator injects them from the job's Secret); with no
keys the SDK's provider chain is used (IRSA / web identity, ECS, EC2 metadata), so cloud workload
identity works. Missing objects raise FileNotFoundError; everything else StorageError, never with a
credential in the message.

Reads (`open`) are seekable streams of ranged GETs pinned to the object's ETag: a connection that
breaks mid-object is retried with backoff and resumed at the byte it stopped at, an object that
changes meanwhile is an error rather than a splice, and parquet files are read by the ranges pyarrow
asks for (footer, then column chunks) instead of being downloaded whole.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dhad_api.layout import split_s3
from dhad_trainer.storage.base import CHUNK, FileEntry, StorageError, _Hashing, _StoreBase, sha256_file

PART_SIZE = 32 * 1024 * 1024  # multipart part size; bigger files go up in parts, 2 in flight per file
READ_WINDOW = 8 * 1024 * 1024  # one ranged GET covers at most this much of a streamed object
FIRST_WINDOW = 256 * 1024  # after opening or seeking: random access (parquet) fetches little extra
READ_ATTEMPTS = int(os.environ.get("DHAD_S3_READ_ATTEMPTS", "6"))
READ_BACKOFF = float(os.environ.get("DHAD_S3_READ_BACKOFF", "0.5"))  # seconds, doubled per attempt, capped at 8

log = logging.getLogger(__name__)


def _scrub(text: str) -> str:
    """Removes any credential value from a message (SDK errors quote requests, never keys, but be sure)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class _RangedReader(io.RawIOBase):
    """An object as a seekable stream of ranged GETs (If-Match its ETag), resumed where it broke."""

    def __init__(self, store: S3Store, uri: str, bucket: str, key: str, size: int, etag: str) -> None:
        self.store, self.uri, self.bucket, self.key, self.size, self.etag = store, uri, bucket, key, size, etag
        self.pos = 0
        self.resp = None
        self.window = FIRST_WINDOW  # doubles while reads stay sequential
        self.requests = 0  # GETs issued (tests and logs read it)
        self.resumed_at: list[int] = []  # byte offsets reads were resumed from

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset, io.SEEK_END: self.size + offset}[whence]
        if target != self.pos:
            self._drop()
            self.pos = max(0, target)
            self.window = FIRST_WINDOW
        return self.pos

    def _drop(self) -> None:
        if self.resp is not None:
            try:
                self.resp.close()
                self.resp.release_conn()
            except Exception:  # noqa: BLE001 - a broken connection is closed either way
                pass
            self.resp = None

    def _open(self, want: int) -> None:
        length = min(self.size - self.pos, max(want, self.window))
        self.window = min(self.window * 2, READ_WINDOW)
        headers = {"If-Match": self.etag} if self.etag else None
        self.requests += 1
        self.resp = self.store._call(f"read {self.uri}", self.store.client.get_object, self.bucket, self.key,
                                     offset=self.pos, length=length, request_headers=headers)
        self.resp_end = self.pos + length
        etag = (self.resp.headers.get("ETag") or "").strip('"')
        if self.etag and etag and etag != self.etag.strip('"'):  # servers that ignore If-Match
            self._drop()
            raise StorageError(f"read {self.uri}: the object changed while being read (ETag {self.etag} -> {etag}; "
                               "S3 error PreconditionFailed)")

    def readinto(self, buf) -> int:
        if self.pos >= self.size or len(buf) == 0:
            return 0
        from urllib3.exceptions import HTTPError

        for attempt in range(READ_ATTEMPTS):
            try:
                if self.resp is None or self.pos >= self.resp_end:
                    self._drop()
                    self._open(len(buf))
                view = memoryview(buf)[: self.resp_end - self.pos]
                n = self.resp.readinto(view)
                if n == 0:
                    raise http.client.IncompleteRead(b"", self.resp_end - self.pos)
                self.pos += n
                return n
            except (HTTPError, OSError, http.client.HTTPException) as error:
                self._drop()
                if attempt + 1 == READ_ATTEMPTS:
                    raise StorageError(_scrub(f"read {self.uri}: failed at byte {self.pos} of {self.size} after "
                                              f"{READ_ATTEMPTS} attempts ({type(error).__name__}: {error})")) from None
                self.resumed_at.append(self.pos)
                wait = min(READ_BACKOFF * 2**attempt, 8.0) * (0.5 + random.random() / 2)
                log.warning("read %s broke at byte %d (%s); resuming in %.1f s", self.uri, self.pos,
                            type(error).__name__, wait)
                time.sleep(wait)
        return 0  # pragma: no cover - the loop returns or raises

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


class S3Store(_StoreBase):
    """An S3 bucket through the MinIO SDK (MinIO, AWS S3, GCS interop, SeaweedFS in tests)."""

    def __init__(self, endpoint: str | None = None, region: str | None = None, bucket: str | None = None) -> None:
        import urllib3
        from minio import Minio
        from minio.credentials import ChainedProvider, EnvAWSProvider, EnvMinioProvider, IamAwsProvider

        url = os.environ.get("AWS_ENDPOINT_URL") or endpoint or "https://s3.amazonaws.com"
        self.url = url.rstrip("/")
        self.bucket = bucket
        secure = not self.url.startswith("http://")
        host = self.url.split("://", 1)[-1]
        key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
        self.has_keys = bool(key and secret)
        chain = None if self.has_keys else ChainedProvider([EnvAWSProvider(), EnvMinioProvider(), IamAwsProvider()])
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=10, read=120),
            maxsize=self.workers * 4,
            retries=urllib3.Retry(total=5, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
        )
        self.client = Minio(
            host, access_key=key if self.has_keys else None, secret_key=secret if self.has_keys else None,
            session_token=os.environ.get("AWS_SESSION_TOKEN"), secure=secure,
            region=os.environ.get("AWS_REGION") or region, http_client=http, credentials=chain,
        )

    def _call(self, what: str, fn, *args, **kwargs):
        """Runs one SDK call; missing objects become FileNotFoundError, the rest StorageError."""
        from minio.error import S3Error

        try:
            return fn(*args, **kwargs)
        except S3Error as error:
            if error.code in ("NoSuchKey", "NoSuchBucket", "NotFound"):
                raise FileNotFoundError(f"{what}: {error.code}") from None
            raise StorageError(_scrub(f"{what}: S3 error {error.code}: {error.message}")) from None
        except (OSError, ValueError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise StorageError(_scrub(f"{what}: {self.url} unreachable or failing ({type(error).__name__}: {error})")) from None
        except Exception as error:  # urllib3 errors are not all OSError subclasses
            raise StorageError(_scrub(f"{what}: {self.url} failed ({type(error).__name__}: {error})")) from None

    def open(self, uri: str) -> BinaryIO:
        bucket, key = split_s3(uri)
        stat = self._call(f"stat {uri}", self.client.stat_object, bucket, key)
        return io.BufferedReader(_RangedReader(self, uri, bucket, key, stat.size, stat.etag or ""), FIRST_WINDOW)

    def describe(self, uris: list[str]) -> list[tuple[str, int, str]]:
        """(uri, size, "etag:<ETag>") of each object, from one listing per bucket prefix in common."""
        wanted = set(uris)
        out = []
        for prefix in sorted({u.rsplit("/", 1)[0] + "/" for u in uris}):
            bucket, key = split_s3(prefix)
            objs = self._call(f"list {prefix}", lambda b=bucket, k=key: list(self.client.list_objects(b, prefix=k + "/" if k else None, recursive=False)))
            for o in objs:
                uri = f"s3://{bucket}/{o.object_name}"
                if uri in wanted:
                    out.append((uri, o.size or 0, f"etag:{(o.etag or '').strip(chr(34))}"))
        return out

    def list(self, prefix: str) -> list[str]:
        bucket, key = split_s3(prefix)
        key = key + "/" if prefix.endswith("/") and key else key
        objs = self._call(f"list {prefix}", lambda: list(self.client.list_objects(bucket, prefix=key or None, recursive=True)))
        return sorted(f"s3://{bucket}/{o.object_name}" for o in objs if not o.is_dir)

    def list_dirs(self, uri: str) -> list[str]:
        bucket, key = split_s3(uri)
        objs = self._call(f"list {uri}", lambda: list(self.client.list_objects(bucket, prefix=key + "/" if key else None)))
        return sorted(o.object_name.rstrip("/").rsplit("/", 1)[-1] for o in objs if o.is_dir)

    def exists(self, uri: str) -> bool:
        bucket, key = split_s3(uri)
        try:
            self._call(f"stat {uri}", self.client.stat_object, bucket, key)
            return True
        except FileNotFoundError:
            return bool(self.list(uri.rstrip("/") + "/"))

    def size(self, uri: str) -> int:
        bucket, key = split_s3(uri)
        try:
            return self._call(f"stat {uri}", self.client.stat_object, bucket, key).size
        except FileNotFoundError:
            objs = self._call(f"list {uri}", lambda: list(self.client.list_objects(bucket, prefix=key + "/", recursive=True)))
            if not objs:
                raise
            return sum(o.size or 0 for o in objs)

    def put_bytes(self, uri: str, data: bytes) -> None:
        bucket, key = split_s3(uri)
        self._call(f"write {uri}", self.client.put_object, bucket, key, io.BytesIO(data), len(data))

    def get_bytes(self, uri: str) -> bytes:
        with self.open(uri) as f:
            return f.read()

    def upload_file(self, path: Path, uri: str) -> FileEntry:
        bucket, key = split_s3(uri)
        size = path.stat().st_size
        with open(path, "rb") as f:
            reader = _Hashing(f)
            self._call(f"upload {uri}", self.client.put_object, bucket, key, reader, size,
                       part_size=PART_SIZE, num_parallel_uploads=2)
        return FileEntry(path.name, reader.size, reader.hash.hexdigest())

    def download_file(self, uri: str, path: Path) -> FileEntry:
        """Streams small files; big ones come down as parallel ranged GETs (one S3 connection tops out
        far below a node's bandwidth), then are hashed from the page cache."""
        path.parent.mkdir(parents=True, exist_ok=True)
        bucket, key = split_s3(uri)
        size = self._call(f"stat {uri}", self.client.stat_object, bucket, key).size
        if size <= 2 * PART_SIZE:
            h = hashlib.sha256()
            with open(path, "wb") as out:
                self._get_range(uri, bucket, key, 0, None, lambda chunk, _: (h.update(chunk), out.write(chunk)))
            return FileEntry(path.name, size, h.hexdigest())
        with open(path, "wb") as out:
            out.truncate(size)
            fd = out.fileno()
            starts = range(0, size, PART_SIZE)
            with ThreadPoolExecutor(max_workers=4) as pool:
                list(pool.map(lambda start: self._get_range(
                    uri, bucket, key, start, min(PART_SIZE, size - start),
                    lambda chunk, at: os.pwrite(fd, chunk, at)), starts))
        return FileEntry(path.name, size, sha256_file(path))

    def _get_range(self, uri: str, bucket: str, key: str, offset: int, length: int | None, sink) -> None:
        def fetch() -> None:
            resp = self.client.get_object(bucket, key, offset=offset, length=length or 0)
            try:
                at = offset
                for chunk in resp.stream(CHUNK):
                    sink(chunk, at)
                    at += len(chunk)
            finally:
                resp.close()
                resp.release_conn()

        self._call(f"download {uri}", fetch)

    def delete(self, uri: str) -> None:
        bucket, key = split_s3(uri)
        self._call(f"delete {uri}", self.client.remove_object, bucket, key)

    def delete_prefix(self, uri: str) -> None:
        from minio.deleteobjects import DeleteObject

        bucket, key = split_s3(uri)
        keys = [DeleteObject(split_s3(k)[1]) for k in self.list(uri.rstrip("/") + "/")]
        errors = self._call(f"delete {uri}", lambda: list(self.client.remove_objects(bucket, keys)))
        if errors:
            raise StorageError(f"delete {uri}: {len(errors)} object(s) not deleted, first: {errors[0].code}")

    def check_bucket(self) -> None:
        """Raises FileNotFoundError when the bucket is missing, StorageError when S3 is unreachable."""
        if self.bucket and not self._call(f"check bucket {self.bucket}", self.client.bucket_exists, self.bucket):
            raise FileNotFoundError(f"bucket {self.bucket!r} does not exist at {self.url}")
