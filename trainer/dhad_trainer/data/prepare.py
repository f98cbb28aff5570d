"""The `prepare` pipeline, shared out over any number of workers through an object store.

Passes (each a list of items; item i of a pass belongs to worker i % workers; an item whose DONE
marker exists is never run again, so a retried worker redoes only what it had not finished):
1. scan, per input piece: read, normalize, identify the language, filter, exact key and MinHash
   signature, decontaminate; writes the documents (text, drop reason, language) and the band keys;
2. bucket, per group of band keys: sort, emit the exact copies to drop and the near candidates;
3. vocabulary (one item, when vocabulary.newTokens > 0): new merges from a bounded sample;
4. attach, per piece: attaches this piece's signatures to the candidates it is the earlier side of;
5. final, per piece: verifies candidates, drops duplicates, tokenizes, packs blocks (with the tail
   that does not fill a block kept aside), writes shards and a per-document report;
6. merge (one item): packs the tails per source, computes the mixture, writes stats.json and, last,
   MANIFEST.json. A prepared dataset exists when its MANIFEST.json does.
Memory per worker is bounded by one piece (splitMegabytes) or one bucket group, never by the corpus.
The result depends on the inputs and settings only: pieces, documents and blocks have the same order
and content for 1 or N workers.

Every record read is accounted for: documents_in == kept + sum(dropped.values()) in stats.json, per
source and in total.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dhad_api.data_prep import DataPrepSpec, FilterSpec
from dhad_trainer.data.decontam import build_decontaminator
from dhad_trainer.data.dedup import (
    Banding,
    candidate_pairs,
    exact_key,
    gid,
    later_exact_copies,
    local_of,
    piece_of,
    verified,
)
from dhad_trainer.data.filters import DropReason, check, decode_utf8
from dhad_trainer.data.normalize import make_normalizer, match_words
from dhad_trainer.data.pack import Packer, eos_id_for, tokenize_batches
from dhad_trainer.data.readers import (
    DataError,
    FileInfo,
    ObjectStore,
    Piece,
    ReadCounts,
    describe,
    iter_piece,
    plan_pieces,
)
from dhad_trainer.data.vocab import BottomSample

log = logging.getLogger(__name__)

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32()))])
STATS_FILE = "stats.json"
MANIFEST_FILE = "MANIFEST.json"
PASSES_FILE = "passes.json"  # which worker ran each item, and when: kept after the work files go
VERSION = 1  # of the prepared layout and algorithm; part of every key
REASONS = list(DropReason)
CODE = {r: i + 1 for i, r in enumerate(REASONS)}  # 0 = kept
TEXTS = pa.schema([("text", pa.large_string()), ("reason", pa.int8()), ("lang", pa.string()),
                   ("confidence", pa.float32())])
GROUP_BYTES = 256 * 1024 * 1024  # input bytes per key range of a band: bounds one bucket group's memory
BATCH = 512


def load_tokenizer(path: Path):
    """A fast tokenizer from its folder without importing torch (AutoTokenizer would: seconds per pod)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


# --- the plan -------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What every worker derives identically from the inputs: pieces, bucket groups, source names."""

    spec: DataPrepSpec
    pieces: list[Piece]
    files: list[list[FileInfo]]
    benchmarks: list[FileInfo]
    banding: Banding

    @classmethod
    def make(cls, spec: DataPrepSpec, store: ObjectStore) -> Plan:
        files = [describe(src.uri, store) for src in spec.sources]
        benchmarks = [f for uri in spec.decontamination.benchmarks for f in describe(uri, store)] if (
            spec.decontamination.enabled) else []
        split = max(1, int(spec.split_megabytes * 1024 * 1024))
        pieces = plan_pieces(spec.sources, files, split, store)
        total = sum(f.size for fs in files for f in fs)
        banding = Banding(spec.dedup, partitions=max(1, math.ceil(total / GROUP_BYTES)))
        return cls(spec, pieces, files, benchmarks, banding)

    def identity(self) -> dict:
        """The inputs and settings that decide the prepared data (not the number of workers)."""
        data = self.spec.to_json_dict()
        for key in ("workers",):
            data.pop(key, None)
        return {"version": VERSION, "data": data,
                "files": [[[f.uri, f.size, f.identity] for f in fs] for fs in self.files],
                "benchmarks": [[f.uri, f.size, f.identity] for f in self.benchmarks]}


