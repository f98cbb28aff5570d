"""Streaming readers for jsonl, parquet and plain text, from local paths or any object store.

Readers yield `str` for good records and raw `bytes` for records whose text is not valid UTF-8 (the
filter stage decides, per FilterSpec.dropBadUtf8). Broken records (bad JSON, missing or non-string
field) are counted in `ReadCounts.bad_record` and skipped: one bad line must not kill a multi-hour job.
A file that cannot be decoded at all past some point (truncated gzip, a parquet without a footer) is
counted in `ReadCounts.corrupt_files` by name, and reading goes on with the next file.
A path that matches nothing, or a source with no records at all, raises `DataError` naming the path.

`plan_pieces` cuts sources into pieces (byte ranges of line files, runs of parquet row groups) that the
prepare workers share out; `iter_piece` reads one. A line belongs to the piece its first byte is in.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    """Records seen (good or broken), records skipped as broken, and files that could not be read to
    their end ({"uri", "error"}; the records before the damage count as read)."""

    records: int = 0
    bad_record: int = 0
    corrupt_files: list[dict] = field(default_factory=list)


# What a damaged file raises while being decoded; storage errors (after retries) are not among them.
CORRUPTION = (gzip.BadGzipFile, EOFError, zlib.error, pa.ArrowInvalid, pa.ArrowIOError, UnicodeDecodeError)


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
    f: BinaryIO, field: str, counts: ReadCounts, batch_size: int = 1024, row_groups: list[int] | None = None
) -> Iterator[str | bytes]:
    """Column `field` in record batches, one row group after another (a seekable store file is read by
    ranged requests: the footer, then each row group's column chunk); string or binary columns, other
    types and nulls are broken. Only a stream that cannot seek is buffered whole."""
    if not f.seekable():
        f = io.BytesIO(f.read())
    pf = pq.ParquetFile(f)
    groups = list(range(pf.metadata.num_row_groups)) if row_groups is None else row_groups
    rows = sum(pf.metadata.row_group(g).num_rows for g in groups)
    if field not in pf.schema_arrow.names:
        counts.records += rows
        counts.bad_record += rows
        return
    kind = pf.schema_arrow.field(field).type
    textual = pa.types.is_string(kind) or pa.types.is_large_string(kind)
    binary = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=batch_size, columns=[field], row_groups=groups):
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


def _records(f: BinaryIO, fmt: SourceFormat, src: SourceSpec, counts: ReadCounts) -> Iterator[str | bytes]:
    if fmt is SourceFormat.JSONL:
        return iter_jsonl(f, src.text_field, counts)
    if fmt is SourceFormat.PARQUET:
        return iter_parquet(f, src.text_field, counts)
    return iter_text(f, src.text_split, counts)


def _guarded(uri: str, records: Iterator[str | bytes], counts: ReadCounts) -> Iterator[str | bytes]:
    """Yields until the file turns out damaged; then records it by name and stops that file only."""
    try:
        yield from records
    except CORRUPTION as error:
        counts.corrupt_files.append({"uri": uri, "error": f"{type(error).__name__}: {error}"[:500]})


def format_of(src: SourceSpec, path: str) -> SourceFormat:
    return detect_format(path) if src.format is SourceFormat.AUTO else src.format


def iter_source(
    src: SourceSpec, store: ObjectStore | None = None, counts: ReadCounts | None = None
) -> Iterator[str | bytes]:
    """Every record of every file of `src`, in path order. DataError if it has no records at all."""
    store = store or LocalStore()
    counts = counts if counts is not None else ReadCounts()
    before = counts.records
    paths = resolve(src.uri, store)
    for path in paths:
        with store.open(path) as raw:
            f = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
            yield from _guarded(path, _records(f, format_of(src, path), src, counts), counts)
    if counts.records == before:
        raise DataError(f"{src.uri}: empty dataset (no records in {len(paths)} file(s))")


# --- pieces: the shares of work ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileInfo:
    """One input file and what identifies its content: the S3 ETag, or the sha256 of a local file."""

    uri: str
    size: int
    identity: str


@dataclass(frozen=True)
class Piece:
    """A share of one source file: bytes [start, end) of a line file, row groups [start, end) of a
    parquet file, or the whole file (start 0, end -1: gzip and paragraph-split text)."""

    source: int
    uri: str
    format: SourceFormat
    start: int
    end: int

    def to_json(self) -> dict:
        return {"source": self.source, "uri": self.uri, "format": self.format.value, "start": self.start, "end": self.end}


def describe(uri: str, store: ObjectStore | None = None) -> list[FileInfo]:
    """The files `uri` names (as `resolve`), each with its size and content identity."""
    store = store or LocalStore()
    paths = resolve(uri, store)
    info = getattr(store, "describe", None)
    if callable(info):
        known = {f.uri: f for f in (FileInfo(*row) for row in info(paths))}
        return [known[p] for p in paths]
    out = []
    for path in paths:
        h, size = hashlib.sha256(), 0
        with store.open(path) as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        out.append(FileInfo(path, size, "sha256:" + h.hexdigest()))
    return out


def _splittable(path: str, fmt: SourceFormat, src: SourceSpec) -> bool:
    if path.endswith(".gz"):
        return False
    return fmt is SourceFormat.JSONL or (fmt is SourceFormat.TEXT and src.text_split is TextSplit.LINE)


def plan_pieces(sources: list[SourceSpec], files: list[list[FileInfo]], split_bytes: int,
                store: ObjectStore | None = None) -> list[Piece]:
    """Pieces of every source in order: the same list for the same inputs, whoever computes it."""
    store = store or LocalStore()
    pieces: list[Piece] = []
    for index, (src, infos) in enumerate(zip(sources, files, strict=True)):
        for f in infos:
            fmt = format_of(src, f.uri)
            if fmt is SourceFormat.PARQUET and not f.uri.endswith(".gz"):
                pieces += _parquet_pieces(index, f, split_bytes, store)
            elif _splittable(f.uri, fmt, src) and f.size > split_bytes:
                pieces += [Piece(index, f.uri, fmt, a, min(a + split_bytes, f.size)) for a in range(0, f.size, split_bytes)]
            else:
                pieces.append(Piece(index, f.uri, fmt, 0, -1))
    return pieces


def _parquet_pieces(index: int, f: FileInfo, split_bytes: int, store: ObjectStore) -> list[Piece]:
    """Runs of row groups of about `split_bytes` each (read from the footer; a damaged file is one
    piece, whose reading then reports it)."""
    try:
        with store.open(f.uri) as raw:
            meta = pq.ParquetFile(raw if raw.seekable() else io.BytesIO(raw.read())).metadata
    except CORRUPTION:
        return [Piece(index, f.uri, SourceFormat.PARQUET, 0, -1)]
    pieces, first, size = [], 0, 0
    for rg in range(meta.num_row_groups):
        size += meta.row_group(rg).total_byte_size
        if size >= split_bytes:
            pieces.append(Piece(index, f.uri, SourceFormat.PARQUET, first, rg + 1))
            first, size = rg + 1, 0
    if first < meta.num_row_groups or not pieces:
        pieces.append(Piece(index, f.uri, SourceFormat.PARQUET, first, max(meta.num_row_groups, first)))
    return pieces


def _lines_from(raw: BinaryIO, start: int, end: int) -> BinaryIO:
    """A stream of the lines whose first byte lies in [start, end): after a cut, the partial line
    belongs to the previous piece; the last line may run past `end`."""
    if start > 0:
        raw.seek(start - 1)
        raw.readline()  # up to and including the newline before the first line of this piece
    return _LinesBefore(raw, end)


class _LinesBefore:
    """Line iteration that stops at the first line starting at or after `end`."""

    def __init__(self, f: BinaryIO, end: int) -> None:
        self.f, self.end = f, end

    def __iter__(self) -> Iterator[bytes]:
        while self.f.tell() < self.end:
            line = self.f.readline()
            if not line:
                return
            yield line


def iter_piece(piece: Piece, src: SourceSpec, store: ObjectStore | None = None,
               counts: ReadCounts | None = None) -> Iterator[str | bytes]:
    """The records of one piece, in file order; a damaged file is counted and ends the piece."""
    store = store or LocalStore()
    counts = counts if counts is not None else ReadCounts()
    with store.open(piece.uri) as raw:
        if piece.format is SourceFormat.PARQUET:
            records = _parquet_rows(raw, src.text_field, counts, piece)
        elif piece.end < 0:
            f = gzip.GzipFile(fileobj=raw) if piece.uri.endswith(".gz") else raw
            records = _records(f, piece.format, src, counts)
        else:
            records = _records(_lines_from(raw, piece.start, piece.end), piece.format, src, counts)
        yield from _guarded(piece.uri, records, counts)


def _parquet_rows(raw: BinaryIO, field: str, counts: ReadCounts, piece: Piece) -> Iterator[str | bytes]:
    groups = None if piece.end < 0 else list(range(piece.start, piece.end))
    yield from iter_parquet(raw, field, counts, row_groups=groups)
