"""The prepare pipeline at scale, ratios against baselines measured in the same run.

1. Scaling and memory: the same generated Arabic corpus prepared by 1, 2 and 4 worker processes (as
   pods would: they share only the output folder), at each size (default 100 MB and 1 GB, side by
   side). Throughput is input MB per second of wall time from the first worker's start of preparing
   to the last one's end (interpreter start-up excluded, the same for every row); the speed-up is
   against 1 worker of the same size. Peak RSS is each worker process's own maximum resident set
   (VmHWM), the largest worker shown: it must stay under 1 GB and not grow with the input. A
   worker holds one input piece (splitMegabytes) or one bucket group at a time, so its memory follows
   the piece size, not the corpus: every size runs with the same --split-mb (default 8), and the
   table prints the largest piece beside the RSS. (With the corpus in 8 files, the spec's default 64
   would give 12.5 MB pieces at 100 MB and 64 MB pieces at 1 GB: two piece sizes, not two inputs.)
   A read-only pass (stream and decode every record, one process) is the floor.
2. Near-duplicate recall and precision of the distributed dedup (3 workers) on a 20 MB sample with
   planted near duplicates (1 to 8 words of about 60 changed, so their Jaccard similarity spreads
   around the 0.8 threshold), against an exact all-pairs computation: every pair of documents that
   shares a 5-word shingle (the only pairs that can reach any positive similarity) has its true
   Jaccard similarity computed; a document is a true near duplicate when an earlier one reaches 0.8,
   which is the rule the pipeline applies.
3. Decontamination is on everywhere: benchmark questions are planted into documents (and the real
   EXAMS questions are added when /work/shared/benchmarks is present); the table reports how many
   planted copies were dropped.

python bench/data_pipeline.py                      # 100 MB and 1 GB, 1/2/4 workers, 20 MB dedup sample
python bench/data_pipeline.py --sizes 5 --dedup-mb 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
EXAMS = Path("/work/shared/benchmarks/acegpt/EXAMS_Arabic/exam_test.jsonl")
FILES = 8  # input files per corpus


def generate(root: Path, megabytes: float, seed: int, questions: list[str], near_edits: tuple[int, int] = (1, 1),
             exact_rate: float = 0.02, near_rate: float = 0.03, contaminate_every: int = 5000) -> dict:
    """jsonl files of about `megabytes` in total; returns what was planted (document order indexes)."""
    from tests.support.arabic_corpus import respell, vocabulary

    words = vocabulary()
    rng = random.Random(seed)
    target, written, i = int(megabytes * 1024 * 1024), 0, 0
    recent: list[str] = []
    planted = {"exact": 0, "near": 0, "contaminated": 0}
    root.mkdir(parents=True, exist_ok=True)
    outs = [open(root / f"part-{k:02d}.jsonl", "w", encoding="utf-8") for k in range(FILES)]  # noqa: SIM115
    per_file = target // FILES + 1
    while written < target:
        roll = rng.random()
        if recent and roll < exact_rate:
            text = respell(rng.choice(recent))
            planted["exact"] += 1
        elif recent and roll < exact_rate + near_rate:
            toks = rng.choice(recent).split(" ")
            for _ in range(rng.randint(*near_edits)):
                toks[rng.randrange(len(toks))] = rng.choice(words)
            text = " ".join(toks)
            planted["near"] += 1
        else:
            n = max(30, int(rng.lognormvariate(math.log(60), 0.4)))
            text = " ".join(rng.choice(words) for _ in range(n))
            if questions and i % contaminate_every == contaminate_every - 1:
                text = text + " " + rng.choice(questions)
                planted["contaminated"] += 1
        recent.append(text)
        if len(recent) > 2000:  # copies come from the last few thousand documents, as crawl duplicates do
            recent.pop(rng.randrange(len(recent)))
        line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
        outs[min(written // per_file, FILES - 1)].write(line)
        written += len(line.encode("utf-8"))
        i += 1
    for f in outs:
        f.close()
    planted["documents"] = i
    return planted


def questions_file(root: Path, seed: int) -> tuple[Path, list[str]]:
    from tests.support.arabic_corpus import vocabulary

    words = vocabulary()
    rng = random.Random(seed)
    questions = [" ".join(rng.choice(words) for _ in range(16)) for _ in range(200)]
    path = root / "benchmark.jsonl"
    path.write_text("".join(json.dumps({"question": q}, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    return path, questions


def spec_for(corpus: Path, benchmarks: list[Path], workers: int, split_mb: float = 64) -> dict:
    return {"sources": [{"uri": str(corpus), "name": "arabic"}], "filters": {"minChars": 50},
            "decontamination": {"benchmarks": [str(b) for b in benchmarks], "questionFields": ["question"]},
            "packing": {"sequenceLength": 2048, "blocksPerShard": 512}, "workers": workers, "splitMegabytes": split_mb}


def worker_main(args) -> None:
    """One worker process: prepare() for its index, then its own timing and peak RSS in a JSON file."""
    from dhad_api.data_prep import DataPrepSpec
    from dhad_trainer.data.prepare import prepare

    spec = DataPrepSpec.model_validate(json.loads(Path(args.spec).read_text()))
    start = time.time()
    prepare(spec, args.tokenizer, args.out, index=args.index, workers=spec.workers,
            scratch=Path(args.out + f"-scratch-{args.index}"))
    end = time.time()
    Path(args.result).write_text(json.dumps({"start": start, "end": end, "rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM). getrusage's ru_maxrss would also count the parent's
    resident set at fork time, which Linux carries across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_workers(work: Path, spec: dict, tokenizer: Path, out: Path) -> dict:
    spec_path = work / f"spec-{out.name}.json"
    spec_path.write_text(json.dumps(spec))
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs, results = [], []
    for i in range(spec["workers"]):
        result = work / f"result-{out.name}-{i}.json"
        results.append(result)
        procs.append(subprocess.Popen([sys.executable, __file__, "worker", "--spec", str(spec_path), "--tokenizer",
                                       str(tokenizer), "--out", str(out), "--index", str(i), "--result", str(result)], env=env))
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed: exit codes {codes}")
    rows = [json.loads(r.read_text()) for r in results]
    for i in range(spec["workers"]):
        shutil.rmtree(f"{out}-scratch-{i}", ignore_errors=True)
    stats = json.loads((out / "stats.json").read_text())
    return {"seconds": max(r["end"] for r in rows) - min(r["start"] for r in rows),
            "rss_mb": max(r["rss_mb"] for r in rows), "stats": stats}


def largest_pieces(corpus: Path, split_mb: float) -> tuple[int, float]:
    """(pieces, the largest piece in MB) as the pipeline plans them for this corpus."""
    from dhad_api.data_prep import SourceSpec
    from dhad_trainer.data.readers import describe, plan_pieces

    src = SourceSpec(uri=str(corpus))
    pieces = plan_pieces([src], [describe(src.uri, None)], max(1, int(split_mb * 1024 * 1024)))
    sizes = [(p.end if p.end >= 0 else Path(p.uri).stat().st_size) - p.start for p in pieces]
    return len(pieces), max(sizes) / 1e6


def read_only(corpus: Path) -> float:
    from dhad_api.data_prep import SourceSpec
    from dhad_trainer.data.readers import iter_source

    start = time.perf_counter()
    sum(len(t) for t in iter_source(SourceSpec(uri=str(corpus))))
    return time.perf_counter() - start


def dedup_quality(work: Path, tokenizer: Path, megabytes: float, benchmarks: list[Path], questions: list[str]) -> dict:
    """Recall and precision of near-duplicate drops (3 workers) against exact all-pairs Jaccard."""
    import pyarrow.parquet as pq

    from dhad_api.data_prep import DataPrepSpec, ShingleUnit
    from dhad_trainer.data.dedup import exact_key, shingles
    from dhad_trainer.data.normalize import make_normalizer, match_words

    corpus = work / "dedup-corpus"
    planted = generate(corpus, megabytes, seed=7, questions=questions, near_edits=(1, 8), near_rate=0.08)
    spec = spec_for(corpus, benchmarks, 3)
    spec["splitMegabytes"] = max(0.25, megabytes / 24)
    run = run_workers(work, spec, tokenizer, work / "dedup-out")
    reasons = [r for p in sorted((work / "dedup-out" / "documents").glob("*.parquet"))
               for r in pq.read_table(p).column("reason").to_pylist()]
    norm = make_normalizer(DataPrepSpec.model_validate(spec).normalization)
    texts = [json.loads(line)["text"] for f in sorted(corpus.glob("*.jsonl")) for line in f.open(encoding="utf-8")]
    assert len(texts) == len(reasons), (len(texts), len(reasons))
    start = time.perf_counter()
    sets, keys, index = [], [], defaultdict(list)
    for i, t in enumerate(texts):
        words = match_words(norm(t))
        s = shingles(words, ShingleUnit.WORDS, 5)
        sets.append(s)
        keys.append(exact_key(words))
        for sh in s:
            index[sh].append(i)
    dedupable = {i for i, r in enumerate(reasons) if r in ("", "near_duplicate", "exact_duplicate", "contaminated")}
    best = [0.0] * len(texts)
    pairs = 0
    for i, s in enumerate(sets):
        earlier = {j for sh in s for j in index[sh] if j < i and j in dedupable}
        pairs += len(earlier)
        for j in earlier:
            best[i] = max(best[i], len(s & sets[j]) / len(s | sets[j]))
    seen, exact = set(), set()
    for i, k in enumerate(keys):
        if i not in dedupable:
            continue
        if k in seen:
            exact.add(i)
        seen.add(k)
    eligible = [i for i, r in enumerate(reasons) if r in ("", "near_duplicate", "contaminated") and i not in exact]
    assert exact == {i for i, r in enumerate(reasons) if r == "exact_duplicate"}, "exact drops differ from the recount"
    truth = {i for i in eligible if best[i] >= 0.8}
    predicted = {i for i in eligible if reasons[i] == "near_duplicate"}
    hit = len(truth & predicted)
    return {"documents": len(texts), "planted_near": planted["near"], "true_near": len(truth), "predicted": len(predicted),
            "recall": hit / len(truth) if truth else float("nan"), "precision": hit / len(predicted) if predicted else float("nan"),
            "pairs_checked": pairs, "all_pairs_seconds": time.perf_counter() - start, "pipeline_seconds": run["seconds"],
            "contaminated": run["stats"]["dropped"]["contaminated"], "planted_contaminated": planted["contaminated"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("worker")
    for name in ("--spec", "--tokenizer", "--out", "--result"):
        w.add_argument(name, required=True)
    w.add_argument("--index", type=int, required=True)
    p.add_argument("--sizes", default="100,1024", help="corpus sizes in MB, comma-separated")
    p.add_argument("--workers", default="1,2,4")
    p.add_argument("--dedup-mb", type=float, default=20)
    p.add_argument("--split-mb", type=float, default=8, help="splitMegabytes for every size (the piece a worker holds)")
    p.add_argument("--workdir", type=Path, default=None)
    args = p.parse_args()
    if args.command == "worker":
        worker_main(args)
        return

    from dhad_trainer.local.tiny import init_tiny_model

    work = args.workdir or Path(tempfile.mkdtemp(prefix="dhad-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = init_tiny_model(work / "tiny")
    bench, questions = questions_file(work, seed=3)
    benchmarks = [bench] + ([EXAMS] if EXAMS.exists() else [])
    print(f"workdir {work}; decontamination against {', '.join(str(b) for b in benchmarks)}", flush=True)

    sizes = [float(s) for s in args.sizes.split(",")]
    counts = [int(c) for c in args.workers.split(",")]
    table: dict[float, dict] = {}
    for mb in sizes:
        corpus = work / f"corpus-{mb:g}mb"
        started = time.perf_counter()
        planted = generate(corpus, mb, seed=1, questions=questions)
        size = sum(f.stat().st_size for f in corpus.glob("*.jsonl")) / 1e6
        print(f"\n{size:.0f} MB: {planted['documents']} documents generated in {time.perf_counter() - started:.0f} s "
              f"(planted: {planted['exact']} exact, {planted['near']} near, {planted['contaminated']} contaminated)", flush=True)
        floor = read_only(corpus)
        pieces = largest_pieces(corpus, args.split_mb)
        print(f"  splitMegabytes {args.split_mb:g}: {pieces[0]} pieces, the largest {pieces[1]:.1f} MB", flush=True)
        table[mb] = {"size": size, "read_only": floor, "planted": planted, "rows": {}, "pieces": pieces}
        for n in counts:
            r = run_workers(work, spec_for(corpus, benchmarks, n, args.split_mb), tokenizer, work / f"out-{mb:g}-{n}")
            table[mb]["rows"][n] = r
            d = r["stats"]["dropped"]
            print(f"  {n} worker(s): {r['seconds']:.0f} s, {size / r['seconds']:.2f} MB/s, peak RSS {r['rss_mb']:.0f} MB; "
                  f"kept {r['stats']['kept']}, exact {d['exact_duplicate']}, near {d['near_duplicate']}, "
                  f"contaminated {d['contaminated']}, tokens {r['stats']['tokens']}", flush=True)
            shutil.rmtree(work / f"out-{mb:g}-{n}", ignore_errors=True)
        shutil.rmtree(corpus, ignore_errors=True)

    print("\nscaling and memory (speed-up against 1 worker of the same size; read-only floor: one process)")
    head = f"{'workers':>8s}" + "".join(f" | {t['size']:>5.0f} MB: {'s':>6s} {'MB/s':>6s} {'speed-up':>8s} {'RSS MB':>7s}"
                                         for t in table.values())
    print(head)
    for n in counts:
        line = f"{n:>8d}"
        for t in table.values():
            r, base = t["rows"][n], t["rows"][counts[0]]
            line += f" | {'':>9s}{r['seconds']:6.0f} {t['size'] / r['seconds']:6.2f} {base['seconds'] / r['seconds']:7.2f}x {r['rss_mb']:7.0f}"
        print(line)
    print(f"{'read-only':>8s}" + "".join(f" | {'':>9s}{t['read_only']:6.0f} {t['size'] / t['read_only']:6.2f} {'':>8s} {'':>7s}"
                                         for t in table.values()))
    print(f"{'pieces':>8s}" + "".join(f" | {'':>9s}{t['pieces'][0]:6d}, the largest {t['pieces'][1]:5.1f} MB{'':>7s}"
                                       for t in table.values()))
    worst = max(r["rss_mb"] for t in table.values() for r in t["rows"].values())
    print(f"largest worker peak RSS: {worst:.0f} MB ({'under' if worst < 1024 else 'OVER'} 1 GB)")

    q = dedup_quality(work, tokenizer, args.dedup_mb, benchmarks, questions)
    print(f"\nnear-duplicate removal on {args.dedup_mb:g} MB ({q['documents']} documents, {q['planted_near']} planted "
          f"with 1-8 words changed), 3 workers, against exact all-pairs Jaccard >= 0.8 "
          f"({q['pairs_checked']} sharing pairs checked in {q['all_pairs_seconds']:.0f} s):")
    print(f"  true near duplicates {q['true_near']}, dropped as near {q['predicted']}: "
          f"recall {q['recall']:.3f}, precision {q['precision']:.3f}; "
          f"contaminated dropped {q['contaminated']} of {q['planted_contaminated']} planted")


if __name__ == "__main__":
    main()
