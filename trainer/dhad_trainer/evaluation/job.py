"""One evaluation run end to end, the body of an EvalJob / `dhad eval`: load suites, find duplicates,
score with each method, write the report, return the headline scores for the job status.

Defaults follow AceGPT: base models get 5-shot MC prompts from the dev split, chat models zero-shot;
ACVA is zero-shot either way. Every suite is scored with and without its duplicate questions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dhad_trainer.evaluation.duplicates import DuplicateReport, Policy, find_duplicates
from dhad_trainer.evaluation.loaders import ACVA, MC_SUITES, OPEN_SUITES, SUITES, ObjectStore, load_suite
from dhad_trainer.evaluation.report import write_report
from dhad_trainer.evaluation.scoring import (
    GENERATE,
    LOGLIKELIHOOD,
    Judge,
    ModelRunner,
    SuiteResult,
    score_suite,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSettings:
    source: str  # folder, s3://bucket/prefix or hf://
    suites: Sequence[str] = SUITES
    methods: Sequence[str] = (GENERATE, LOGLIKELIHOOD)
    base_model: bool = True  # few-shot MC prompts (AceGPT's setting for base models)
    k_shot: int | None = None  # MC shots; None: 5 on base models, 0 on chat models
    acva_k_shot: int = 0  # AceGPT scores ACVA zero-shot
    limit: int | None = None
    limit_per: Literal["subject", "total"] = "subject"
    duplicates: Policy = "all"  # what the "without duplicates" figures leave out
    continuation: Literal["letter", "text"] = "letter"
    max_new_tokens_open: int = 512
    judge_runs: int = 1


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


def run_eval(
    settings: EvalSettings,
    runner: ModelRunner,
    out_dir: str | Path,
    *,
    model: str = "model",
    judge: Judge | None = None,
    references: Mapping[str, Mapping[str, str]] | None = None,
    store: ObjectStore | None = None,
) -> dict[str, float]:
    """Evaluate and write the report; `references` maps an open-ended suite to {id: reference answer}."""
    results: list[SuiteResult] = []
    dups: dict[str, DuplicateReport] = {}
    for suite in settings.suites:
        items = load_suite(
            suite, settings.source, "test", limit=settings.limit, limit_per=settings.limit_per, store=store
        )
        dups[suite] = find_duplicates(items)
        exclude = frozenset(dups[suite].exclude_ids(settings.duplicates))
        k = _k(settings, suite)
        dev = load_suite(suite, settings.source, "dev", store=store) if k else []
        methods = [GENERATE] if suite in OPEN_SUITES else settings.methods
        for method in methods:
            log.info("scoring %s with %s (%d items, k=%d)", suite, method, len(items), k)
            results.append(
                score_suite(
                    items,
                    runner,
                    method,
                    dev=dev,
                    k_shot=k,
                    continuation=settings.continuation,
                    exclude=exclude,
                    judge=judge,
                    references=(references or {}).get(suite),
                    max_new_tokens_open=settings.max_new_tokens_open,
                    judge_runs=settings.judge_runs,
                )
            )
    return write_report(results, out_dir, model=model, duplicates=dups)