@dataclass
class Context:
    """One worker's view: the plan, where the prepared data goes, the tokenizer, its scratch folder."""

    plan: Plan
    root: str  # the prepared dataset's URI (store prefix)
    store: object  # the store holding `root` (S3 or a folder): put_bytes, get_bytes, list, upload/download
    data_store: ObjectStore  # the store inputs and benchmarks are read from
    tokenizer_dir: Path
    scratch: Path
    vocabulary: dict | None = None  # {"new_tokens", "sample_bytes", "corpus"} when expanding
    benchmark_texts: list[str] = field(default_factory=list)
    on_item: Callable[[str, int], None] | None = None  # progress: (pass, item) done by this worker
    poll: float = 0.5

    @property
    def spec(self) -> DataPrepSpec:
        return self.plan.spec

    def uri(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])


def pieces_name(p: int) -> str:
    return f"p{p:06d}"


# --- pass 1: scan ---------------------------------------------------------------------------------


def _filters_for(spec: DataPrepSpec, source: int) -> FilterSpec:
    return spec.sources[source].filters or spec.filters


_decontaminators: dict[int, object] = {}


def _decontaminator(ctx: Context):
    if not ctx.spec.decontamination.enabled:
        return None
    key = id(ctx)
    if key not in _decontaminators:
        deco = build_decontaminator(ctx.spec.decontamination, ctx.benchmark_texts, ctx.data_store)
        log.info("decontamination index: %d questions, %d n-grams", deco.questions, len(deco))
        _decontaminators[key] = deco if len(deco) else None
    return _decontaminators[key]


def scan_piece(ctx: Context, p: int) -> dict:
    """Pass 1 for piece p; returns its counts (also stored in its DONE marker)."""
    from dhad_trainer.data.language import identify

    spec, piece = ctx.spec, ctx.plan.pieces[p]
    src = spec.sources[piece.source]
    filters = _filters_for(spec, piece.source)
    normalize = make_normalizer(spec.normalization)
    banding = ctx.plan.banding
    deco = _decontaminator(ctx)
    dedup = spec.dedup.exact or spec.dedup.near_duplicate
    out = ctx.scratch / "scan" / pieces_name(p)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    counts = ReadCounts()
    writer = pq.ParquetWriter(out / "texts.parquet", TEXTS, compression="zstd")
    buf: dict[str, list] = {name: [] for name in TEXTS.names}
    eligible: list[int] = []
    high: list[int] = []
    low: list[int] = []
    sigs: list[np.ndarray] = []
    sample = BottomSample(ctx.vocabulary["sample_bytes"]) if ctx.vocabulary and not ctx.vocabulary.get("corpus") else None
    n = 0

    def flush() -> None:
        if buf["text"]:
            writer.write_table(pa.table(buf, schema=TEXTS))
            for v in buf.values():
                v.clear()

    for raw in iter_piece(piece, src, ctx.data_store, counts):
        text = decode_utf8(raw, filters.drop_bad_utf8)
        reason, lang, conf = None, "", 0.0
        if text is None:
            reason = DropReason.BAD_UTF8
        else:
            text = normalize(text)
            if text:
                lang, conf = identify(text)
            reason = check(text, filters, (lang, conf))
            if reason is None and (dedup or deco is not None or sample is not None):
                words = match_words(text)
                h, lo = exact_key(words)
                if deco is not None and deco.is_contaminated(words):
                    reason = DropReason.CONTAMINATED  # still a copy that earlier and later copies meet
                elif sample is not None:
                    sample.offer(h, text)
                if dedup:
                    eligible.append(n)
                    high.append(h)
                    low.append(lo)
                    if spec.dedup.near_duplicate:
                        sigs.append(banding.signature(words))
        buf["text"].append(text)
        buf["reason"].append(CODE[reason] if reason else 0)
        buf["lang"].append(lang)
        buf["confidence"].append(conf)
        n += 1
        if len(buf["text"]) >= BATCH:
            flush()
    flush()
    writer.close()
    gids = np.array([gid(p, i) for i in eligible], dtype=np.uint64)
    groups: dict[int, list[np.ndarray]] = {}
    if spec.dedup.exact and len(gids):
        hi, lo = np.array(high, dtype=np.uint64), np.array(low, dtype=np.uint64)
        g = banding.exact_group(hi)
        for grp in np.unique(g):
            m = g == grp
            groups.setdefault(int(grp), []).append(np.stack([hi[m], lo[m], gids[m]], axis=1))
    signatures = np.zeros((n, spec.dedup.num_perm), dtype=np.uint32)
    if spec.dedup.near_duplicate and len(gids):
        sig = np.stack(sigs)
        signatures[np.array(eligible)] = sig
        keys = banding.band_keys(sig)
        for band in range(banding.bands):
            g = banding.band_group(band, keys[:, band])
            for grp in np.unique(g):
                m = g == grp
                groups.setdefault(int(grp), []).append(np.stack([keys[m, band], gids[m]], axis=1))
    np.save(out / "signatures.npy", signatures)
    for grp, arrays in groups.items():
        np.save(out / f"g{grp:05d}.npy", np.concatenate(arrays))
    if sample is not None:
        rows = sample.sorted()
        pq.write_table(pa.table({"hash": pa.array([h for h, _ in rows], pa.uint64()),
                                 "text": pa.array([t for _, t in rows], pa.large_string())}), out / "sample.parquet")
    ctx.store.upload_dir(out, ctx.uri("work", "scan", pieces_name(p)))
    shutil.rmtree(out, ignore_errors=True)
    return {"documents": n, "records": counts.records, "bad_record": counts.bad_record,
            "corrupt_files": counts.corrupt_files, "groups": sorted(groups)}


