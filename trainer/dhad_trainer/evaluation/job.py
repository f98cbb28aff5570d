"""One evaluation run end to end, the body of an EvalJob / `dhad eval`: load and sample the suites, find
duplicates, score every model with each method, judge open-ended answers, write the report, return the
headline scores for the job status.

Defaults follow AceGPT: base models get 5-shot MC prompts from the dev split, chat models zero-shot;
ACVA is zero-shot either way. Every suite is scored with and without its duplicate questions. Every
model sees the same sampled items. Models are loaded one at a time (a factory per model), and an
endpoint judge works in a background thread while the next suite or model generates on the GPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dhad_trainer.evaluation.duplicates import DuplicateReport, Policy, find_duplicates
from dhad_trainer.evaluation.judging import ScoreJudge, is_remote
from dhad_trainer.evaluation.loaders import (
    ACVA,
    MC_SUITES,
    OPEN_SUITES,
    SUITES,
    EvalItem,
    ObjectStore,
    apply_limit,
    load_suite,
    sample_summary,
)
from dhad_trainer.evaluation.report import write_report
from dhad_trainer.evaluation.scoring import (
    GENERATE,
    LOGLIKELIHOOD,
    OPEN_METHODS,
    PAIRWISE,
    SCORES,
    Judge,
    ModelRunner,
    SuiteResult,
    _unjudged,
    judge_pairwise,
    judge_scores,
    open_answers,
    score_suite,
)

log = logging.getLogger(__name__)

RunnerFactory = Callable[[], ModelRunner]


@dataclass(frozen=True)
class EvalSettings:
    source: str  # folder, s3://bucket/prefix or hf://
    suites: Sequence[str] = SUITES
    methods: Sequence[str] = (GENERATE, LOGLIKELIHOOD)
    base_model: bool = True  # few-shot MC prompts (AceGPT's setting for base models)
    k_shot: int | None = None  # MC shots; None: 5 on base models, 0 on chat models
    acva_k_shot: int = 0  # AceGPT scores ACVA zero-shot
    limit: int | None = None
    limit_per: Literal["subject", "total"] = "total"
    seed: int = 0  # the sample's draw and the bootstrap intervals
    duplicates: Policy = "all"  # what the "without duplicates" figures leave out
    continuation: Literal["letter", "text"] = "letter"
    max_new_tokens_open: int = 512
    judge_runs: int = 1  # pairwise runs (a greedy judge repeats itself)
    runs: int = 3  # AceGPT's scoring runs
    open_metrics: Sequence[str] = OPEN_METHODS


def load_references(path: str | Path) -> dict[str, str]:
    """A reference system's answers, jsonl {"id", "answer"} (or "output", AlpacaEval's name)."""
    out = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            out[str(r["id"])] = r["answer"] if "answer" in r else r["output"]
    return out


def _k(settings: EvalSettings, suite: str) -> int:
    if suite == ACVA:
        return settings.acva_k_shot
    if suite not in MC_SUITES:
        return 0
    if settings.k_shot is not None:
        return settings.k_shot
    return 5 if settings.base_model else 0


@dataclass
class _Suite:
    items: list[EvalItem]
    dev: list[EvalItem]
    exclude: frozenset[str]
    k: int


def _load(settings: EvalSettings, store: ObjectStore | None):
    suites: dict[str, _Suite] = {}
    dups: dict[str, DuplicateReport] = {}
    samples: dict[str, dict] = {}
    for suite in settings.suites:
        population = load_suite(suite, settings.source, "test", store=store)
        items = apply_limit(population, settings.limit, settings.limit_per, settings.seed)
        samples[suite] = sample_summary(population, items, settings.limit, settings.limit_per, settings.seed)
        dups[suite] = find_duplicates(items)
        k = _k(settings, suite)
        dev = load_suite(suite, settings.source, "dev", store=store) if k else []
        suites[suite] = _Suite(items, dev, frozenset(dups[suite].exclude_ids(settings.duplicates)), k)
    return suites, dups, samples


def _models(runner: ModelRunner | Mapping[str, ModelRunner | RunnerFactory], model: str):
    if hasattr(runner, "generate"):
        return {model: runner}
    return dict(runner)  # type: ignore[arg-type]


def run_eval(
    settings: EvalSettings,
    runner: ModelRunner | Mapping[str, ModelRunner | RunnerFactory],
    out_dir: str | Path,
    *,
    model: str = "model",
    judge: Judge | None = None,
    score_judge: ScoreJudge | None = None,
    references: Mapping[str, Mapping[str, str]] | None = None,
    store: ObjectStore | None = None,
    release: Callable[[Any], None] | None = None,
    backends: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """Evaluate one model (`runner`) or several ({name: runner or factory}, the first is the job's model)
    and write the report; `references` maps an open-ended suite to {id: reference answer}. `release` is
    called with each runner once its suites are done (the stage frees GPU memory there)."""
    suites, dups, samples = _load(settings, store)
    models = _models(runner, model)
    remote = any(j is not None and is_remote(j) for j in (judge, score_judge))
    pool = ThreadPoolExecutor(1, thread_name_prefix="dhad-judge") if remote else None
    pending: dict[str, list[SuiteResult | Future[SuiteResult]]] = {}
    try:
        for name, make in models.items():
            current = make if hasattr(make, "generate") else make()  # type: ignore[operator]
            pending[name] = []
            for suite, s in suites.items():
                if suite in OPEN_SUITES:
                    pending[name] += _open_ended(settings, suite, s, current, judge, score_judge,
                                                 (references or {}).get(suite), pool)
                    continue
                for method in settings.methods:
                    log.info("%s: scoring %s with %s (%d items, k=%d)", name, suite, method, len(s.items), s.k)
                    pending[name].append(score_suite(
                        s.items, current, method, dev=s.dev, k_shot=s.k, continuation=settings.continuation,
                        exclude=s.exclude,
                    ))
            if release is not None:
                release(current)
            del current
        results = {name: [r.result() if isinstance(r, Future) else r for r in rs] for name, rs in pending.items()}
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
    return write_report(results, out_dir, duplicates=dups, samples=samples, settings=_describe(settings),
                        backends=backends)


def _open_ended(settings, suite, s: _Suite, runner, judge, score_judge, refs, pool):
    import time

    start = time.perf_counter()
    log.info("answering %s (%d questions)", suite, len(s.items))
    answers = open_answers(s.items, runner, settings.max_new_tokens_open)
    generated = time.perf_counter() - start
    out: list[SuiteResult | Future[SuiteResult]] = []
    for metric in settings.open_metrics:
        chosen = score_judge if metric == SCORES else judge
        if chosen is None:
            out.append(_unjudged(s.items, answers, metric))
            continue

        def job(metric=metric, chosen=chosen) -> SuiteResult:
            if metric == SCORES:
                r = judge_scores(s.items, answers, chosen, refs, runs=settings.runs, exclude=s.exclude,
                                 seed=settings.seed)
            else:
                r = judge_pairwise(s.items, answers, chosen, refs, runs=settings.judge_runs, exclude=s.exclude,
                                   seed=settings.seed)
            r.notes.append(f"answers generated in {generated:.1f} s, judged in {r.elapsed_s:.1f} s")
            r.elapsed_s += generated
            return r

        out.append(pool.submit(job) if pool is not None and is_remote(chosen) else job())
    return out


def _describe(settings: EvalSettings) -> dict:
    return {
        "source": settings.source,
        "methods": list(settings.methods),
        "open_ended_metrics": list(settings.open_metrics),
        "runs": settings.runs,
        "pairwise_runs": settings.judge_runs,
        "seed": settings.seed,
        "limit": settings.limit,
        "limit_per": settings.limit_per,
        "duplicates_policy": settings.duplicates,
    }


__all__ = ["EvalSettings", "PAIRWISE", "SCORES", "load_references", "run_eval"]
