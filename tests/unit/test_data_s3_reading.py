"""Reading inputs from S3 through a TCP proxy that breaks connections, as a flaky network does: a read
cut mid-object resumes at the byte it stopped at, parquet is read by ranged requests (a row group, not
the file), an object replaced mid-read is an error rather than a splice, and a damaged file is
reported by name while preparation goes on. The fault is real (the socket is closed mid-response)."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import socket
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dhad_api.data_prep import DataPrepSpec, SourceFormat, SourceSpec
from dhad_trainer.data.readers import Piece, ReadCounts, iter_piece
from dhad_trainer.storage import s3
from dhad_trainer.storage.base import StorageError
from dhad_trainer.storage.embedded_s3 import free_port
from tests.support.arabic_corpus import byte_level_tokenizer, documents, write_jsonl

pytestmark = pytest.mark.s3


class BreakingProxy:
    """Forwards 127.0.0.1:port to the S3 server; records each request's line and Range header, and cuts
    the response of the next GETs after the numbers of body bytes in `cuts` (closing both sockets)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = free_port()
        self.requests: list[tuple[str, str | None]] = []
        self.cuts: list[int] = []
        self.cut_done: list[int] = []
        self.cut_at: list[int] = []
        self.response_bytes = 0
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream))
            state: dict = {"get": False}
            threading.Thread(target=self._requests, args=(client, up, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(up, client, state), daemon=True).start()

    def _requests(self, src, dst, state) -> None:
        try:
            while data := src.recv(65536):
                for head in re.findall(rb"(?:GET|HEAD|PUT|POST|DELETE) [^\r\n]+\r\n(?:[^\r\n]+\r\n)*", data):
                    line = head.split(b"\r\n", 1)[0].decode()
                    rng = re.search(rb"(?i)\r\nrange: *([^\r\n]+)", head)
                    with self.lock:
                        self.requests.append((line, rng.group(1).decode() if rng else None))
                    start = re.match(r"bytes=(\d+)-", rng.group(1).decode()) if rng else None
                    state.update(get=line.startswith("GET ") and "?" not in line.split(" ")[1],
                                 head=b"", in_body=False, body=0, start=int(start.group(1)) if start else 0)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                sock.close()

    def _responses(self, src, dst, state) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.response_bytes += len(data)
                    cut = self.cuts[0] if self.cuts and state.get("get") else None
                if cut is not None:
                    if not state["in_body"]:
                        sent_head = len(state["head"])
                        state["head"] += data
                        end = state["head"].find(b"\r\n\r\n")
                        if end < 0:
                            dst.sendall(data)
                            continue
                        state["in_body"] = True
                        state["body"] = len(data) - (end + 4 - sent_head)
                    else:
                        state["body"] += len(data)
                    if state["body"] >= cut:
                        dst.sendall(data[: len(data) - (state["body"] - cut)])
                        with self.lock:
                            self.cuts.pop(0)
                            self.cut_done.append(cut)
                            self.cut_at.append(state["start"] + cut)  # the object byte the cut fell on
                        raise OSError("cut")
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def proxied(s3_server, s3_bucket, monkeypatch):
    proxy = BreakingProxy(int(s3_server.url.rsplit(":", 1)[1]))
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setattr(s3, "READ_BACKOFF", 0.05)
    yield proxy, s3.S3Store(bucket=s3_bucket), s3_server
    proxy.close()


def test_a_read_cut_mid_object_resumes_at_the_byte_it_reached(proxied, s3_prefix):
    proxy, store, _ = proxied
    data = os.urandom(3 * 1024 * 1024 + 17)
    uri = f"{s3_prefix}/blob.bin"
    store.put_bytes(uri, data)
    proxy.requests.clear()
    proxy.cuts = [1_000_003]
    with store.open(uri) as f:
        got = f.read()
        raw = f.raw
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    assert proxy.cut_done == [1_000_003] and len(raw.resumed_at) == 1
    reached = raw.resumed_at[0]  # what reached the reader before the socket closed (urllib3 reads in chunks)
    assert proxy.cut_at[0] - 65536 <= reached <= proxy.cut_at[0]
    ranges = [r for line, r in proxy.requests if line.startswith("GET ")]
    assert ranges[0].startswith("bytes=0-") and f"bytes={reached}-" in [r.split("-")[0] + "-" for r in ranges]


def test_a_connection_that_keeps_breaking_is_a_storage_error_naming_the_byte(proxied, s3_prefix, monkeypatch):
    proxy, store, _ = proxied
    monkeypatch.setattr(s3, "READ_ATTEMPTS", 3)
    uri = f"{s3_prefix}/blob.bin"
    store.put_bytes(uri, os.urandom(200_000))
    proxy.cuts = [150_000, 0, 0, 0]  # one cut after progress, then no byte gets through
    with pytest.raises(StorageError, match=r"failed at byte 1[0-5][0-9]{4} of 200000 after 3 attempts"), store.open(uri) as f:
        f.read()
    assert proxy.cut_done == [150_000, 0, 0]


def test_an_object_replaced_mid_read_is_an_error_not_a_splice(proxied, s3_prefix, monkeypatch):
    proxy, store, server = proxied
    monkeypatch.setattr(s3, "READ_WINDOW", 64 * 1024)
    uri = f"{s3_prefix}/blob.bin"
    store.put_bytes(uri, b"a" * 300_000)
    with store.open(uri) as f:
        assert f.read(100_000) == b"a" * 100_000
        store.put_bytes(uri, b"b" * 300_000)
        with pytest.raises(StorageError, match="PreconditionFailed"):
            f.read()


def test_parquet_is_read_by_row_group_over_ranged_requests(proxied, s3_prefix):
    proxy, store, _ = proxied
    texts = [f"نص رقم {i} " + "كلمة " * 200 for i in range(4000)]
    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts, "n": list(range(4000))}), buf, row_group_size=500, compression="none")
    uri = f"{s3_prefix}/docs.parquet"
    store.put_bytes(uri, buf.getvalue())
    before = proxy.response_bytes
    proxy.requests.clear()
    counts = ReadCounts()
    got = list(iter_piece(Piece(0, uri, SourceFormat.PARQUET, 5, 6), SourceSpec(uri=uri), store, counts))
    assert got == texts[2500:3000] and counts.records == 500
    moved = proxy.response_bytes - before
    assert moved < len(buf.getvalue()) / 4, (moved, len(buf.getvalue()))
    assert all(r is not None for line, r in proxy.requests if line.startswith("GET "))


