"""Language identification and sources with their own filters and weights: Persian and Urdu no longer
pass for Arabic, and an Arabic + English-replay mixture (AceGPT's) is one manifest whose stats give
tokens per source before and after filtering and in the mixture."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dhad_api.data_prep import DataPrepSpec, FilterSpec
from dhad_trainer.data import mixture
from dhad_trainer.data.filters import DropReason, check
from dhad_trainer.data.language import identify
from dhad_trainer.data.prepare import prepare
from tests.support.arabic_corpus import byte_level_tokenizer, write_jsonl
from tests.support.language_samples import (
    DIALECT_ARABIC,
    LANGUAGES,
    MIXED_ARABIC,
    SENTENCES,
    SHORT,
    documents,
)


@pytest.mark.parametrize("lang", LANGUAGES)
def test_each_language_is_identified(lang):
    for text in SENTENCES[lang] + SHORT[lang] + documents(lang, 10):
        code, confidence = identify(text)
        assert code == lang, text
        assert 0 < confidence <= 1


def test_dialects_and_latin_terms_are_still_arabic():
    assert [identify(t)[0] for t in DIALECT_ARABIC + MIXED_ARABIC] == ["ar"] * (len(DIALECT_ARABIC) + len(MIXED_ARABIC))
    assert identify("  \n ") == ("und", 0.0)


def test_the_arabic_ratio_passes_persian_and_urdu_the_language_filter_does_not():
    persian, urdu, arabic = documents("fa", 1)[0], documents("ur", 1)[0], documents("ar", 1)[0]
    script_only = FilterSpec(min_chars=20, languages=[])
    assert check(persian, script_only) is None and check(urdu, script_only) is None  # the old behaviour
    default = FilterSpec(min_chars=20)
    assert check(persian, default) == check(urdu, default) == DropReason.LANGUAGE
    assert check(arabic, default) is None
    assert check(arabic, FilterSpec(min_chars=20, min_language_confidence=1.0)) == DropReason.LANGUAGE


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """Arabic web text with Persian and Urdu mixed in, and English replay data at weight 0.25."""
    root = tmp_path_factory.mktemp("mixture")
    arabic = documents("ar", 60, seed=1)
    foreign = documents("fa", 10, seed=2) + documents("ur", 10, seed=3)
    web = [d for pair in zip(arabic, foreign + [None] * 40, strict=True) for d in pair if d]
    english = documents("en", 80, seed=4)
    write_jsonl(root / "web.jsonl", web)
    write_jsonl(root / "replay.jsonl", english)
    manifest = {
        "sources": [
            {"uri": str(root / "web.jsonl"), "name": "arabic-web"},
            {"uri": str(root / "replay.jsonl"), "name": "english-replay", "weight": 0.25,
             "filters": {"languages": ["en"], "minArabicRatio": 0, "minChars": 20}},
        ],
        "filters": {"minChars": 20},
        "dedup": {"nearDuplicate": False},
        "packing": {"sequenceLength": 32, "blocksPerShard": 8},
    }
    spec = DataPrepSpec.model_validate(manifest)
    tok = byte_level_tokenizer(root / "tok", arabic + english)
    stats = prepare(spec, tok, root / "out")
    return root, spec, stats


def test_persian_and_urdu_are_dropped_and_english_replay_is_kept(mixture_run):
    _, _, stats = mixture_run
    web, replay = stats["sources"]
    assert web["documents_in"] == 80 and web["dropped"]["language"] == 20 and web["dropped"]["low_arabic_ratio"] == 0
    assert set(web["languages"]) == {"ar", "fa", "ur"} and web["languages"]["fa"] == {"documents": 10, "kept": 0,
                                                                                          "tokens": web["languages"]["fa"]["tokens"]}
    assert web["languages"]["ar"]["kept"] == web["kept"]
    assert replay["dropped"]["low_arabic_ratio"] == replay["dropped"]["language"] == 0
    assert replay["languages"]["en"]["kept"] == replay["kept"] == 80 - replay["dropped"]["exact_duplicate"]


def test_stats_give_tokens_per_source_before_after_and_in_the_mixture(mixture_run):
    root, spec, stats = mixture_run
    web, replay = stats["sources"]
    assert web["tokens_in"] > web["tokens_kept"] > 0  # the Persian and Urdu tokens are gone
    assert web["tokens_in"] == sum(v["tokens"] for v in web["languages"].values())
    assert web["tokens_in"] - web["tokens_kept"] >= web["languages"]["fa"]["tokens"] + web["languages"]["ur"]["tokens"]
    for s in (web, replay):
        assert s["tokens_kept"] == s["blocks"] * 32 + s["dropped_tail_tokens"]
    assert web["mixture_blocks"] == web["blocks"] and replay["mixture_blocks"] == round(0.25 * replay["blocks"])
    assert replay["tokens_in_mixture"] == replay["mixture_blocks"] * 32
    assert stats["tokens_in_mixture"] == web["tokens_in_mixture"] + replay["tokens_in_mixture"]
    assert json.loads((root / "out" / "stats.json").read_text())["sources"][1]["name"] == "english-replay"


def test_the_mixture_order_follows_the_weights_and_is_seeded(mixture_run):
    root, _, _ = mixture_run
    manifest = json.loads((root / "out" / "MANIFEST.json").read_text())
    order = mixture.order(manifest, seed=7)
    shards = mixture.shard_list(manifest)
    source_of = [next(s["name"] for s in manifest["sources"] if path in [p for p, _ in s["shards"]]) for path, _ in shards]
    counts = {name: sum(source_of[int(s)] == name for s in order[:, 0]) for name in ("arabic-web", "english-replay")}
    assert counts == {s["name"]: s["mixture_blocks"] for s in manifest["sources"]}
    assert len({tuple(r) for r in order.tolist()}) == len(order)  # weights <= 1: no block twice
    assert np.array_equal(order, mixture.order(manifest, seed=7)) and not np.array_equal(order, mixture.order(manifest, seed=8))
    manifest["sources"][0]["weight"], manifest["sources"][0]["mixture_blocks"] = 2.5, int(2.5 * manifest["sources"][0]["blocks"])
    up = mixture.order(manifest, seed=7)
    rows = [tuple(r) for r in up.tolist() if source_of[r[0]] == "arabic-web"]
    seen = {r: rows.count(r) for r in set(rows)}
    assert sorted(set(seen.values())) == [2, 3] and len(rows) == manifest["sources"][0]["mixture_blocks"]


def dealt(world: int, micro: int, accumulation: int, lane: int) -> list[list[list[int]]]:
    """Positions per optimizer step and rank as the Trainer deals them: sequential indices, global batch b
    of `micro` indices to rank b % world, a rank's k-th batch in step k // accumulation."""
    steps = lane // micro
    out = [[[] for _ in range(world)] for _ in range(steps)]
    for b in range(steps * world * accumulation):
        for i in range(b * micro, (b + 1) * micro):
            out[b // world // accumulation][b % world].append(mixture.rank_position(i, world, micro, accumulation, lane))
    return out


@pytest.mark.parametrize("world, micro, accumulation", [(3, 2, 1), (2, 2, 3), (1, 4, 2)])
def test_rank_positions_cover_the_order_once_in_contiguous_shares(world, micro, accumulation):
    total = 50
    lane = mixture.lane_length(total, world, micro, accumulation)
    assert lane * world * accumulation == total // (world * micro * accumulation) * world * micro * accumulation
    steps = dealt(world, micro, accumulation, lane)
    positions = [p for step in steps for rank in step for p in rank]
    assert sorted(positions) == list(range(lane * world * accumulation))  # each block of the epoch once
    share = lane * accumulation
    for rank in range(world):  # rank r's blocks are the contiguous share [r * share, (r + 1) * share)
        mine = sorted(p for step in steps for p in step[rank])
        assert mine == list(range(rank * share, (rank + 1) * share))


@pytest.mark.parametrize("splits", [[(2, 2, 1), (1, 2, 2)], [(4, 2, 1), (2, 2, 2), (1, 2, 4)], [(3, 1, 2), (1, 1, 6), (2, 1, 3)]])
def test_each_step_trains_the_same_blocks_however_processes_and_accumulation_split_the_global_batch(splits):
    total = 97
    per_step = [[sorted(p for rank in step for p in rank)
                 for step in dealt(world, micro, accumulation, mixture.lane_length(total, world, micro, accumulation))]
                for world, micro, accumulation in splits]
    global_batch = splits[0][0] * splits[0][1] * splits[0][2]
    assert len(per_step[0]) == total // global_batch and all(len(step) == global_batch for step in per_step[0])
    assert all(steps == per_step[0] for steps in per_step), per_step


def test_a_rank_reads_each_shard_once_per_epoch_but_where_its_lanes_meet(mixture_run):
    """The cache holds every lane's shuffle window (with 3 shards for a window of 4 a rank refetched
    shards: 10 reads of 4 shards for 50 blocks, seen). A window cut by the border of two of a rank's
    lanes is read at the end of one and the start of the other: its shards are read twice."""
    from dhad_trainer.stages.pretrain import StreamedBlocks
    from dhad_trainer.storage.local import LocalStore

    root, _, _ = mixture_run
    manifest = json.loads((root / "out" / "MANIFEST.json").read_text())
    for world, micro, accumulation in ((2, 2, 1), (1, 2, 2), (2, 1, 3)):
        for rank in range(world):
            data = StreamedBlocks(LocalStore(), str(root / "out"), manifest, rank=rank, world=world, micro_batch=micro,
                                  accumulation=accumulation, seed=7)
            mine = [i for b in range(rank, len(data) // micro, world) for i in range(b * micro, (b + 1) * micro)]
            read = [data[i]["position"] for i in mine]
            data.pool.shutdown(wait=True)
            assert sorted(read) == list(range(rank * len(data) // world, (rank + 1) * len(data) // world))
            again = len(data.fetched) - len(set(data.fetched))
            assert len(set(data.fetched)) >= 3 and again <= mixture.WINDOW * (accumulation - 1), data.fetched