# --- pass 2: bucket groups ------------------------------------------------------------------------


def bucket_group(ctx: Context, g: int, scans: list[dict]) -> dict:
    """Pass 2 for group g: exact copies to drop, or near candidates, routed to the pieces they concern."""
    banding = ctx.plan.banding
    arrays = []
    for p, info in enumerate(scans):
        if g in info["groups"]:
            arrays.append(_load_npy(ctx, "work", "scan", pieces_name(p), f"g{g:05d}.npy"))
    if not arrays:
        return {"entries": 0, "routed": 0}
    entries = np.concatenate(arrays)
    if banding.is_exact_group(g):
        later = later_exact_copies(entries[:, 0], entries[:, 1], entries[:, 2])
        routed = _route(ctx, "drops", later, later, g)  # to the piece of the copy to drop
    else:
        pairs = candidate_pairs(entries[:, 0], entries[:, 1])
        routed = _route(ctx, "pairs", pairs[:, 0], pairs, g)  # to the piece of the earlier side
    return {"entries": int(len(entries)), "routed": routed}


def _route(ctx: Context, kind: str, by: np.ndarray, rows: np.ndarray, g: int) -> int:
    """Writes `rows` to work/<kind>/<piece>/g<g>.npy, split by the piece of the global ids in `by`."""
    if not len(rows):
        return 0
    owner = piece_of(by)
    for p in np.unique(owner):
        _save_npy(ctx, rows[owner == p], "work", kind, pieces_name(int(p)), f"g{g:05d}.npy")
    return int(len(rows))


def _save_npy(ctx: Context, array: np.ndarray, *parts: str) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    ctx.store.put_bytes(ctx.uri(*parts), buf.getvalue())


def _load_npy(ctx: Context, *parts: str) -> np.ndarray:
    return np.load(io.BytesIO(ctx.store.get_bytes(ctx.uri(*parts))))


def _listed(ctx: Context, *parts: str) -> list[str]:
    prefix = ctx.uri(*parts) + "/"
    return sorted(u for u in ctx.store.list(prefix))


