"""The respond stage's files: an append-only journal of paid teacher results, and the jsonl shards.

The journal (`cache.jsonl`) is the only state that matters: one line per successful request, keyed by
the hash of (prompt, teacher, settings), written and flushed the moment the answer arrives. Shards and
`rejected.jsonl` are derived from it and rebuilt on every start, so a crash between two writes can never
leave them disagreeing with what was paid for; `failed.jsonl` lists this attempt's unanswered requests
(not journaled, so asked again next time). A line cut short by a kill is dropped: that request is asked
again, as it was never recorded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FILE = "cache.jsonl"
REJECTED_FILE = "rejected.jsonl"
FAILED_FILE = "failed.jsonl"
STATS_FILE = "stats.json"
SHARD_GLOB = "data-*.jsonl"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


class ResponseCache:
    """`key -> result` from `cache.jsonl`; `add` appends and flushes one line per result."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / CACHE_FILE
        self.entries: dict[str, dict[str, Any]] = {}
        self.dropped_lines = 0
        if self.path.exists():
            self._load()
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        raw = self.path.read_bytes()
        end = raw.rfind(b"\n") + 1
        if end < len(raw):  # a write cut short: drop it so the next append starts on a fresh line
            self.dropped_lines += 1
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for line in raw[:end].splitlines():
            try:
                entry = json.loads(line)
                self.entries[entry["key"]] = entry
            except (ValueError, KeyError, TypeError):
                self.dropped_lines += 1
        if self.dropped_lines:
            log.warning("%s: ignored %d damaged line(s)", self.path, self.dropped_lines)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def add(self, entry: dict[str, Any]) -> None:
        self._file.write(_dumps(entry))
        self._file.flush()  # in the OS now: a killed process loses nothing it was told
        self.entries[entry["key"]] = entry

    def close(self) -> None:
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


class OutputWriter:
    """Accepted rows to `data-00000.jsonl`, ... (`shard_rows` each); rejected and failed to side files."""

    def __init__(self, out_dir: Path, shard_rows: int) -> None:
        self.out_dir = out_dir
        self.shard_rows = shard_rows
        for old in [*out_dir.glob(SHARD_GLOB), out_dir / REJECTED_FILE, out_dir / FAILED_FILE]:
            old.unlink(missing_ok=True)
        self.shards: list[str] = []
        self._rows_in_shard = 0
        self._shard = None
        self._rejected = open(out_dir / REJECTED_FILE, "w", encoding="utf-8")
        self._failed = open(out_dir / FAILED_FILE, "w", encoding="utf-8")

    def accept(self, row: dict[str, Any]) -> None:
        if self._shard is None or self._rows_in_shard >= self.shard_rows:
            if self._shard is not None:
                self._shard.close()
            name = f"data-{len(self.shards):05d}.jsonl"
            self.shards.append(name)
            self._shard = open(self.out_dir / name, "w", encoding="utf-8")
            self._rows_in_shard = 0
        self._shard.write(_dumps(row))
        self._rows_in_shard += 1

    def reject(self, row: dict[str, Any]) -> None:
        self._rejected.write(_dumps(row))

    def fail(self, row: dict[str, Any]) -> None:
        self._failed.write(_dumps(row))

    def flush(self) -> None:
        for f in (self._shard, self._rejected, self._failed):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._shard, self._rejected, self._failed):
            if f is not None and not f.closed:
                f.close()
