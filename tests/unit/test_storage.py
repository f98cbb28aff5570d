"""The object stores against a real S3 server (SeaweedFS) and a local folder: same behaviour, same URIs."""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest

from dhad_api.data_prep import SourceSpec
from dhad_trainer.data.readers import ObjectStore, iter_source
from dhad_trainer.storage import s3
from dhad_trainer.storage.base import StorageError
from dhad_trainer.storage.local import LocalStore
from dhad_trainer.storage.routing import RoutingStore, open_store
from dhad_trainer.storage.s3 import S3Store


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(params=["s3", "local"])
def store_and_root(request, tmp_path):
    if request.param == "local":
        return LocalStore(), str(tmp_path / "bucket" / "root")
    request.getfixturevalue("s3_env")
    root = request.getfixturevalue("s3_prefix")
    return open_store(root), root


def make_tree(folder, big: int = 0):
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(os.urandom(1000))
    if big:
        (folder / "big.bin").write_bytes(os.urandom(big))
    return folder


@pytest.mark.s3
def test_bytes_list_exists_size_delete(store_and_root):
    store, root = store_and_root
    assert isinstance(store, ObjectStore)
    store.put_bytes(f"{root}/x/one.json", b'{"a": 1}')
    store.put_bytes(f"{root}/x/two.json", b"22")
    store.put_bytes(f"{root}/y/three", b"333")
    assert store.get_bytes(f"{root}/x/one.json") == b'{"a": 1}'
    assert store.list(f"{root}/x") == [f"{root}/x/one.json", f"{root}/x/two.json"]
    assert store.list_dirs(root) == ["x", "y"]
    assert store.exists(f"{root}/x/one.json") and store.exists(f"{root}/x") and not store.exists(f"{root}/nope")
    assert store.size(f"{root}/x/two.json") == 2 and store.size(f"{root}/x") == 10
    with pytest.raises(FileNotFoundError):
        store.get_bytes(f"{root}/x/missing")
    store.delete_prefix(f"{root}/x")
    assert store.list(f"{root}/x") == [] and store.exists(f"{root}/y/three")
    store.delete(f"{root}/y/three")
    assert not store.exists(f"{root}/y/three")


@pytest.mark.s3
def test_folder_round_trip_with_hashes_and_multipart(store_and_root, tmp_path, monkeypatch):
    store, root = store_and_root
    monkeypatch.setattr(s3, "PART_SIZE", 5 * 1024 * 1024)  # S3's smallest part: 3 parts for 11 MiB
    src = make_tree(tmp_path / "src", big=11 * 1024 * 1024 + 7)
    seen = []
    up = store.upload_dir(src, f"{root}/tree", on_file=seen.append)
    assert [e.path for e in up] == ["a.txt", "big.bin", "sub/b.bin"] and len(seen) == 3
    for e in up:
        data = (src / e.path).read_bytes()
        assert e.size == len(data) and e.sha256 == hashlib.sha256(data).hexdigest()
    down = store.download_dir(f"{root}/tree", tmp_path / "dst")
    assert down == up
    assert (tmp_path / "dst" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    only = store.download_dir(f"{root}/tree", tmp_path / "some", ["sub/b.bin"])
    assert [e.path for e in only] == ["sub/b.bin"] and not (tmp_path / "some" / "a.txt").exists()


@pytest.mark.s3
def test_data_readers_stream_from_the_store(store_and_root, tmp_path):
    """`open`/`list` satisfy the data pipeline's ObjectStore: a gzipped jsonl read straight from S3."""
    store, root = store_and_root
    lines = [json.dumps({"text": f"نص رقم {i}"}, ensure_ascii=False) for i in range(300)]
    store.put_bytes(f"{root}/data/part-0.jsonl.gz", gzip.compress("\n".join(lines).encode()))
    store.put_bytes(f"{root}/data/_SUCCESS", b"")
    texts = list(iter_source(SourceSpec(uri=f"{root}/data/"), RoutingStore()))
    assert len(texts) == 300 and texts[7] == "نص رقم 7"


@pytest.mark.s3
def test_errors_never_show_credentials(s3_server, s3_bucket, monkeypatch):
    env = s3_server.env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_server.secret_key)
    with pytest.raises(StorageError) as bad_key:
        S3Store(bucket=s3_bucket).put_bytes(f"s3://{s3_bucket}/x", b"1")
    assert s3_server.secret_key not in str(bad_key.value) and s3_server.access_key not in str(bad_key.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(StorageError) as unreachable:
        S3Store(bucket=s3_bucket).get_bytes(f"s3://{s3_bucket}/x")
    assert "127.0.0.1:9" in str(unreachable.value) and s3_server.secret_key not in str(unreachable.value)


@pytest.mark.s3
def test_bucket_check_and_provider_chain(s3_server, s3_bucket, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    S3Store(bucket=s3_bucket).check_bucket()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S3Store(bucket="no-such-bucket-here").check_bucket()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    keyless = S3Store(bucket=s3_bucket)  # workload identity: the SDK's chain, not static keys
    assert not keyless.has_keys and keyless.client._provider is not None


def test_local_store_accepts_file_uris(tmp_path):
    store = LocalStore()
    store.put_bytes(f"file://{tmp_path}/m/MANIFEST.json", b"{}")
    assert store.exists(str(tmp_path / "m" / "MANIFEST.json"))
    assert store.list(f"file://{tmp_path}/m") == [str(tmp_path / "m" / "MANIFEST.json")]
    assert not list(tmp_path.glob("m/*.tmp"))