def _signatures(ctx: Context, p: int) -> np.ndarray:
    path = ctx.scratch / "sigs" / f"{pieces_name(p)}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        ctx.store.download_file(ctx.uri("work", "scan", pieces_name(p), "signatures.npy"), path)
    return np.load(path, mmap_mode="r")


# --- pass 3: vocabulary ---------------------------------------------------------------------------


def vocabulary_item(ctx: Context, scans: list[dict]) -> dict:
    """New merges learned from the bottom-k sample of all pieces (or of vocabulary.corpus)."""
    from dhad_trainer.data import vocab

    limit = ctx.vocabulary["sample_bytes"]
    if ctx.vocabulary.get("corpus"):
        texts = vocab.sample_corpus(ctx.vocabulary["corpus"], limit, ctx.data_store)
    else:
        streams = []
        for p in range(len(scans)):
            uri = ctx.uri("work", "scan", pieces_name(p), "sample.parquet")
            table = pq.read_table(io.BytesIO(ctx.store.get_bytes(uri)))
            streams.append(zip(table.column("hash").to_pylist(), table.column("text").to_pylist(), strict=True))
        texts = vocab.merge_samples(streams, limit)
    base = load_tokenizer(ctx.tokenizer_dir)
    out = ctx.scratch / "vocabulary"
    shutil.rmtree(out, ignore_errors=True)
    report = vocab.build_expanded_tokenizer(base, texts, ctx.vocabulary["new_tokens"], out)
    ctx.store.upload_dir(out, ctx.uri("tokenizer"))
    return report


# --- pass 4: attach -------------------------------------------------------------------------------


def attach_piece(ctx: Context, p: int) -> dict:
    """Candidates whose earlier side is in piece p get that side's signature, routed to the later side."""
    files = _listed(ctx, "work", "pairs", pieces_name(p))
    if not files:
        return {"candidates": 0}
    pairs = np.unique(np.concatenate([np.load(io.BytesIO(ctx.store.get_bytes(u))) for u in files]), axis=0)
    sigs = _signatures(ctx, p)
    sig_a = np.asarray(sigs[local_of(pairs[:, 0])])
    later = piece_of(pairs[:, 1])
    for q in np.unique(later):
        m = later == q
        buf = io.BytesIO()
        np.savez(buf, later=pairs[m, 1], earlier=pairs[m, 0], signatures=sig_a[m])
        ctx.store.put_bytes(ctx.uri("work", "attached", pieces_name(int(q)), f"from-{pieces_name(p)}.npz"), buf.getvalue())
    return {"candidates": int(len(pairs))}


# --- pass 5: final --------------------------------------------------------------------------------


class ShardWriter:
    """Writes blocks to <prefix>-0000.parquet, -0001, ..., `blocks_per_shard` blocks each."""

    def __init__(self, out_dir: Path, prefix: str, sequence_length: int, blocks_per_shard: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.length = sequence_length
        self.per_shard = blocks_per_shard
        self.files: list[tuple[str, int]] = []
        self._ids: list[np.ndarray] = []
        self._pos: list[np.ndarray] = []

    def add(self, input_ids: list[int], position_ids: list[int]) -> None:
        self._ids.append(np.asarray(input_ids, dtype=np.int32))  # 4 bytes a token, not a Python int's 36
        self._pos.append(np.asarray(position_ids, dtype=np.int32))
        if len(self._ids) >= self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._ids:
            return
        n, length = len(self._ids), self.length
        offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))
        cols = [pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(rows))) for rows in (self._ids, self._pos)]
        name = f"{self.prefix}-{len(self.files):04d}.parquet"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_arrays(cols, schema=SCHEMA), self.out_dir / name)
        self.files.append((name, n))
        self._ids, self._pos = [], []


