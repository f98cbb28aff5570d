"""The feedback stage: exact stats against a scripted judge server, the cache on rerun, the held-out split,
both judge orders, and a local tiny judge model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from dhad_api.stages import Endpoint
from dhad_trainer.llm.judges import FORCED, OK, REFUSED, UNPARSEABLE, EndpointJudge, endpoint_config
from dhad_trainer.runtime.callbacks import ProgressCallback
from dhad_trainer.runtime.distributed import Cluster
from dhad_trainer.runtime.progress import FileSink, ProgressReporter
from dhad_trainer.stages import feedback
from dhad_trainer.stages.alignment import (
    HELD_OUT,
    TRAIN,
    ShardCache,
    prompt_id,
    read_pairs,
    read_prompts,
    split_of,
)
from tests.support.alignment import distributed_chain, rlaif_spec, stage_run, tiny_lm
from tests.support.openai_server import OpenAIServer, Reply
from tests.unit.test_judge import answers

MARKERS = ["[good] ما عاصمة اليمن؟", "[good] اكتب بيتًا عن الصبر.", "[flip] صف البحر.", "[tie] ما لون الرمل؟",
           "[garbage] عدّد ثلاث فواكه.", "[refuse] من أنت؟"]


def judge_script(body, attempt):
    """good: the shorter answer wins whatever its place; flip: always "A" (pure position bias); tie: tie."""
    text, a, b = answers(body)
    if "[good]" in text:
        return Reply(content=f"الأقصر أوضح.\nالحكم: [[{'A' if (len(a), a) <= (len(b), b) else 'B'}]]")
    if "[flip]" in text:
        return Reply(content="الأولى أفضل. الحكم: [[A]]")
    if "[tie]" in text:
        return Reply(content="متكافئتان. الحكم: [[تعادل]]")
    if "[garbage]" in text:
        return Reply(content="لا تعليق")
    return Reply(content="عذرًا، لا يمكنني الحكم.")


@pytest.fixture(scope="module")
def server():
    with OpenAIServer(api_key=None, script=judge_script) as srv:
        yield srv


@pytest.fixture(scope="module")
def endpoint_run(tmp_path_factory, server):
    root = tmp_path_factory.mktemp("feedback")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in MARKERS), encoding="utf-8")
    spec = rlaif_spec(feedback={
        "prompts": [{"uri": str(prompts), "schema": "prompt-completion"}], "heldOutFraction": 0.5,
        "judge": {"endpoint": {"baseUrl": server.base_url, "model": "judge", "maxRetries": 0}, "maxAttempts": 2}})
    progress = ProgressReporter(FileSink(root / "progress.jsonl"), "feedback", interval=0)
    run = stage_run(spec, "feedback", root, tiny_lm(), callbacks=[SaveRecorder(), ProgressCallback(progress, Cluster())])
    first = feedback.run(run)
    requests_after_first = len(server.bodies)
    second = feedback.run(run)
    progress.close()
    return run, first.metrics, second.metrics, requests_after_first, len(server.bodies)


class SaveRecorder(TrainerCallback):
    """The runtime's checkpoint callback, reduced to remembering which checkpoint folders it was given."""

    def __init__(self) -> None:
        self.saved: list[str] = []

    def on_save(self, args, state, control, **kwargs):
        self.saved.append(f"checkpoint-{state.global_step}")
        assert (Path(args.output_dir) / self.saved[-1] / "cache").is_dir()


EXPECTED = {"prompts": 6, "samples": 18, "pairs": 12, "identical": 0, "judgements": 24, "verdicts": 16,
            "unparseable": 4, "refused": 4, "errors": 0, "forced": 0, "skipped": 4, "forced_pairs": 0,
            "pairs_judged": 8, "agreed": 4, "disagreed": 2, "ties": 2, "agreement_rate": 0.75}


def assert_counts_add_up(stats):
    """Every judgement has one outcome and every pair of distinct responses one fate."""
    assert stats["judgements"] == (stats["verdicts"] + stats["forced"] + stats["unparseable"] + stats["refused"]
                                   + stats["errors"])
    assert stats["pairs"] == stats["identical"] + stats["pairs_judged"] + stats["forced_pairs"] + stats["skipped"]
    assert stats["pairs_judged"] == stats["agreed"] + stats["disagreed"] + stats["ties"]
    assert sum(stats["judgements_by_outcome"].values()) == stats["judgements"]


def test_stats_count_every_outcome_exactly(endpoint_run):
    _, stats, _, requests, _ = endpoint_run
    assert {k: stats[k] for k in EXPECTED} == EXPECTED
    assert_counts_add_up(stats)
    assert stats["judgements_by_outcome"] == {"agreed": 8, "disagreed": 4, "tie": 4, "unparseable": 4, "refused": 4}
    # 2 calls per judged order for good/flip/tie pairs; garbage and refusals are asked twice (maxAttempts)
    assert stats["judge_calls"] == requests == 8 + 4 + 4 + 8 + 8
    assert stats["cached_hits"] == 0


