"""Scoring a suite with a model, by one of two methods that are always labelled in results:

- `generate`: AceGPT-compatible prompts (k-shot from the dev split for base models), greedy decoding,
  at most 10 new tokens for MC and yes/no, the answer parsed from the first non-empty line.
- `loglikelihood`: each choice's log-probability as a continuation of the prompt, divided by the
  continuation's length in characters (lighteval's normalised acc); the best choice is the answer.
  Never unparseable; not comparable with `generate` numbers.
Open-ended suites are always `generate+judge`: answers are generated, then a `Judge` compares each with
the reference system's answer in both orders (see metrics.combine_orders).

The model is reached only through `ModelRunner`, so tests drive a tiny random model and production a
real checkpoint; the judge only through `Judge`, so the HTTP client can be swapped in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from dhad_trainer.evaluation import metrics as M
from dhad_trainer.evaluation.loaders import ACVA, MMLU, OPEN_SUITES, EvalItem
from dhad_trainer.evaluation.parsing import parse_answer
from dhad_trainer.evaluation.prompts import build_prompt, continuations, shots_by_subject

log = logging.getLogger(__name__)

GENERATE, LOGLIKELIHOOD, JUDGED = "generate", "loglikelihood", "generate+judge"
MC_MAX_NEW_TOKENS = 10
METHODS = {
    GENERATE: "AceGPT prompts, greedy decoding (<= 10 new tokens), answer parsed from the first non-empty "
    "line; unparseable answers count as wrong",
    LOGLIKELIHOOD: "choice log-probabilities normalised by continuation characters (lighteval acc_norm); "
    "not comparable with generate",
    JUDGED: "generated answers compared with a reference system's by a judge in both orders",
}


class ModelRunner(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]: ...


class Judge(Protocol):
    def compare(self, question: str, answer_a: str, answer_b: str) -> Literal["A", "B", "tie"] | None: ...


@dataclass
class ItemResult:
    id: str
    subject: str | None
    gold: str | None
    pred: str | None  # parsed label, or the open-ended outcome of the first judge run
    output: str | None = None  # generated text
    scores: dict[str, float] | None = None  # loglikelihood: label -> normalised log-probability
    judged: list[str | None] | None = None  # open-ended: outcome per judge run
    excluded: bool = False  # a member of a duplicate group dropped from the deduplicated figures


@dataclass
class SuiteResult:
    suite: str
    method: str
    k_shot: int
    metrics: dict
    items: list[ItemResult]
    elapsed_s: float
    metrics_dedup: dict | None = None  # the same figures without the excluded duplicates
    notes: list[str] = field(default_factory=list)

    @property
    def headline(self) -> float | None:
        return self.metrics.get("headline")

    @property
    def items_per_s(self) -> float:
        return len(self.items) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _summarise(suite: str, outcomes: list[M.Outcome]) -> dict:
    if suite == ACVA:
        return M.acva_summary(outcomes)
    return M.mmlu_summary(outcomes) if suite == MMLU else M.mc_summary(outcomes)


def _generate_labels(items: Sequence[EvalItem], runner: ModelRunner, prompts: list[str]) -> list[ItemResult]:
    outputs = runner.generate(prompts, MC_MAX_NEW_TOKENS)
    return [
        ItemResult(it.id, it.subject, it.answer, parse_answer(it.suite, out, it.choices), output=out)
        for it, out in zip(items, outputs, strict=True)
    ]


def _loglikelihood_labels(
    items: Sequence[EvalItem], runner: ModelRunner, prompts: list[str], target: str
) -> list[ItemResult]:
    conts = [continuations(it, target) for it in items]
    requests = [(p, c) for p, cs in zip(prompts, conts, strict=True) for c in cs.values()]
    logprobs = iter(runner.loglikelihood(requests))
    results = []
    for it, cs in zip(items, conts, strict=True):
        scores = {label: next(logprobs) / max(len(c), 1) for label, c in cs.items()}
        best = max(scores, key=scores.__getitem__)  # ties: the first label
        results.append(ItemResult(it.id, it.subject, it.answer, best, scores=scores))
    return results


def _safe_compare(judge: Judge, question: str, a: str, b: str) -> str | None:
    try:
        return judge.compare(question, a, b)
    except Exception as e:  # a judge outage marks the pair invalid; it must not lose the run
        log.warning("judge failed: %s", e)
        return None


def _judged(
    items: Sequence[EvalItem],
    runner: ModelRunner,
    judge: Judge | None,
    references: Mapping[str, str] | None,
    max_new_tokens: int,
    runs: int,
    exclude: set[str] | frozenset[str],
) -> tuple[list[ItemResult], dict, dict | None]:
    answers = runner.generate([build_prompt(it) for it in items], max_new_tokens)
    results, flat, kept = [], [], []
    for it, ans in zip(items, answers, strict=True):
        ref = (references or {}).get(it.id)
        outcomes: list[str | None] = []
        for _ in range(runs if judge is not None else 0):
            outcomes.append(
                None
                if ref is None or judge is None
                else M.combine_orders(
                    _safe_compare(judge, it.question, ans, ref), _safe_compare(judge, it.question, ref, ans)
                )
            )
        flat.extend(outcomes)
        kept.extend(outcomes if it.id not in exclude else [])
        results.append(
            ItemResult(
                it.id,
                it.subject,
                None,
                outcomes[0] if outcomes else None,
                output=ans,
                judged=outcomes,
                excluded=it.id in exclude,
            )
        )
    if judge is None:
        return (
            results,
            {
                "headline": None,
                "headline_metric": "win_tie_score",
                "n": len(items),
                "note": "no judge: answers generated only",
            },
            None,
        )
    missing = sum(r.id not in (references or {}) for r in results)
    metrics = {**M.pairwise_summary(flat), "judge_runs": runs, "missing_references": missing}
    return results, metrics, ({**M.pairwise_summary(kept), "judge_runs": runs} if exclude else None)


def score_suite(
    items: Sequence[EvalItem],
    runner: ModelRunner,
    method: str = GENERATE,
    *,
    dev: Sequence[EvalItem] = (),
    k_shot: int = 0,
    continuation: Literal["letter", "text"] = "letter",
    exclude: set[str] | frozenset[str] = frozenset(),
    judge: Judge | None = None,
    references: Mapping[str, str] | None = None,
    max_new_tokens_open: int = 512,
    judge_runs: int = 1,
) -> SuiteResult:
    """Score one suite's items. `exclude` holds duplicate ids left out of `metrics_dedup`."""
    if not items:
        raise ValueError("no items to score")
    suite = items[0].suite
    start = time.perf_counter()
    if suite in OPEN_SUITES:
        results, metrics, dedup = _judged(
            items, runner, judge, references, max_new_tokens_open, judge_runs, exclude
        )
        return SuiteResult(suite, JUDGED, 0, metrics, results, time.perf_counter() - start, dedup)
    if method not in (GENERATE, LOGLIKELIHOOD):
        raise ValueError(f"unknown method {method!r}")
    shots = shots_by_subject(dev, k_shot) if k_shot else {}
    prompts = [build_prompt(it, shots.get(it.subject, ())) for it in items]
    if method == GENERATE:
        results = _generate_labels(items, runner, prompts)
    else:
        results = _loglikelihood_labels(items, runner, prompts, continuation)
    elapsed = time.perf_counter() - start
    meta = {it.id: it for it in items}
    outcomes = [M.Outcome(r.id, r.gold or "", r.pred, r.subject, meta[r.id].category) for r in results]
    for r in results:
        r.excluded = r.id in exclude
    dedup = _summarise(suite, [o for o in outcomes if o.item_id not in exclude]) if exclude else None
    notes = [f"k_shot={k_shot} from the dev split"] if k_shot else []
    if method == LOGLIKELIHOOD:
        notes.append(f"loglikelihood of {continuation} continuations, normalised by characters")
    return SuiteResult(suite, method, k_shot, _summarise(suite, outcomes), results, elapsed, dedup, notes)