def test_a_damaged_file_is_reported_by_name_and_the_rest_is_prepared(proxied, s3_prefix, tmp_path):
    _, store, _ = proxied
    docs, _ = documents(60, seed=5, exact_rate=0, near_rate=0)
    good = write_jsonl(tmp_path / "good.jsonl", docs[:30]).read_bytes()
    zipped = gzip.compress(write_jsonl(tmp_path / "z.jsonl", docs[30:]).read_bytes())
    store.put_bytes(f"{s3_prefix}/in/a.jsonl", good)
    store.put_bytes(f"{s3_prefix}/in/b.jsonl.gz", zipped[: len(zipped) * 2 // 3])  # truncated mid-stream
    store.put_bytes(f"{s3_prefix}/in/c.parquet", b"PAR1 not really a parquet file")
    spec = DataPrepSpec(sources=[{"uri": f"{s3_prefix}/in"}], filters={"minChars": 20},
                        packing={"sequenceLength": 32})
    from dhad_trainer.data.prepare import prepare
    from dhad_trainer.storage.routing import RoutingStore

    tok = byte_level_tokenizer(tmp_path / "tok", docs)
    stats = prepare(spec, tok, f"{s3_prefix}/out", store=store, data_store=RoutingStore())
    damaged = sorted(c["uri"].rsplit("/", 1)[1] for c in stats["corrupt_files"])
    assert damaged == ["b.jsonl.gz", "c.parquet"]
    assert 30 < stats["documents_in"] < 60 and stats["kept"] == stats["documents_in"]  # b's first records count
