"""Scoring a suite with a model, by methods that are always labelled in results:

- `generate`: AceGPT-compatible prompts (k-shot from the dev split for base models), greedy decoding,
  at most 10 new tokens for MC and yes/no, the answer parsed from the first non-empty line (hedges
  and leftover letters are unparseable, with their reason: see parsing).
- `loglikelihood`: each choice's log-probability as a continuation of the prompt, divided by the
  continuation's length in characters (lighteval's normalised acc); the best choice is the answer.
  Never unparseable; not comparable with `generate` numbers.
Open-ended suites are answered once, then judged by either or both of:
- `judge-scores` (AceGPT's figure): the scoring judge gives both answers 1-10 in one prompt, in both
  positions, `runs` times; the ratio of the model's summed scores to the reference's (metrics.ratio_summary).
- `judge-pairwise`: RLAIF's judge prefers one answer, in both orders (metrics.combine_orders).

The model is reached only through `ModelRunner`, so tests drive a tiny random model and production a
real checkpoint; the judges only through their protocols, so the HTTP client can be swapped in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from dhad_trainer.evaluation import metrics as M
from dhad_trainer.evaluation.judging import ScoreJudge, pairwise_verdicts, prompt_text
from dhad_trainer.evaluation.loaders import ACVA, MMLU, OPEN_SUITES, EvalItem
from dhad_trainer.evaluation.parsing import OK, parse_detail
from dhad_trainer.evaluation.prompts import build_prompt, continuations, shots_by_subject

log = logging.getLogger(__name__)

GENERATE, LOGLIKELIHOOD = "generate", "loglikelihood"
SCORES, PAIRWISE = "judge-scores", "judge-pairwise"
JUDGED = PAIRWISE  # the one judged method before AceGPT's figure existed
OPEN_METHODS = (SCORES, PAIRWISE)
MC_MAX_NEW_TOKENS = 10
METHODS = {
    GENERATE: "AceGPT prompts, greedy decoding (<= 10 new tokens), answer parsed from the first non-empty "
    "line; unparseable answers (hedges included) count as wrong",
    LOGLIKELIHOOD: "choice log-probabilities normalised by continuation characters (lighteval acc_norm); "
    "not comparable with generate",
    SCORES: "AceGPT's figure: the judge scores the model's and the reference's answers 1-10 in one prompt, in "
    "both positions; per run the ratio of summed scores; mean over runs",
    PAIRWISE: "the judge prefers one of the two answers, in both orders; (wins + ties/2) / pairs, 0.5 = parity",
}


class ModelRunner(Protocol):
    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]: ...

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]: ...


class Judge(Protocol):
    """A pairwise judge; `judge_many` (RLAIF's judges) is used when present, for concurrency."""

    def compare(self, question: str, answer_a: str, answer_b: str) -> Literal["A", "B", "tie"] | None: ...


@dataclass
class ItemResult:
    id: str
    subject: str | None
    gold: str | None
    pred: str | None  # parsed label, or the pairwise outcome of the first judge run
    output: str | None = None  # generated text
    scores: dict[str, float] | None = None  # loglikelihood: label -> normalised log-probability
    judged: list[Any] | None = None  # open-ended: pairwise outcome per run, or the scoring judgements
    excluded: bool = False  # a member of a duplicate group dropped from the deduplicated figures
    reason: str | None = None  # why pred is None: hedged, leftover, abstained, no_answer


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
    def flag(self) -> str | None:
        """Why this figure must not be headlined (mostly forced / inconsistent / unparseable verdicts)."""
        return self.metrics.get("flag")

    @property
    def items_per_s(self) -> float:
        return len(self.items) / self.elapsed_s if self.elapsed_s > 0 else 0.0


def _summarise(suite: str, outcomes: list[M.Outcome]) -> dict:
    if suite == ACVA:
        return M.acva_summary(outcomes)
    return M.mmlu_summary(outcomes) if suite == MMLU else M.mc_summary(outcomes)


def _generate_labels(items: Sequence[EvalItem], runner: ModelRunner, prompts: list[str]) -> list[ItemResult]:
    outputs = runner.generate(prompts, MC_MAX_NEW_TOKENS)
    results = []
    for it, out in zip(items, outputs, strict=True):
        label, reason = parse_detail(it.suite, out, it.choices)
        results.append(ItemResult(it.id, it.subject, it.answer, label, output=out,
                                  reason=None if reason == OK else reason))
    return results


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


def open_answers(items: Sequence[EvalItem], runner: ModelRunner, max_new_tokens: int) -> list[str]:
    """The model's answers to open-ended questions, asked as they are."""
    return runner.generate([build_prompt(it) for it in items], max_new_tokens)


def _open_pairs(items, answers, references) -> list[tuple[str, str, str, str]]:
    refs = references or {}
    return [(it.id, it.question, a, refs[it.id]) for it, a in zip(items, answers, strict=True) if it.id in refs]


def judge_pairwise(
    items: Sequence[EvalItem],
    answers: Sequence[str],
    judge: Judge,
    references: Mapping[str, str] | None,
    *,
    runs: int = 1,
    exclude: set[str] | frozenset[str] = frozenset(),
    seed: int = 0,
) -> SuiteResult:
    """The pairwise figure for answers already generated (see module docstring)."""
    start = time.perf_counter()
    verdicts = pairwise_verdicts(judge, _open_pairs(items, answers, references), runs)
    by_item: dict[str, list[M.PairVerdicts]] = {}
    for v in verdicts:
        by_item.setdefault(v.item_id, []).append(v)
    results = []
    for it, ans in zip(items, answers, strict=True):
        mine = by_item.get(it.id, [])
        outcomes = [v.outcome for v in mine]
        results.append(ItemResult(it.id, it.subject, None, outcomes[0] if outcomes else None, output=ans,
                                  judged=[{"outcome": v.outcome, "first": v.first, "second": v.second,
                                           "forced": v.forced, "run": v.run} for v in mine],
                                  excluded=it.id in exclude))
    missing = sum(it.id not in (references or {}) for it in items)
    metrics = {**M.pairwise_summary(verdicts, seed), "judge_runs": runs, "missing_references": missing}
    dedup = None
    if exclude:
        dedup = {**M.pairwise_summary([v for v in verdicts if v.item_id not in exclude], seed), "judge_runs": runs}
    return SuiteResult(items[0].suite, PAIRWISE, 0, metrics, results, time.perf_counter() - start, dedup)


def judge_scores(
    items: Sequence[EvalItem],
    answers: Sequence[str],
    judge: ScoreJudge,
    references: Mapping[str, str] | None,
    *,
    runs: int = 3,
    exclude: set[str] | frozenset[str] = frozenset(),
    seed: int = 0,
) -> SuiteResult:
    """AceGPT's figure for answers already generated: every (question, position, run) in one call per run."""
    start = time.perf_counter()
    pairs = _open_pairs(items, answers, references)
    judgements: list[M.ScorePair] = []
    raw: dict[str, list[dict]] = {}
    for run in range(runs):
        asks = [(q, a, r) if first else (q, r, a) for _, q, a, r in pairs for first in (True, False)]
        got = judge.score_many(asks, run, sample=run > 0)  # the first run greedy, later runs sampled
        for k, scored in enumerate(got):
            item_id, first = pairs[k // 2][0], k % 2 == 0
            s = scored.scores
            model, reference = (None, None) if s is None else ((s[0], s[1]) if first else (s[1], s[0]))
            judgements.append(M.ScorePair(item_id, run, first, model, reference, scored.status))
            raw.setdefault(item_id, []).append({"run": run, "model_first": first, "model": model,
                                                "reference": reference, "status": scored.status,
                                                "attempts": scored.attempts, "text": scored.text[:500]})
    results = [
        ItemResult(it.id, it.subject, None, None, output=ans, judged=raw.get(it.id, []), excluded=it.id in exclude)
        for it, ans in zip(items, answers, strict=True)
    ]
    missing = sum(it.id not in (references or {}) for it in items)
    metrics = {**M.ratio_summary(judgements, runs, seed), "missing_references": missing,
               "judge": getattr(judge, "identity", type(judge).__name__), "prompt": prompt_text()}
    dedup = None
    if exclude:
        dedup = M.ratio_summary([j for j in judgements if j.item_id not in exclude], runs, seed)
    notes = [f"{runs} run(s): the first greedy, the others and every retry sampled at temperature 0.7"]
    return SuiteResult(items[0].suite, SCORES, 0, metrics, results, time.perf_counter() - start, dedup, notes)


def _unjudged(items: Sequence[EvalItem], answers: Sequence[str], method: str) -> SuiteResult:
    results = [ItemResult(it.id, it.subject, None, None, output=a) for it, a in zip(items, answers, strict=True)]
    metrics = {"headline": None, "headline_metric": method, "n": len(items), "note": "no judge: answers generated only"}
    return SuiteResult(items[0].suite, method, 0, metrics, results, 0.0)


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
    """Score one suite's items. `exclude` holds duplicate ids left out of `metrics_dedup`. An open-ended
    suite gets the pairwise figure here; `run_eval` also gives it AceGPT's (`judge_scores`)."""
    if not items:
        raise ValueError("no items to score")
    suite = items[0].suite
    start = time.perf_counter()
    if suite in OPEN_SUITES:
        answers = open_answers(items, runner, max_new_tokens_open)
        if judge is None:
            return _unjudged(items, answers, PAIRWISE)
        result = judge_pairwise(items, answers, judge, references, runs=judge_runs, exclude=exclude)
        result.elapsed_s = time.perf_counter() - start
        return result
    if method not in (GENERATE, LOGLIKELIHOOD):
        raise ValueError(f"unknown method {method!r}")
    shots = shots_by_subject(dev, k_shot) if k_shot else {}
    prompts = [build_prompt(it, shots.get(it.subject, ())) for it in items]
    if method == GENERATE:
        results = _generate_labels(items, runner, prompts)
    else:
        results = _loglikelihood_labels(items, runner, prompts, continuation)
    return summarise_labels(items, results, method, k_shot, time.perf_counter() - start, exclude, continuation)


def summarise_labels(
    items: Sequence[EvalItem],
    results: list[ItemResult],
    method: str,
    k_shot: int,
    elapsed: float,
    exclude: set[str] | frozenset[str] = frozenset(),
    continuation: str = "letter",
) -> SuiteResult:
    """A SuiteResult from per-item labels (shared by scoring and `dhad eval score`)."""
    suite = items[0].suite
    meta = {it.id: it for it in items}
    outcomes = [M.Outcome(r.id, r.gold or "", r.pred, r.subject, meta[r.id].category, r.reason) for r in results]
    for r in results:
        r.excluded = r.id in exclude
    dedup = _summarise(suite, [o for o in outcomes if o.item_id not in exclude]) if exclude else None
    notes = [f"k_shot={k_shot} from the dev split"] if k_shot else []
    if method == LOGLIKELIHOOD:
        notes.append(f"loglikelihood of {continuation} continuations, normalised by characters")
    return SuiteResult(suite, method, k_shot, _summarise(suite, outcomes), results, elapsed, dedup, notes)