def test_judgement_counts_reach_progress(endpoint_run):
    run = endpoint_run[0]
    reports = [json.loads(line) for line in (run.work_dir.parent / "progress.jsonl").read_text().splitlines()]
    figures = reports[-1]["figures"]
    assert {k: figures[k] for k in ("judgements", "verdicts", "forcedVerdicts", "unparseable", "refused", "agreementRate")} \
        == {"judgements": 24, "verdicts": 16, "forcedVerdicts": 0, "unparseable": 4, "refused": 4, "agreementRate": 0.75}


def test_rerun_reuses_cached_samples_and_judgements(endpoint_run):
    run, first, second, requests, requests_after_rerun = endpoint_run
    assert requests_after_rerun == requests  # not one request more
    assert second["judge_calls"] == 0 and second["cached_hits"] == 24
    assert {k: second[k] for k in EXPECTED} == {k: first[k] for k in EXPECTED}
    on_disk = json.loads((run.output_dir / "stats.json").read_text())
    assert on_disk["cached_hits"] == 24


def test_restart_on_a_fresh_machine_resumes_from_the_checkpointed_cache(endpoint_run, server, tmp_path):
    run, first, _, _, _ = endpoint_run
    # first run: after sampling, after the one judging round; the rerun had nothing left to judge
    assert run.callbacks[0].saved == ["checkpoint-1", "checkpoint-2", "checkpoint-1"]
    before = len(server.bodies)
    recorder = SaveRecorder()
    fresh = stage_run(run.spec, "feedback", tmp_path, tiny_lm(), callbacks=[recorder],
                      resume_from=run.trainer_dir / "checkpoint-2")  # as the runtime restores it
    again = feedback.run(fresh).metrics
    assert len(server.bodies) == before and again["cached_hits"] == 24 and again["judge_calls"] == 0
    assert {k: again[k] for k in EXPECTED} == {k: first[k] for k in EXPECTED}
    assert recorder.saved == ["checkpoint-3"]  # numbering goes on from the restored step
    assert read_pairs(fresh.output_dir, TRAIN) == read_pairs(run.output_dir, TRAIN)


def test_pairs_keep_the_consistent_winner_with_both_rationales(endpoint_run):
    run, stats, _, _, _ = endpoint_run
    pairs = read_pairs(run.output_dir, TRAIN) + read_pairs(run.output_dir, HELD_OUT)
    assert len(pairs) == stats["agreed"] == stats["train_pairs"] + stats["heldout_pairs"]
    for pair in pairs:
        assert pair["prompt"][0]["content"].startswith("[good]")
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert (len(chosen), chosen) < (len(rejected), rejected)
        assert len(pair["rationale"]) == 2 and all("الحكم" in r for r in pair["rationale"])
        assert pair["split"] == split_of(pair["prompt_id"], 0.5)


def test_prompts_are_split_by_hash_and_listed_for_the_policy(endpoint_run):
    run, stats, _, _, _ = endpoint_run
    train, held = read_prompts(run.output_dir, TRAIN), read_prompts(run.output_dir, HELD_OUT)
    assert len(train) == stats["train_prompts"] and len(held) == stats["heldout_prompts"]
    assert len(train) + len(held) == 6 and train and held
    assert all(split_of(prompt_id(p), 0.5) == TRAIN for p in train)
    assert not {prompt_id(p) for p in train} & {prompt_id(p) for p in held}


@pytest.mark.torchrun
def test_local_tiny_judge_model_over_two_ranks():
    main, other = distributed_chain()["feedback"]  # the 2-process SFT model samples, the tiny LM judges
    stats = main["metrics"]
    assert other["metrics"] == {}  # rank 1 hands its share to rank 0, which merges and writes
    assert stats["prompts"] == 4 and stats["pairs"] == 12  # both ranks' shares, 3 pairs per prompt
    assert stats["judgements"] == 2 * (12 - stats["identical"])
    assert stats["forced"] == stats["judgements"] == stats["judge_calls"]  # the tiny model never writes [[A]]
    assert stats["forced_pairs"] == 12 - stats["identical"] and stats["pairs_judged"] == stats["verdicts"] == 0
    assert stats["agreement_rate"] is None and stats["forced_share"] == 1.0  # forced verdicts prove no agreement
    assert stats["train_pairs"] == stats["heldout_pairs"] == stats["forced_pairs_kept"] == 0  # useForcedVerdicts off
    assert stats["unparseable"] == stats["refused"] == stats["skipped"] == 0
    assert_counts_add_up(stats)
    cache = Path(main["output_dir"]) / "cache"
    assert {p.name.split("-")[1] for p in cache.glob("judgements-*.jsonl")} == {"r000", "r001"}  # per-rank shards


