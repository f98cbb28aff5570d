"""The `prepare` pipeline: read -> normalize -> filter -> exact dedup -> near dedup -> decontaminate ->
tokenize + pack -> sharded parquet + stats.json in a local folder (uploading it is the caller's job).

Everything streams except the dedup/decontamination indexes. Every record read is accounted for:
documents_in == kept + sum(dropped.values()), which the stats file states so a bad filter setting
shows up as a number rather than as a quietly smaller dataset.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dhad_api.data_prep import DataPrepSpec
from dhad_trainer.data.decontam import build_decontaminator
from dhad_trainer.data.dedup import ExactDeduper, NearDeduper
from dhad_trainer.data.filters import DropReason, check, decode_utf8
from dhad_trainer.data.normalize import make_normalizer, match_words
from dhad_trainer.data.pack import Block, pack_texts
from dhad_trainer.data.readers import DataError, ObjectStore, ReadCounts, iter_source

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32()))])
STATS_FILE = "stats.json"


class ShardWriter:
    """Writes blocks to part-00000.parquet, part-00001.parquet, ... `blocks_per_shard` blocks each."""

    def __init__(self, out_dir: Path, sequence_length: int, blocks_per_shard: int) -> None:
        self.out_dir = out_dir
        self.length = sequence_length
        self.per_shard = blocks_per_shard
        self.files: list[str] = []
        self._buf: list[Block] = []

    def add(self, block: Block) -> None:
        self._buf.append(block)
        if len(self._buf) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        n, length = len(self._buf), self.length
        offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
        cols = []
        for name in ("input_ids", "position_ids"):
            flat = np.fromiter(
                (t for b in self._buf for t in getattr(b, name)), dtype=np.int32, count=n * length
            )
            cols.append(pa.ListArray.from_arrays(offsets, pa.array(flat)))
        name = f"part-{len(self.files):05d}.parquet"
        pq.write_table(pa.Table.from_arrays(cols, schema=SCHEMA), self.out_dir / name)
        self.files.append(name)
        log.info("wrote %s (%d blocks)", name, n)
        self._buf = []


def _clean(out_dir: Path) -> None:
    """A retried job must not mix its shards with a previous attempt's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("part-*.parquet"), out_dir / STATS_FILE]:
        old.unlink(missing_ok=True)


def prepare(
    spec: DataPrepSpec,
    tokenizer,
    output_dir: str | Path,
    *,
    store: ObjectStore | None = None,
    benchmark_texts: Iterable[str] = (),
    batch_size: int = 256,
) -> dict:
    """Run the whole pipeline; writes shards and stats.json to `output_dir` and returns the stats.

    `tokenizer` is a HF (fast) tokenizer; `store` reads s3:// sources and benchmarks (default: local
    files); `benchmark_texts` are extra questions to decontaminate against besides spec's files.
    Raises DataError for a missing path, an empty source, or a source whose every record is broken.
    """
    out_dir = Path(output_dir)
    _clean(out_dir)
    dropped = {r.value: 0 for r in DropReason}
    counts = ReadCounts()
    normalize = make_normalizer(spec.normalization)
    exact = ExactDeduper() if spec.dedup.exact else None
    near = NearDeduper(spec.dedup) if spec.dedup.near_duplicate else None
    deco = None
    if spec.decontamination.enabled:
        deco = build_decontaminator(spec.decontamination, benchmark_texts, store)
        log.info("decontamination index: %d questions, %d n-grams", deco.questions, len(deco))
        if not len(deco):
            deco = None

    kept = 0

    def drop(reason: DropReason) -> None:
        dropped[reason.value] += 1

    def kept_texts() -> Iterator[str]:
        nonlocal kept
        for src in spec.sources:
            records, bad = counts.records, counts.bad_record
            for raw in iter_source(src, store, counts):
                text = decode_utf8(raw, spec.filters.drop_bad_utf8)
                if text is None:
                    drop(DropReason.BAD_UTF8)
                    continue
                text = normalize(text)
                reason = check(text, spec.filters)
                if reason is None and (exact or near or deco):
                    words = match_words(text)
                    if exact is not None and exact.is_duplicate(words):
                        reason = DropReason.EXACT_DUPLICATE
                    elif near is not None and near.is_duplicate(words):
                        reason = DropReason.NEAR_DUPLICATE
                    elif deco is not None and deco.is_contaminated(words):
                        reason = DropReason.CONTAMINATED
                if reason is not None:
                    drop(reason)
                    continue
                kept += 1
                yield text
            n, n_bad = counts.records - records, counts.bad_record - bad
            if n and n == n_bad:
                raise DataError(
                    f"{src.uri}: all {n} records are broken (bad JSON or no string field {src.text_field!r})"
                )

    packer, blocks = pack_texts(kept_texts(), tokenizer, spec.packing, batch_size)
    writer = ShardWriter(out_dir, spec.packing.sequence_length, spec.packing.blocks_per_shard)
    for block in blocks:
        writer.add(block)
    writer.flush()
    tail = packer.finish()
    dropped[DropReason.BAD_RECORD.value] = counts.bad_record
    stats = {
        "documents_in": counts.records,
        "kept": kept,
        "dropped": dropped,
        "tokens": packer.tokens,
        "blocks": packer.blocks,
        "dropped_tail_tokens": tail,
        "sequence_length": spec.packing.sequence_length,
        "shards": writer.files,
    }
    (out_dir / STATS_FILE).write_text(json.dumps(stats, ensure_ascii=False, indent=2) + "\n")
    log.info("prepare: %s", json.dumps({k: v for k, v in stats.items() if k != "shards"}))
    return stats
