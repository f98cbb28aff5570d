"""RLAIF feedback: sample k responses per prompt from the policy, have a judge compare pairs under a
constitution, keep the pairs it prefers consistently.

Each pair is judged in both orders (A/B swapped) to control position bias: only pairs whose two
verdicts name the same winner are kept; the order-swap agreement rate is reported. A local judge's
forced (likelihood) verdicts are counted apart, never enter the agreement rate (they agree in both
orders by construction) and make pairs only when feedback.useForcedVerdicts asks. Every judgement has
exactly one outcome and the counts add up (see `judge_pairs`). Prompts are split
into train and held-out by a hash of the prompt. Samples and judgements go to append-only shard caches
in output_dir/cache, keyed by a hash of their inputs. The cache is checkpointed like a Trainer's state
(after sampling, then every checkpoint.intervalSteps rounds of JUDGE_BATCH judgements per rank) and
restored from run.resume_from, so a restarted stage pays neither again. Ranks take every
world_size-th prompt; rank 0 merges and writes the pairs (jsonl shards), the prompt lists and
stats.json; output_dir is the stage's result, which the runtime uploads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from itertools import combinations
from types import SimpleNamespace

from dhad_api.stages import Feedback, PairSelection
from dhad_trainer.data.conversations import load_prompts
from dhad_trainer.llm.judges import (
    ERROR,
    FORCED,
    OK,
    REFUSED,
    UNPARSEABLE,
    EndpointJudge,
    ModelJudge,
    endpoint_config,
    render_question,
    status_of,
)
from dhad_trainer.stages.alignment import (
    CACHE_DIR,
    HELD_OUT,
    INPUT_JUDGE,
    PAIRS_DIR,
    PROMPTS_DIR,
    STATS_FILE,
    TRAIN,
    FolderCheckpoints,
    ShardCache,
    barrier,
    gather_to_main,
    prompt_id,
    split_of,
    write_jsonl,
    write_shards,
)
from dhad_trainer.stages.base import StageResult, StageRun

log = logging.getLogger("dhad.feedback")
SAMPLE_BATCH = 8  # prompts per generate() call
JUDGE_BATCH = 64  # judgements per round (one cache shard); a checkpoint "step" is one round
COUNTS = ("prompts", "samples", "pairs", "identical", "judgements", "judge_calls", "cached_hits", "verdicts", "forced",
          "unparseable", "refused", "errors", "pairs_judged", "agreed", "disagreed", "ties", "forced_pairs",
          "forced_pairs_kept", "skipped")
OUTCOME = "outcome/"  # judgement-unit counters, merged over ranks like the others
JUDGEMENT_COUNTER = {OK: "verdicts", FORCED: "forced", UNPARSEABLE: "unparseable", REFUSED: "refused", ERROR: "errors"}


def run(run: StageRun) -> StageResult:
    fb: Feedback = run.spec.feedback
    if fb.generation.temperature == 0:
        raise ValueError("feedback.generation.temperature is 0: greedy decoding gives k identical responses; use > 0")
    prompts, prompt_counts = load_prompts(fb.prompts, run.data_store)
    entries = sorted(({"id": prompt_id(p), "prompt": p} for p in prompts), key=lambda e: e["id"])
    for e in entries:
        e["split"] = split_of(e["id"], fb.held_out_fraction)
    mine = entries[run.rank::run.world_size]
    cache_dir = run.output_dir / CACHE_DIR
    checkpoints = FolderCheckpoints(run, cache_dir)  # restores the cache of a previous attempt
    samples = sample_responses(run, fb, mine, ShardCache(cache_dir, "samples", run.rank))
    checkpoints.save()
    judge = make_judge(run, fb)
    every = run.spec.checkpoint.interval_steps

    def after_round(done: int) -> None:
        if done % every == 0:
            checkpoints.save()

    records, stats = judge_pairs(judge, fb, mine, samples, ShardCache(cache_dir, "judgements", run.rank),
                                 rounds=lambda n: agreed_max(run, n), after_round=after_round)
    gathered = gather_to_main(run, (records, stats))
    metrics: dict = {}
    if run.is_main:
        metrics = write_outputs(run, entries, gathered, prompt_counts)
        report_figures(run, checkpoints.step, metrics)
    barrier(run)
    return StageResult(metrics=metrics, model_dir=run.output_dir)  # the runtime uploads it: pairs for the next stages


def report_figures(run: StageRun, step: int, metrics: dict) -> None:
    """The judgement counts to the runtime's callbacks as a Trainer's on_log sends logs: progress shows them."""
    from transformers import TrainerControl, TrainerState

    args = SimpleNamespace(output_dir=str(run.trainer_dir), should_save=run.is_main)
    for callback in run.callbacks:
        callback.on_log(args, TrainerState(global_step=step), TrainerControl(), logs=dict(metrics))


def agreed_max(run: StageRun, n: int) -> int:
    """The largest n over ranks, so every rank runs as many rounds (and checkpoints) as the busiest."""
    import torch
    import torch.distributed as dist

    if run.world_size == 1 or not dist.is_initialized():
        return n
    value = torch.tensor([n], device="cpu" if run.use_cpu else f"cuda:{run.local_rank}")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def sample_responses(run: StageRun, fb: Feedback, entries: list[dict], cache: ShardCache) -> dict[str, list[str]]:
    """k sampled responses per prompt, from the cache when this prompt and setting were sampled before."""
    gen, k = fb.generation, fb.samples_per_prompt
    keys = {e["id"]: _key(e["id"], k, gen.max_new_tokens, gen.temperature, gen.top_p) for e in entries}
    missing = [e for e in entries if cache.get(keys[e["id"]]) is None]
    if missing:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(run.model_dir, padding_side="left")
        tok.pad_token = tok.pad_token or tok.eos_token
        model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=torch.float32 if run.use_cpu else "auto")
        model.to("cpu" if run.use_cpu else f"cuda:{run.local_rank}").eval()
        seed = run.spec.policy.training.seed
        for start in range(0, len(missing), SAMPLE_BATCH):
            batch = missing[start:start + SAMPLE_BATCH]
            torch.manual_seed(seed + int(batch[0]["id"][:8], 16))  # same batch, same samples after a restart
            enc = tok.apply_chat_template([e["prompt"] for e in batch], add_generation_prompt=True, padding=True,
                                          return_dict=True, return_tensors="pt").to(model.device)
            with torch.no_grad():
                out = model.generate(**enc, do_sample=True, temperature=gen.temperature, top_p=gen.top_p,
                                     max_new_tokens=gen.max_new_tokens, num_return_sequences=k,
                                     pad_token_id=tok.pad_token_id)
            texts = [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
            cache.put_many({keys[e["id"]]: texts[i * k:(i + 1) * k] for i, e in enumerate(batch)})
        del model
        if not run.use_cpu:
            torch.cuda.empty_cache()  # room for a local judge model
    return {e["id"]: cache.get(keys[e["id"]]) for e in entries}


def pair_indices(k: int, how: PairSelection) -> list[tuple[int, int]]:
    if how is PairSelection.ALL_PAIRS:
        return list(combinations(range(k), 2))
    if how is PairSelection.FIRST_VERSUS_REST:
        return [(0, j) for j in range(1, k)]
    return [(i, i + 1) for i in range(k - 1)]


def make_judge(run: StageRun, fb: Feedback):
    """The endpoint judge (key from DHAD_JUDGE_API_KEY, rate limits split over ranks) or a local model judge."""
    j = fb.judge
    common = dict(constitution=fb.constitution, language=fb.language, max_new_tokens=j.max_new_tokens,
                  max_attempts=j.max_attempts)
    if j.endpoint is not None:
        config = endpoint_config(j.endpoint)
        for name in ("requests_per_minute", "tokens_per_minute"):
            if getattr(config, name):
                setattr(config, name, getattr(config, name) / run.world_size)
        return EndpointJudge(config, **common)
    path = run.inputs.get(INPUT_JUDGE)
    if path is None and j.model.uri and j.model.uri.startswith("/"):
        path = j.model.uri
    if path is None:
        raise ValueError("feedback.judge.model must be resolved to a local folder in run.inputs['judge']")
    return ModelJudge(path, device="cpu" if run.use_cpu else f"cuda:{run.local_rank}", **common)


def judge_pairs(judge, fb: Feedback, entries: list[dict], samples: dict, cache: ShardCache,
                rounds=lambda n: n, after_round=lambda done: None) -> tuple[list[dict], Counter]:
    """Judge every selected pair in both orders, JUDGE_BATCH judgements a round (a checkpoint "step"),
    cached as it goes; keep the pairs whose two verdicts name the same winner.

    Each judgement is one of verdicts (the judge's own), forced, unparseable, refused or errors, so
    judgements = verdicts + forced + unparseable + refused + errors. Each pair of distinct responses is one
    of pairs_judged (two own verdicts: agreed, disagreed or ties), forced_pairs (every judgement decided, at
    least one forced) or skipped, so pairs = identical + pairs_judged + forced_pairs + skipped.
    `judgements_by_outcome` restates where every judgement went, in judgement units, with the same total."""
    stats = Counter(prompts=len(entries), samples=sum(len(samples[e["id"]]) for e in entries))
    jobs = []
    for e in entries:
        responses = samples[e["id"]]
        for i, j in pair_indices(len(responses), fb.pairs):
            stats["pairs"] += 1
            if responses[i] == responses[j]:
                stats["identical"] += 1
            else:
                jobs.append((e, responses[i], responses[j]))
    items = [it for e, a, b in jobs for it in ((render_question(e["prompt"]), a, b), (render_question(e["prompt"]), b, a))]
    keys = [judge.cache_key(*it) for it in items]
    todo = [n for n, key in enumerate(keys) if cache.get(key) is None]
    stats["judgements"], stats["cached_hits"] = len(items), len(items) - len(todo)
    uncached = {}
    for r in range(rounds(-(-len(todo) // JUDGE_BATCH))):
        chunk = todo[r * JUDGE_BATCH:(r + 1) * JUDGE_BATCH]
        results = judge.judge_many([items[n] for n in chunk]) if chunk else []
        stats["judge_calls"] += sum(x.requests for x in results)
        done = {n: dataclasses.asdict(x) for n, x in zip(chunk, results, strict=True)}
        uncached.update({n: d for n, d in done.items() if d["status"] == ERROR})  # worth asking again next time
        cache.put_many({keys[n]: d for n, d in done.items() if d["status"] != ERROR})
        after_round(r + 1)
    judged = [uncached.get(n) or cache.get(key) for n, key in enumerate(keys)]
    outcomes = Counter()
    records = []
    for m, (e, a, b) in enumerate(jobs):
        first, second = judged[2 * m], judged[2 * m + 1]
        statuses = (status_of(first), status_of(second))
        for status in statuses:
            stats[JUDGEMENT_COUNTER[status]] += 1
        win_first = {"A": a, "B": b}.get(first["verdict"])
        win_second = {"A": b, "B": a}.get(second["verdict"])  # second order shows b as A
        consistent = win_first is not None and win_first == win_second
        if statuses == (OK, OK):
            stats["pairs_judged"] += 1
            outcome = "tie" if win_first is None and win_second is None else "agreed" if consistent else "disagreed"
            stats[{"tie": "ties", "agreed": "agreed", "disagreed": "disagreed"}[outcome]] += 1
            outcomes[outcome] += 2
            keep = outcome == "agreed"
        elif set(statuses) <= {OK, FORCED}:
            stats["forced_pairs"] += 1
            keep = consistent and fb.use_forced_verdicts
            stats["forced_pairs_kept"] += keep
            outcomes["forced"] += statuses.count(FORCED)
            outcomes["verdict_beside_forced"] += statuses.count(OK)
        else:
            stats["skipped"] += 1
            keep = False
            for status in statuses:
                outcomes[status if status != OK else "verdict_beside_failure"] += 1
        if keep:
            loser = b if win_first == a else a
            records.append({"prompt_id": e["id"], "split": e["split"], "prompt": e["prompt"],
                            "chosen": [{"role": "assistant", "content": win_first}],
                            "rejected": [{"role": "assistant", "content": loser}],
                            "rationale": [first["rationale"], second["rationale"]], "judge": judge.identity,
                            "forced": FORCED in statuses})
    stats.update({OUTCOME + name: n for name, n in outcomes.items()})
    return records, stats


def write_outputs(run: StageRun, entries: list[dict], gathered: list, prompt_counts: list[dict]) -> dict:
    records = sorted((r for recs, _ in gathered for r in recs), key=lambda r: (r["prompt_id"], r["chosen"][0]["content"]))
    total = Counter()
    for _, stats in gathered:
        total.update(stats)
    out = run.output_dir
    for split in (TRAIN, HELD_OUT):
        write_shards(out / PAIRS_DIR, split, [r for r in records if r["split"] == split])
        write_jsonl(out / PROMPTS_DIR / f"{split}.jsonl",
                    ({"prompt_id": e["id"], "prompt": e["prompt"]} for e in entries if e["split"] == split))
    metrics = {name: total[name] for name in COUNTS}
    metrics["judgements_by_outcome"] = {k[len(OUTCOME):]: v for k, v in sorted(total.items()) if k.startswith(OUTCOME)}
    # the judge's own verdicts only: forced ones agree with themselves in both orders by construction
    metrics["agreement_rate"] = ((total["agreed"] + total["ties"]) / total["pairs_judged"]) if total["pairs_judged"] else None
    metrics["forced_share"] = total["forced"] / total["judgements"] if total["judgements"] else None
    metrics["train_pairs"] = sum(r["split"] == TRAIN for r in records)
    metrics["heldout_pairs"] = sum(r["split"] == HELD_OUT for r in records)
    metrics["train_prompts"] = sum(e["split"] == TRAIN for e in entries)
    metrics["heldout_prompts"] = len(entries) - metrics["train_prompts"]
    for side in ("chosen", "rejected"):  # response length per side: the judge's length bias, in TensorBoard
        lengths = [len(r[side][0]["content"]) for r in records]
        metrics[f"{side}_length_chars"] = sum(lengths) / len(lengths) if lengths else None
    metrics["prompt_sources"] = prompt_counts
    (out / STATS_FILE).write_text(json.dumps(metrics, ensure_ascii=False, indent=2), encoding="utf-8")
    log.info("feedback: %s", {k: v for k, v in metrics.items() if k != "prompt_sources"})
    if total["forced"]:
        log.warning("feedback: %d of %d judgements are forced likelihood verdicts, not the judge's answers (it wrote no "
                    "verdict); they are left out of the agreement rate and %s", total["forced"], total["judgements"],
                    "kept as pairs (feedback.useForcedVerdicts)" if run.spec.feedback.use_forced_verdicts
                    else "of the pairs (feedback.useForcedVerdicts is false)")
    return metrics
