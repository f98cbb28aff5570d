"""Arabic data pipeline throughput and peak memory on a generated corpus, against a baseline from the same run.

Rows (each in a fresh forked process, so peak RSS is its own):
1. read only: stream the jsonl and decode every record                         <- baseline
2. tokenize only: the same text through the tiny model's fast tokenizer, batched
3. prepare(): normalize, filter, exact + MinHash dedup, decontaminate, tokenize, pack, write parquet

The corpus is synthetic Arabic: documents of random lengths whose words are drawn from the project's
corpus vocabulary, so dedup keeps nearly all of them (a copy of the same lines would be deduplicated
away). python bench/data_pipeline.py [--mb 20]  (--mb 1024 for 1 GB; needs disk for the parquet output).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def generate(path: Path, megabytes: float, seed: int = 0) -> int:
    from dhad_trainer.local.tiny import DEFAULT_CORPUS

    words = DEFAULT_CORPUS.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    target, written, docs = int(megabytes * 1024 * 1024), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while written < target:
            n = max(30, int(rng.lognormvariate(5.0, 0.8)))  # ~150 words median
            text = " ".join(rng.choice(words) for _ in range(n))
            line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    return docs


def _measure(fn, queue) -> None:
    start = time.perf_counter()
    out = fn()
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, out))


def in_child(fn):
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(fn, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="corpus size in MB")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()

    from transformers import AutoTokenizer

    from dhad_api.data_prep import DataPrepSpec, SourceSpec
    from dhad_trainer.data.prepare import prepare
    from dhad_trainer.data.readers import iter_source
    from dhad_trainer.local.tiny import init_tiny_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dhad-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    started = time.perf_counter()
    docs = generate(corpus, args.mb)
    print(f"generated {corpus.stat().st_size / 1e6:.1f} MB, {docs} documents in {time.perf_counter() - started:.1f} s")
    tokenizer = AutoTokenizer.from_pretrained(init_tiny_model(work / "tiny"))
    source = SourceSpec(uri=str(corpus))

    def read_only():
        return sum(len(t) for t in iter_source(source))

    def tokenize_only():
        from dhad_trainer.data.pack import tokenize_batches

        return sum(len(ids) for ids in tokenize_batches(tokenizer, (t for t in iter_source(source))))

    def full():
        spec = DataPrepSpec(sources=[source], packing={"sequence_length": 2048, "blocks_per_shard": 512})
        return prepare(spec, tokenizer, work / "prepared")["tokens"]

    rows = [("read only (baseline)", read_only), ("tokenize only", tokenize_only), ("prepare() full pipeline", full)]
    results = [(name, *in_child(fn)) for name, fn in rows]
    tokens = results[1][3]
    base_mbs = corpus.stat().st_size / 1e6 / results[0][1]
    print(f"{'stage':28s} {'seconds':>8s} {'MB/s':>8s} {'tokens/s':>10s} {'peak RSS MB':>12s} {'speed vs base':>14s}")
    for name, seconds, rss, _ in results:
        mbs = corpus.stat().st_size / 1e6 / seconds
        print(f"{name:28s} {seconds:8.1f} {mbs:8.1f} {tokens / seconds:10.0f} {rss:12.0f} {mbs / base_mbs:13.2f}x")
    stats = json.loads((work / "prepared" / "stats.json").read_text())
    print("prepare stats:", json.dumps({k: stats[k] for k in ("documents_in", "kept", "tokens", "blocks")}),
          "dropped:", {k: v for k, v in stats["dropped"].items() if v})


if __name__ == "__main__":
    main()
