"""The prepare pipeline shared out over worker processes: 3 workers write exactly what 1 worker writes
(every block of every source, every count), and a worker killed mid-way is restarted alone and redoes
none of the items any worker had finished. The processes share only the output folder, as pods share
only S3."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pyarrow.parquet as pq
import pytest

from dhad_api.data_prep import DataPrepSpec, ShingleUnit
from dhad_trainer.data.dedup import exact_key, jaccard, shingles
from dhad_trainer.data.normalize import make_normalizer, match_words
from dhad_trainer.data.prepare import PASSES_FILE, iter_blocks, prepare
from dhad_trainer.storage.local import LocalStore
from tests.support.arabic_corpus import byte_level_tokenizer, documents, write_jsonl

QUESTION = "ما الاسم الذي أطلقه الجغرافيون العرب على المنطقة الواقعة بين نهري دجلة والفرات في العصور القديمة"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two sources (the first in two files), planted copies within and across files and sources, one
    contaminated document, cut into pieces of 4 KB (about 30 pieces)."""
    root = tmp_path_factory.mktemp("workers")
    docs, planted = documents(420, seed=3)
    docs[200] = "قال المعلم " + QUESTION + " ثم شرح الدرس لطلابه في الصف"
    write_jsonl(root / "web" / "a.jsonl", docs[:150])
    write_jsonl(root / "web" / "b.jsonl", docs[150:300])
    write_jsonl(root / "news.jsonl", docs[300:])
    write_jsonl(root / "bench.jsonl", [])
    (root / "bench.jsonl").write_text(json.dumps({"question": QUESTION}, ensure_ascii=False) + "\n")
    spec = DataPrepSpec(
        sources=[{"uri": str(root / "web"), "name": "web"}, {"uri": str(root / "news.jsonl"), "name": "news"}],
        filters={"minChars": 20},
        decontamination={"benchmarks": [str(root / "bench.jsonl")]},
        packing={"sequenceLength": 64, "blocksPerShard": 16},
        split_megabytes=0.004,
    )
    tokenizer = byte_level_tokenizer(root / "tokenizer", docs[:100])
    one = prepare(spec, tokenizer, root / "one")
    return {"root": root, "docs": docs, "planted": planted, "spec": spec, "tokenizer": tokenizer, "one": one}


def _worker(spec_json: str, tokenizer: str, out: str, index: int, workers: int) -> None:
    os.environ["HOSTNAME"] = f"worker-{index}"
    prepare(DataPrepSpec.model_validate_json(spec_json), tokenizer, out, index=index, workers=workers)


def start(corpus, out, index: int, workers: int = 3):
    proc = mp.get_context("fork").Process(
        target=_worker, args=(corpus["spec"].model_dump_json(by_alias=True), str(corpus["tokenizer"]), str(out), index, workers))
    proc.start()
    return proc


def blocks(root) -> list:
    return list(iter_blocks(LocalStore(), str(root)))


def same_stats(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k != "key"} == {k: v for k, v in b.items() if k != "key"}


def test_one_worker_drops_what_an_independent_count_says(corpus):
    stats, planted = corpus["one"], corpus["planted"]
    assert stats["pieces"] >= 20
    norm = make_normalizer(corpus["spec"].normalization)
    seen, exact = set(), 0
    for doc in corpus["docs"]:
        key = exact_key(match_words(norm(doc)))
        exact += key in seen
        seen.add(key)
    assert stats["dropped"]["exact_duplicate"] == exact >= len(planted.exact)
    assert stats["dropped"]["contaminated"] == 1
    # near duplicates against the true Jaccard similarity of 5-word shingles, all pairs
    reasons = [r for path in sorted((corpus["root"] / "one" / "documents").glob("*.parquet"))
               for r in pq.read_table(path).column("reason").to_pylist()]
    sets = [shingles(match_words(norm(d)), ShingleUnit.WORDS, 5) for d in corpus["docs"]]
    near = [i for i, r in enumerate(reasons) if r == "near_duplicate"]
    best = {i: max((jaccard(sets[i], sets[j]) for j in range(i)), default=0.0) for i in range(len(sets))}
    assert near and all(best[i] >= 0.65 for i in near)  # each has an earlier near-identical document
    must = [i for i in range(len(sets)) if best[i] >= 0.9 and reasons[i] not in ("exact_duplicate", "contaminated")]
    assert must and all(reasons[i] == "near_duplicate" for i in must)
    assert stats["documents_in"] == len(corpus["docs"]) == stats["kept"] + sum(stats["dropped"].values())


def test_three_workers_write_exactly_what_one_worker_writes(corpus):
    out = corpus["root"] / "three"
    procs = [start(corpus, out, i) for i in range(3)]
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    stats = json.loads((out / "stats.json").read_text())
    same_stats(stats, corpus["one"])
    assert blocks(out) == blocks(corpus["root"] / "one")
    passes = json.loads((out / PASSES_FILE).read_text())
    assert {m["worker"].split(":")[0] for stage in passes.values() for m in stage.values()} == {
        "worker-0", "worker-1", "worker-2"}


def test_a_killed_worker_is_restarted_alone_and_redoes_nothing_finished(corpus):
    out = corpus["root"] / "killed"
    store = LocalStore()
    procs = [start(corpus, out, i) for i in range(3)]
    done = out / "work" / "done" / "scan"
    deadline = time.monotonic() + 120
    while not any(int(p.stem) % 3 == 1 for p in done.glob("*.json")):  # worker 1 finished an item
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(procs[1].pid, signal.SIGKILL)
    procs[1].join()
    at_kill = {stage.name: {p.stem: json.loads(p.read_text()) for p in stage.glob("*.json")}
               for stage in (out / "work" / "done").iterdir()}
    retried = start(corpus, out, 1)
    for p in [procs[0], procs[2], retried]:
        p.join(120)
        assert p.exitcode == 0
    passes = json.loads(store.get_bytes(str(out / PASSES_FILE)))
    for stage, items in at_kill.items():
        for item, marker in items.items():  # nothing finished before the kill ran again
            assert passes[stage][str(int(item))]["started"] == marker["started"]
            assert passes[stage][str(int(item))]["worker"] == marker["worker"]
    restarted = {m["worker"] for stage in passes.values() for m in stage.values() if m["worker"].startswith("worker-1:")}
    assert len(restarted) == 2  # the killed process's items and the retried process's items
    same_stats(json.loads((out / "stats.json").read_text()), corpus["one"])
    assert blocks(out) == blocks(corpus["root"] / "one")