def final_piece(ctx: Context, p: int, tokenizer) -> dict:
    """Pass 5 for piece p: drop decisions, tokens, blocks, the tail, the per-document report."""
    spec, piece = ctx.spec, ctx.plan.pieces[p]
    name = spec.source_names()[piece.source]
    texts = pq.read_table(io.BytesIO(ctx.store.get_bytes(ctx.uri("work", "scan", pieces_name(p), "texts.parquet"))))
    reasons = np.asarray(texts.column("reason").to_numpy(zero_copy_only=False), dtype=np.int8).copy()
    exact = np.zeros(len(reasons), dtype=bool)
    for u in _listed(ctx, "work", "drops", pieces_name(p)):
        exact[local_of(np.load(io.BytesIO(ctx.store.get_bytes(u))))] = True
    near = np.zeros(len(reasons), dtype=bool)
    attached = _listed(ctx, "work", "attached", pieces_name(p))
    if attached:
        sigs = _signatures(ctx, p)
        for u in attached:
            z = np.load(io.BytesIO(ctx.store.get_bytes(u)))
            idx = local_of(z["later"])
            ok = verified(z["signatures"], np.asarray(sigs[idx]), spec.dedup.threshold)
            near[idx[ok]] = True
    eligible = (reasons == 0) | (reasons == CODE[DropReason.CONTAMINATED])
    reasons[eligible & near] = CODE[DropReason.NEAR_DUPLICATE]
    reasons[eligible & exact] = CODE[DropReason.EXACT_DUPLICATE]
    packer = Packer(spec.packing.sequence_length, eos_id_for(tokenizer, spec.packing))
    eos = 1 if packer.eos_id is not None else 0
    writer = ShardWriter(ctx.scratch / "final" / name, pieces_name(p), spec.packing.sequence_length,
                         spec.packing.blocks_per_shard)
    column = texts.column("text").to_pylist()
    present = [i for i, t in enumerate(column) if t is not None]
    tokens = np.zeros(len(reasons), dtype=np.int64)
    tokens_kept = 0
    docs = (column[i] for i in present)
    for i, ids in zip(present, tokenize_batches(tokenizer, docs, BATCH), strict=True):
        tokens[i] = len(ids) + eos
        if reasons[i] == 0:
            tokens_kept += len(ids) + eos
            for block in packer.add(ids):
                writer.add(block.input_ids, block.position_ids)
    writer.flush()
    tail_ids, tail_pos = packer.tail()
    dropped = {r.value: int((reasons == CODE[r]).sum()) for r in REASONS}
    langs: dict[str, dict] = {}
    lang_col = texts.column("lang").to_pylist()
    for i, lang in enumerate(lang_col):
        entry = langs.setdefault(lang or "und", {"documents": 0, "tokens": 0, "kept": 0})
        entry["documents"] += 1
        entry["tokens"] += int(tokens[i])
        entry["kept"] += int(reasons[i] == 0)
    local = ctx.scratch / "final"
    local.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"index": pa.array(np.arange(len(reasons), dtype=np.int32)),
                             "reason": pa.array([REASONS[c - 1].value if c else "" for c in reasons.tolist()]),
                             "lang": texts.column("lang"), "confidence": texts.column("confidence"),
                             "tokens": pa.array(tokens)}), local / "documents.parquet")
    ctx.store.put_bytes(ctx.uri("documents", f"{pieces_name(p)}.parquet"), (local / "documents.parquet").read_bytes())
    for shard, _ in writer.files:
        ctx.store.upload_file(local / name / shard, ctx.uri("shards", name, shard))
    _save_npy(ctx, np.array([tail_ids, tail_pos], dtype=np.int32).reshape(2, -1), "work", "tails", f"{pieces_name(p)}.npy")
    shutil.rmtree(local, ignore_errors=True)
    return {"source": piece.source, "documents": int(len(reasons)), "kept": int((reasons == 0).sum()),
            "dropped": dropped, "tokens_in": int(tokens.sum()), "tokens_kept": int(tokens_kept),
            "blocks": packer.blocks, "tail": len(tail_ids), "shards": [[f"shards/{name}/{s}", b] for s, b in writer.files],
            "languages": langs}


# --- pass 6: merge --------------------------------------------------------------------------------


