"""The S3 store (MinIO SDK): the production twin of `storage.LocalStore`, same methods, same URIs.

Endpoint, region and keys come from AWS_* env (the operator injects them from the job's Secret); with no
keys the SDK's provider chain is used (IRSA / web identity, ECS, EC2 metadata), so cloud workload
identity works. Missing objects raise FileNotFoundError; everything else StorageError, never with a
credential in the message.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from dhad_api.layout import split_s3
from dhad_trainer.storage.base import CHUNK, FileEntry, StorageError, _Hashing, _StoreBase, sha256_file

PART_SIZE = 32 * 1024 * 1024  # multipart part size; bigger files go up in parts, 2 in flight per file


def _scrub(text: str) -> str:
    """Removes any credential value from a message (SDK errors quote requests, never keys, but be sure)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


class _Response(io.RawIOBase):
    """A GET body as a closable binary stream (readers iterate lines; gzip and parquet read it)."""

    def __init__(self, resp) -> None:
        self.resp = resp

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        return self.resp.readinto(buf)

    def close(self) -> None:
        if not self.closed:
            self.resp.close()
            self.resp.release_conn()
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
        return io.BufferedReader(_Response(self._call(f"read {uri}", self.client.get_object, bucket, key)), CHUNK)

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
