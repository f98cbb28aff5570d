"""SFT's `respond` sub-stage: a teacher answers native Arabic prompts; SFT trains on the gated answers.

Output (run.output_dir, read by the `sft` sub-stage as run.inputs["respond"], glob `data-*.jsonl`):
`data-NNNNN.jsonl` rows `{"messages": [...prompt, assistant], "provenance": {...}}`, `rejected.jsonl`
(the same rows plus `reason`), `failed.jsonl` (requests the teacher never answered), `stats.json`, and
`cache.jsonl`, the journal of every paid answer keyed by sha256(prompt messages, teacher, settings).

Resume, and what it assumes of the runtime: teacher calls cost money and hours, so every answer is
journaled the moment it arrives and a restarted stage asks only for what the journal lacks; everything
else is rebuilt from the journal at start. This needs the runtime to (1) upload run.output_dir also
when the stage fails or the pod is told to stop (SIGTERM: the stage stops sending, waits for requests
in flight, journals them, then exits 143), ideally every few minutes too, and (2) download the previous
attempt's upload into run.output_dir before calling `run` again (or point run.resume_from at it; a
`cache.jsonl` found there is adopted when output_dir has none). Only rank 0 works: run it as one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dhad_api.stages import Respond
from dhad_trainer.data.prompts import Prompt, load_prompts
from dhad_trainer.data.readers import DataError
from dhad_trainer.llm.journal import CACHE_FILE, SHARD_GLOB, STATS_FILE, OutputWriter, ResponseCache
from dhad_trainer.llm.quality import Gates
from dhad_trainer.llm.teachers import (
    Answer,
    EndpointTeacher,
    TransformersTeacher,
    VllmTeacher,
    endpoint_config,
    vllm_available,
)
from dhad_trainer.stages.base import StageResult, StageRun
from dhad_trainer.storage.local import LocalStore

log = logging.getLogger(__name__)

SHARD_ROWS = 10_000
BATCH = 64  # answers between flushes of the shards and progress logs
MAX_FAILED_FRACTION = 0.01  # more unanswered requests than this fails the attempt (a retry asks again)


def dataset_glob(output_dir: Path) -> str:
    """What the SFT sub-stage should read (the side files are jsonl too)."""
    return str(Path(output_dir) / SHARD_GLOB)


@dataclass(frozen=True)
class TeacherId:
    """Who answers, known before any model is loaded: all answers are journaled under it."""

    name: str
    backend: str


def teacher_id(run: StageRun, spec: Respond) -> TeacherId:
    t = spec.teacher
    if t.endpoint is not None:
        return TeacherId(t.endpoint.model, EndpointTeacher.backend)
    name = t.model.uri or f"{t.model.from_job.kind}/{t.model.from_job.name}"
    if t.use_vllm and not run.use_cpu and vllm_available():
        return TeacherId(name, VllmTeacher.backend)
    if t.use_vllm:
        log.warning("teacher.useVllm: vLLM is not usable here (no GPU or not installed); using transformers")
    return TeacherId(name, TransformersTeacher.backend)


def build_teacher(run: StageRun, spec: Respond, who: TeacherId, **overrides: Any):
    t, g, n = spec.teacher, spec.generation, spec.responses_per_prompt
    if t.endpoint is not None:
        return EndpointTeacher(endpoint_config(t.endpoint, g, **overrides), g, n)
    uri = t.model.uri
    path = run.inputs.get("teacher") or (Path(uri) if uri and uri.startswith("/") else None)
    if path is None:
        raise DataError("respond.teacher.model: the runtime must download it to run.inputs['teacher']")
    if who.backend == VllmTeacher.backend:
        return VllmTeacher(path, who.name, g, n)
    device = "cpu" if run.use_cpu else f"cuda:{run.local_rank}"
    return TransformersTeacher(path, who.name, g, n, device=device, dtype=str(t.model.dtype))


class Book:
    """Turns journal entries into gated rows, in prompt order, and keeps every count stats.json reports.

    Answers arrive in any order; rows are written in prompt order so that the dataset (and which of two
    duplicates is kept) does not depend on timing, and a rerun rebuilds exactly the same files.
    """

    def __init__(self, spec: Respond, teacher: TeacherId, settings: dict, writer: OutputWriter,
                 order: list[Prompt]) -> None:
        self.gates, self.teacher, self.settings, self.writer = Gates(spec.quality), teacher, settings, writer
        self.counts: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.order, self.pos = order, 0
        self.ready: dict[str, dict[str, Any] | Answer] = {}

    def put(self, p: Prompt, item: dict[str, Any] | Answer) -> None:
        """A journal entry (or a failed Answer) for `p`; writes every row whose turn has come."""
        self.ready[p.key] = item
        while self.pos < len(self.order) and (item := self.ready.pop(self.order[self.pos].key, None)):
            self._write(self.order[self.pos], item)
            self.pos += 1

    def drain(self) -> None:
        """Interrupted: write whatever arrived, gaps and all (the next attempt rebuilds in order)."""
        for p in self.order[self.pos:]:
            if (item := self.ready.pop(p.key, None)) is not None:
                self._write(p, item)
        self.pos = len(self.order)

    def _write(self, p: Prompt, item: dict[str, Any] | Answer) -> None:
        if isinstance(item, dict):
            self.record(p, item)
        else:
            self.fail(p, item)

    def record(self, p: Prompt, entry: dict[str, Any]) -> None:
        self.counts["answered"] += 1
        self.counts["prompt_tokens"] += entry["usage"]["prompt_tokens"]
        self.counts["completion_tokens"] += entry["usage"]["completion_tokens"]
        for i, (text, finish) in enumerate(zip(entry["texts"], entry["finish_reasons"], strict=True)):
            self.counts["responses"] += 1
            row = {"messages": [*p.messages, {"role": "assistant", "content": text}], "provenance": {
                "teacher": self.teacher.name, "backend": self.teacher.backend, "settings": self.settings,
                "prompt_hash": p.prompt_hash, "request": p.key, "choice": i, "time": entry["time"],
                "usage": entry["usage"], "finish_reason": finish, "source": p.source}}
            reason = self.gates.check(text, p.messages[-1]["content"], finish)
            if reason is None:
                self.counts["accepted"] += 1
                self.writer.accept(row)
            else:
                self.rejected[reason.value] += 1
                self.writer.reject({**row, "reason": reason.value})

    def fail(self, p: Prompt, answer: Answer) -> None:
        self.failed[answer.reason or "unknown"] += 1
        self.writer.fail({"request": p.key, "messages": p.messages, "source": p.source,
                          "reason": answer.reason, "error": answer.error, "attempts": answer.attempts})


def _entry(p: Prompt, a: Answer) -> dict[str, Any]:
    return {"key": p.key, "time": datetime.now(UTC).isoformat(timespec="seconds"), "texts": a.texts,
            "finish_reasons": a.finish_reasons, "attempts": a.attempts,
            "usage": {"prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens}}


@contextlib.contextmanager
def _sigterm_stops(stop: threading.Event) -> Iterator[list[Any]]:
    """SIGTERM (pod stop) sets `stop` instead of killing; yields [previous handler] once it fired."""
    if threading.current_thread() is not threading.main_thread():
        yield []
        return
    fired: list[Any] = []
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (fired.append(previous), stop.set()))
    try:
        yield fired
    finally:
        signal.signal(signal.SIGTERM, previous)


def respond(run: StageRun, *, shard_rows: int = SHARD_ROWS, batch: int = BATCH,
            on_batch: Callable[[int], None] | None = None, **endpoint_overrides: Any) -> dict[str, Any]:
    """Answer every prompt not yet in the journal; returns (and writes) stats.json."""
    spec: Respond | None = getattr(run.spec, "respond", None)
    if spec is None:
        raise DataError("respond sub-stage started without spec.respond")
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    old = Path(run.resume_from) / CACHE_FILE if run.resume_from else None
    if old and old.exists() and not (out / CACHE_FILE).exists():
        shutil.copyfile(old, out / CACHE_FILE)
    who = teacher_id(run, spec)
    g = spec.generation
    settings = {"max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_p": g.top_p,
                "n": spec.responses_per_prompt}
    reads: Counter[str] = Counter()
    local = LocalStore()

    def store_for(uri: str) -> Any:
        if not uri.startswith("s3://"):
            return local
        if run.data_store is None:
            raise DataError(f"{uri}: no object store was given to read s3:// prompts")
        return run.data_store

    prompts = load_prompts(spec.prompts, store_for, {"teacher": who.name, "settings": settings}, reads,
                           spec.system_prompt)
    cache = ResponseCache(out)
    pending = [p for p in prompts if p.key not in cache]
    cached = len(prompts) - len(pending)
    log.info("respond: %d prompts, %d answered before, %d to ask %s", len(prompts), cached, len(pending),
             who.name)
    try:  # no model load (GPU minutes) when the journal has everything
        teacher = build_teacher(run, spec, who, **endpoint_overrides) if pending else None
    except BaseException:
        cache.close()
        raise
    writer = OutputWriter(out, shard_rows)
    book = Book(spec, who, settings, writer, prompts)
    for p in prompts:
        if (entry := cache.get(p.key)) is not None:
            book.put(p, entry)

    def take(p: Prompt, answer: Answer) -> None:
        if answer.error is None:
            entry = _entry(p, answer)
            cache.add(entry)  # journal first: from here on this answer is never paid for again
            book.put(p, entry)
        else:
            book.put(p, answer)

    stop = threading.Event()
    with _sigterm_stops(stop) as fired:
        results = teacher.generate([(p, p.messages) for p in pending], stop) if teacher else iter(())
        try:
            for i, (p, answer) in enumerate(results, 1):
                take(p, answer)
                if i % batch == 0:
                    writer.flush()
                    log.info("respond: %d/%d asked, %d accepted", i, len(pending), book.counts["accepted"])
                    if on_batch is not None:
                        on_batch(i // batch)
        except BaseException:
            stop.set()  # keep what is already in flight (paid for), then let the error through
            for p, answer in results:
                take(p, answer)
            raise
        finally:
            book.drain()
            writer.close()
            cache.close()
            stats = _stats(book, who, teacher, settings, reads, len(prompts), cached, writer.shards)
            (out / STATS_FILE).write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    if fired:
        if callable(fired[0]):
            fired[0](signal.SIGTERM, None)
        raise SystemExit(128 + signal.SIGTERM)
    failed = sum(book.failed.values())
    if failed > MAX_FAILED_FRACTION * len(prompts):
        raise RuntimeError(f"respond: {failed} of {len(prompts)} teacher requests failed ({dict(book.failed)}); "
                           "see failed.jsonl. A retry of this stage asks only for the missing ones.")
    if not book.counts["accepted"]:
        raise DataError(f"respond: no teacher response passed the quality gates (rejected: {stats['rejected']})")
    return stats


def _stats(book: Book, who: TeacherId, teacher: Any, settings: dict, reads: Counter, requests: int,
           cached: int, shards: list[str]) -> dict[str, Any]:
    c = book.counts
    client = getattr(teacher, "client", None)
    ep = client.stats if client else None
    cfg = client.config if client else None
    cost = (c["prompt_tokens"] * cfg.price_prompt_per_1k + c["completion_tokens"] * cfg.price_completion_per_1k
            ) / 1000 if cfg else 0.0
    sent = c["answered"] - cached + sum(book.failed.values())
    return {
        "teacher": who.name, "backend": who.backend, "settings": settings,
        "prompts": reads["prompts"], "duplicate_prompts": reads["duplicate_prompts"],
        "bad_records": reads["bad_records"], "requests": requests, "cached": cached, "sent": sent,
        "http_requests": ep.requests_sent if ep else sent, "retries": dict(ep.retries) if ep else {},
        "failed": dict(book.failed), "pending": requests - c["answered"] - sum(book.failed.values()),
        "responses": c["responses"], "accepted": c["accepted"], "rejected": dict(book.rejected),
        "tokens": {"prompt": c["prompt_tokens"], "completion": c["completion_tokens"]},
        "cost": round(cost, 6), "shards": shards,
    }


def run(run: StageRun) -> StageResult:
    """The stage contract; non-zero ranks have nothing to do (teacher calls are not sharded)."""
    if not run.is_main:
        return StageResult()
    stats = respond(run)
    keys = ("requests", "cached", "sent", "responses", "accepted", "cost")
    metrics = {k: stats[k] for k in keys} | {"rejected": sum(stats["rejected"].values())}
    return StageResult(metrics=metrics)