def test_a_model_judge_needs_a_local_folder(tmp_path):
    spec = rlaif_spec()
    spec.feedback.judge.model.uri = "s3://bucket/judge"
    with pytest.raises(ValueError, match=r"run.inputs\['judge'\]"):
        feedback.make_judge(stage_run(spec, "feedback", tmp_path, tiny_lm()), spec.feedback)


def test_greedy_sampling_is_refused_before_any_work(tmp_path):
    spec = rlaif_spec(feedback={"generation": {"temperature": 0}})
    with pytest.raises(ValueError, match="feedback.generation.temperature"):
        feedback.run(stage_run(spec, "feedback", tmp_path, tiny_lm()))


def planted(status: str, verdict: str | None) -> dict:
    """A judgement as the judge cache stores it (dataclasses.asdict of a Judgement)."""
    return {"verdict": verdict, "status": status, "rationale": f"{status} {verdict}", "requests": 1,
            "forced": status == FORCED}


# (first order, second order) per pair; the second order shows the pair's second response as A.
PLANTED = {
    "both-forced": (planted(FORCED, "A"), planted(FORCED, "B")),  # likelihood: the same response both times
    "forced-and-own": (planted(OK, "A"), planted(FORCED, "B")),
    "own-agreed": (planted(OK, "B"), planted(OK, "A")),
    "own-disagreed": (planted(OK, "A"), planted(OK, "A")),
    "own-tie": (planted(OK, "tie"), planted(OK, "tie")),
    "own-beside-unparseable": (planted(OK, "A"), planted(UNPARSEABLE, None)),
    "forced-beside-refused": (planted(FORCED, "A"), planted(REFUSED, None)),
}


@pytest.mark.parametrize("use_forced", [False, True])
def test_forced_verdicts_are_counted_apart_and_become_pairs_only_when_asked(server, tmp_path, use_forced):
    judge = EndpointJudge(endpoint_config(Endpoint(base_url=server.base_url, model="judge", max_retries=0)),
                          constitution=None, language="ar", max_new_tokens=8, max_attempts=1)
    entries = [{"id": name, "prompt": [{"role": "user", "content": name}], "split": TRAIN} for name in PLANTED]
    entries.append({"id": "asked", "prompt": [{"role": "user", "content": "[refuse] س"}], "split": TRAIN})
    samples = {e["id"]: [f"{e['id']} أولى", f"{e['id']} ثانية"] for e in entries}
    cache = ShardCache(tmp_path / "cache", "judgements")
    for e in entries[:-1]:
        question, (a, b) = e["prompt"][0]["content"], samples[e["id"]]
        first, second = PLANTED[e["id"]]
        cache.put_many({judge.cache_key(question, a, b): first, judge.cache_key(question, b, a): second})
    spec = rlaif_spec(feedback={"useForcedVerdicts": use_forced, "pairs": "adjacent"})
    before = len(server.bodies)
    records, stats = feedback.judge_pairs(judge, spec.feedback, entries, samples, cache)
    assert len(server.bodies) - before == 2  # only the uncached pair was asked (and refused, in both orders)
    metrics = feedback.write_outputs(stage_run(spec, "feedback", tmp_path, tiny_lm()), entries, [(records, stats)], [])
    expected = {"judgements": 16, "verdicts": 8, "forced": 4, "unparseable": 1, "refused": 3, "errors": 0,
                "pairs": 8, "pairs_judged": 3, "agreed": 1, "disagreed": 1, "ties": 1, "forced_pairs": 2,
                "forced_pairs_kept": 2 if use_forced else 0, "skipped": 3, "agreement_rate": 2 / 3}
    assert {k: metrics[k] for k in expected} == expected  # forced pairs are not in the agreement rate
    assert_counts_add_up(metrics)
    assert metrics["judgements_by_outcome"] == {"agreed": 2, "disagreed": 2, "tie": 2, "forced": 4,
                                                "verdict_beside_forced": 1, "verdict_beside_failure": 1,
                                                "unparseable": 1, "refused": 3}
    kept = {r["prompt_id"]: (r["chosen"][0]["content"], r["forced"]) for r in records}
    assert kept == {"own-agreed": ("own-agreed ثانية", False),
                    **({"both-forced": ("both-forced أولى", True), "forced-and-own": ("forced-and-own أولى", True)}
                       if use_forced else {})}
    assert metrics["train_pairs"] == len(kept) == len(read_pairs(tmp_path / "out", TRAIN))