def merge(ctx: Context, scans: list[dict], finals: list[dict], vocabulary: dict | None) -> dict:
    """Tails packed per source, the mixture, stats.json, then MANIFEST.json (last)."""
    spec = ctx.spec
    names = spec.source_names()
    length = spec.packing.sequence_length
    sources = []
    for s, (src, name) in enumerate(zip(spec.sources, names, strict=True)):
        mine = [(p, f) for p, f in enumerate(finals) if f["source"] == s]
        writer = ShardWriter(ctx.scratch / "merge" / name, "tails", length, spec.packing.blocks_per_shard)
        ids: list[int] = []
        pos: list[int] = []
        for p, _ in mine:
            tail = _load_npy(ctx, "work", "tails", f"{pieces_name(p)}.npy")
            ids += tail[0].tolist()
            pos += tail[1].tolist()
            while len(ids) >= length:
                writer.add(ids[:length], pos[:length])
                ids, pos = ids[length:], pos[length:]
        writer.flush()
        for shard, _ in writer.files:
            ctx.store.upload_file(ctx.scratch / "merge" / name / shard, ctx.uri("shards", name, shard))
        shards = [sh for _, f in mine for sh in f["shards"]] + [[f"shards/{name}/{sh}", b] for sh, b in writer.files]
        blocks = sum(b for _, b in shards)
        whole, frac = divmod(src.weight, 1.0)
        mixture_blocks = int(whole) * blocks + round(frac * blocks)
        dropped = {r.value: sum(f["dropped"][r.value] for _, f in mine) for r in REASONS}
        scanned = [scans[p] for p, _ in mine]
        dropped[DropReason.BAD_RECORD.value] = sum(x["bad_record"] for x in scanned)
        langs: dict[str, dict] = {}
        for _, f in mine:
            for lang, v in f["languages"].items():
                entry = langs.setdefault(lang, {"documents": 0, "tokens": 0, "kept": 0})
                for k in entry:
                    entry[k] += v[k]
        sources.append({
            "name": name, "uri": src.uri, "weight": src.weight,
            "documents_in": sum(x["records"] for x in scanned), "kept": sum(f["kept"] for _, f in mine),
            "dropped": dropped, "tokens_in": sum(f["tokens_in"] for _, f in mine),
            "tokens_kept": sum(f["tokens_kept"] for _, f in mine), "blocks": blocks,
            "mixture_blocks": mixture_blocks, "tokens_in_mixture": mixture_blocks * length,
            "dropped_tail_tokens": len(ids), "languages": dict(sorted(langs.items())), "shards": shards,
            "corrupt_files": [c for x in scanned for c in x["corrupt_files"]],
        })
    total_dropped = {r.value: sum(s["dropped"][r.value] for s in sources) for r in REASONS}
    stats = {
        "key": ctx.root.rstrip("/").rsplit("/", 1)[-1],
        "documents_in": sum(s["documents_in"] for s in sources), "kept": sum(s["kept"] for s in sources),
        "dropped": total_dropped, "tokens_in": sum(s["tokens_in"] for s in sources),
        "tokens": sum(s["tokens_kept"] for s in sources), "blocks": sum(s["blocks"] for s in sources),
        "mixture_blocks": sum(s["mixture_blocks"] for s in sources),
        "tokens_in_mixture": sum(s["tokens_in_mixture"] for s in sources),
        "dropped_tail_tokens": sum(s["dropped_tail_tokens"] for s in sources), "sequence_length": length,
        "pieces": len(ctx.plan.pieces), "corrupt_files": [c for s in sources for c in s["corrupt_files"]],
        "sources": [{k: v for k, v in s.items() if k != "shards"} for s in sources],
        "shards": [sh for s in sources for sh, _ in s["shards"]],
        "vocabulary": vocabulary,
    }
    manifest = {"key": stats["key"], "sequence_length": length, "tokens": stats["tokens"],
                "tokenizer": "tokenizer" if vocabulary else None,
                "sources": [{"name": s["name"], "weight": s["weight"], "blocks": s["blocks"],
                             "mixture_blocks": s["mixture_blocks"], "shards": s["shards"]} for s in sources],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    ctx.store.put_bytes(ctx.uri(PASSES_FILE), json.dumps(_passes(ctx), indent=1).encode())
    ctx.store.put_bytes(ctx.uri(STATS_FILE), (json.dumps(stats, ensure_ascii=False, indent=2) + "\n").encode())
    ctx.store.put_bytes(ctx.uri(MANIFEST_FILE), (json.dumps(manifest, ensure_ascii=False, indent=1) + "\n").encode())
    ctx.store.delete_prefix(ctx.uri("work"))
    shutil.rmtree(ctx.scratch / "merge", ignore_errors=True)
    return stats


# --- the worker loop ------------------------------------------------------------------------------


def _passes(ctx: Context) -> dict:
    """Every item's marker without its result: {pass: {item: {worker, started, finished}}}."""
    out: dict[str, dict] = {}
    for stage in ("scan", "bucket", "vocabulary", "attach", "final"):
        for item, uri in sorted(_done(ctx, stage).items()):
            marker = json.loads(ctx.store.get_bytes(uri))
            out.setdefault(stage, {})[str(item)] = {k: marker[k] for k in ("worker", "started", "finished")}
    return out


def _done_uri(ctx: Context, stage: str, item: int) -> str:
    return ctx.uri("work", "done", stage, f"{item:06d}.json")


def _done(ctx: Context, stage: str) -> dict[int, dict]:
    """Markers of finished items: {item: what it reported}."""
    out = {}
    for uri in ctx.store.list(ctx.uri("work", "done", stage) + "/"):
        name = uri.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            out[int(name[:-5])] = uri
    return out


def _read_done(ctx: Context, stage: str, count: int) -> list[dict]:
    return [json.loads(ctx.store.get_bytes(_done_uri(ctx, stage, i)))["result"] for i in range(count)]


def _wait(ctx: Context, stage: str, count: int) -> None:
    """Until every item of `stage` has its marker (other workers, possibly retried, finish theirs)."""
    delay, since = ctx.poll, time.monotonic()
    while len(_done(ctx, stage)) < count:
        if ctx.store.exists(ctx.uri(MANIFEST_FILE)):
            return
        if time.monotonic() - since > 60:
            log.info("waiting for %d %s item(s) of other workers", count - len(_done(ctx, stage)), stage)
            since = time.monotonic()
        time.sleep(delay)
        delay = min(delay * 1.5, 2.0)


def _run_items(ctx: Context, stage: str, items: list[int], fn: Callable[[int], dict], worker: str) -> None:
    done = _done(ctx, stage)
    for item in items:
        if item in done:
            continue
        started = time.time()
        result = fn(item)
        marker = {"result": result, "worker": worker, "started": started, "finished": time.time()}
        ctx.store.put_bytes(_done_uri(ctx, stage, item), json.dumps(marker, ensure_ascii=False).encode())
        if ctx.on_item:
            ctx.on_item(stage, item)


def total_items(plan: Plan, vocabulary: bool) -> int:
    n = len(plan.pieces)
    return 3 * n + plan.banding.groups + int(vocabulary) + 1


def run_worker(ctx: Context, index: int, workers: int, tokenizer_loader: Callable[[Path], object]) -> dict | None:
    """Worker `index` of `workers`: its items of every pass, in order, waiting for earlier passes.
    Returns the stats when this worker wrote the manifest (or found it), else None."""
    if ctx.store.exists(ctx.uri(MANIFEST_FILE)):
        return json.loads(ctx.store.get_bytes(ctx.uri(STATS_FILE)))
    n, groups = len(ctx.plan.pieces), ctx.plan.banding.groups
    mine = lambda count, offset=0: [i for i in range(count) if (i + offset) % workers == index]  # noqa: E731
    worker = f"{os.environ.get('HOSTNAME') or socket.gethostname()}:{os.getpid()}"
    _run_items(ctx, "scan", mine(n), lambda p: scan_piece(ctx, p), worker)
    _wait(ctx, "scan", n)
    if ctx.store.exists(ctx.uri(MANIFEST_FILE)):
        return json.loads(ctx.store.get_bytes(ctx.uri(STATS_FILE)))
    scans = _read_done(ctx, "scan", n)
    check_sources(ctx, scans)
    _run_items(ctx, "bucket", mine(groups, n), lambda g: bucket_group(ctx, g, scans), worker)
    if ctx.vocabulary:
        _run_items(ctx, "vocabulary", mine(1, workers - 1), lambda _: vocabulary_item(ctx, scans), worker)
    _wait(ctx, "bucket", groups)
    _run_items(ctx, "attach", mine(n), lambda p: attach_piece(ctx, p), worker)
    _wait(ctx, "attach", n)
    if ctx.vocabulary:
        _wait(ctx, "vocabulary", 1)
    vocabulary = _read_done(ctx, "vocabulary", 1)[0] if ctx.vocabulary else None
    finals_mine = mine(n)
    if finals_mine:
        tok_dir = ctx.tokenizer_dir
        if ctx.vocabulary:
            tok_dir = ctx.scratch / "expanded-tokenizer"
            ctx.store.download_dir(ctx.uri("tokenizer"), tok_dir)
        tokenizer = tokenizer_loader(tok_dir)
        _run_items(ctx, "final", finals_mine, lambda p: final_piece(ctx, p, tokenizer), worker)
    if index != 0:
        return None
    _wait(ctx, "final", n)
    if ctx.store.exists(ctx.uri(MANIFEST_FILE)):
        return json.loads(ctx.store.get_bytes(ctx.uri(STATS_FILE)))
    stats = merge(ctx, scans, _read_done(ctx, "final", n), vocabulary)
    log.info("prepare: %s", json.dumps({k: stats[k] for k in ("documents_in", "kept", "tokens", "blocks")}))
    return stats


def check_sources(ctx: Context, scans: list[dict]) -> None:
    """DataError for a source with no records, or whose every record is broken (a wrong textField)."""
    for s, src in enumerate(ctx.spec.sources):
        mine = [x for p, x in enumerate(scans) if ctx.plan.pieces[p].source == s]
        records, bad = sum(x["records"] for x in mine), sum(x["bad_record"] for x in mine)
        if not records:
            raise DataError(f"{src.uri}: empty dataset (no records in {len(ctx.plan.files[s])} file(s))")
        if records == bad:
            raise DataError(f"{src.uri}: all {records} records are broken (bad JSON or no string field {src.text_field!r})")


# --- in one process -------------------------------------------------------------------------------


def prepare(spec: DataPrepSpec, tokenizer_dir: str | Path, output: str | Path, *, store=None,
            data_store: ObjectStore | None = None, benchmark_texts: Iterable[str] = (),
            vocabulary: dict | None = None, index: int = 0, workers: int = 1, scratch: Path | None = None) -> dict | None:
    """Worker `index` of `workers` preparing into `output` (a folder or an s3:// prefix), all passes.
    With the defaults, the whole pipeline in this process; returns the stats from worker 0."""
    from dhad_trainer.storage.local import LocalStore

    store = store or LocalStore()
    data_store = data_store or LocalStore()
    plan = Plan.make(spec, data_store)
    own = scratch is None
    scratch = Path(tempfile.mkdtemp(prefix="dhad-prepare-")) if own else scratch
    try:
        ctx = Context(plan, str(output), store, data_store, Path(tokenizer_dir), scratch, vocabulary,
                      list(benchmark_texts))
        return run_worker(ctx, index, workers, load_tokenizer)
    finally:
        _decontaminators.clear()
        if own:
            shutil.rmtree(scratch, ignore_errors=True)


def iter_blocks(store, root: str) -> Iterator[tuple[str, list[int], list[int]]]:
    """(source, input_ids, position_ids) of every block of a prepared dataset, in manifest order."""
    manifest = json.loads(store.get_bytes(f"{root.rstrip('/')}/{MANIFEST_FILE}"))
    for src in manifest["sources"]:
        for path, _ in src["shards"]:
            table = pq.read_table(io.BytesIO(store.get_bytes(f"{root.rstrip('/')}/{path}")))
            for ids, pos in zip(table.column("input_ids").to_pylist(), table.column("position_ids").to_pylist(), strict=True):
                yield src["name"], ids, pos
