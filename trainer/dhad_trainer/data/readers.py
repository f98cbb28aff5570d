"""Streaming readers for jsonl, parquet and plain text, from local paths or any object store.

Readers yield `str` for good records and raw `bytes` for records whose text is not valid UTF-8 (the
filter stage decides, per FilterSpec.dropBadUtf8). Broken records (bad JSON, missing or non-string
field) are counted in `ReadCounts.bad_record` and skipped: one bad line must not kill a multi-hour job.
A path that matches nothing, or a source with no records at all, raises `DataError` naming the path.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol, runtime_checkable

import pyarrow as pa
import pyarrow.parquet as pq

from dhad_api.data_prep import SourceFormat, SourceSpec, TextSplit
from dhad_trainer.storage.local import LocalStore

_GLOB_CHARS = "*?["


class DataError(Exception):
    """A dataset problem the user must fix (missing path, empty dataset); the message names the path."""


@runtime_checkable
class ObjectStore(Protocol):
    """What readers need from storage; the S3 store plugs in here, `LocalStore` is the default.

    `open` returns a binary file-like usable as a context manager that supports `read()` and line
    iteration (it need not be seekable); `list(prefix)` returns every object key starting with `prefix`.
    """

    def open(self, uri: str) -> BinaryIO: ...

    def list(self, prefix: str) -> Iterable[str]: ...


@dataclass
class ReadCounts:
    """Records seen (good or broken) and records skipped as broken."""

    records: int = 0
    bad_record: int = 0


def resolve(uri: str, store: ObjectStore | None = None) -> list[str]:
    """Files named by `uri`: the file itself, everything under a directory/prefix, or glob matches.

    Globs follow the shell: `*` and `?` stay within one path segment, `**` crosses `/`. Names starting
    with `.` or `_` (e.g. `_SUCCESS`, editor swap files) are skipped. Raises DataError if nothing matches.
    """
    store = store or LocalStore()
    cut = min((uri.index(c) for c in _GLOB_CHARS if c in uri), default=-1)
    if cut >= 0:
        pattern = _glob_regex(uri)
        paths = [p for p in store.list(uri[:cut]) if pattern.fullmatch(p)]
    else:
        under = uri.rstrip("/") + "/"
        paths = [p for p in store.list(uri) if p == uri or p.startswith(under)]
    paths = sorted(p for p in paths if not os.path.basename(p).startswith((".", "_")))
    if not paths:
        raise DataError(f"{uri}: no such file, directory or prefix (nothing to read)")
    return paths


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Shell-style glob as a regex over full paths/keys (fnmatch lets `*` cross `/`, which is wrong here)."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        end = pattern.find("]", i + 2) if c == "[" else -1
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif end > 0:
            body = pattern[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def detect_format(path: str) -> SourceFormat:
    name = path.lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return SourceFormat.JSONL
    if name.endswith(".parquet"):
        return SourceFormat.PARQUET
    return SourceFormat.TEXT


def _text_of(value: object) -> str | bytes | None:
    """A JSON field value as text; lone surrogates (bad bytes or bad \\u escapes) come back as bytes."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", errors="surrogateescape" if _only_escaped(value) else "surrogatepass")


def _only_escaped(s: str) -> bool:
    return all(not ("\ud800" <= c <= "\udfff") or "\udc80" <= c <= "\udcff" for c in s)


def iter_jsonl(f: BinaryIO, field: str, counts: ReadCounts) -> Iterator[str | bytes]:
    """One JSON object per line; invalid UTF-8 inside `field` yields the raw bytes of that field."""
    for raw in f:
        if not raw.strip():
            continue
        counts.records += 1
        try:
            obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError:
            counts.bad_record += 1
            continue
        text = _text_of(obj.get(field)) if isinstance(obj, dict) else None
        if text is None:
            counts.bad_record += 1
            continue
        yield text


def iter_parquet(
    f: BinaryIO, field: str, counts: ReadCounts, batch_size: int = 1024
) -> Iterator[str | bytes]:
    """Column `field` in record batches; string or binary columns, other types and nulls are broken."""
    if not f.seekable():  # parquet needs random access (footer first); a stream is buffered whole
        f = io.BytesIO(f.read())
    pf = pq.ParquetFile(f)
    if field not in pf.schema_arrow.names:
        counts.records += pf.metadata.num_rows
        counts.bad_record += pf.metadata.num_rows
        return
    kind = pf.schema_arrow.field(field).type
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    for batch in pf.iter_batches(batch_size=batch_size, columns=[field]):
        counts.records += batch.num_rows
        col = batch.column(0)
        if not (textual or binary):
            counts.bad_record += batch.num_rows
            continue
        try:
            values = col.to_pylist()
        except UnicodeDecodeError:  # a string column holding invalid UTF-8: hand over the raw bytes
            values = col.cast(pa.binary()).to_pylist()
        for v in values:
            if v is None:
                counts.bad_record += 1
            else:
                yield v


def _decoded(raw: bytes) -> str | bytes:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def iter_text(f: BinaryIO, split: TextSplit, counts: ReadCounts) -> Iterator[str | bytes]:
    """Plain text: a document per non-blank line, or per blank-line-separated paragraph."""
    para: list[bytes] = []
    for raw in f:
        line = raw.rstrip(b"\r\n")
        if split is TextSplit.LINE:
            if line.strip():
                counts.records += 1
                yield _decoded(line)
        elif line.strip():
            para.append(line)
        elif para:
            counts.records += 1
            yield _decoded(b"\n".join(para))
            para = []
    if para:
        counts.records += 1
        yield _decoded(b"\n".join(para))


def iter_source(
    src: SourceSpec, store: ObjectStore | None = None, counts: ReadCounts | None = None
) -> Iterator[str | bytes]:
    """Every record of every file of `src`, in path order. DataError if it has no records at all."""
    store = store or LocalStore()
    counts = counts if counts is not None else ReadCounts()
    before = counts.records
    paths = resolve(src.uri, store)
    for path in paths:
        fmt = detect_format(path) if src.format is SourceFormat.AUTO else src.format
        with store.open(path) as raw:
            f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            if fmt is SourceFormat.JSONL:
                yield from iter_jsonl(f, src.text_field, counts)
            elif fmt is SourceFormat.PARQUET:
                yield from iter_parquet(f, src.text_field, counts)
            else:
                yield from iter_text(f, src.text_split, counts)
    if counts.records == before:
        raise DataError(f"{src.uri}: empty dataset (no records in {len(paths)} file(s))")
