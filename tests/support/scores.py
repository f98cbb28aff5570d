"""Headline scores recounted from a report's per-item predictions files, written out here from the
papers' definitions rather than through `dhad_trainer.evaluation.metrics`, so a test can check the
figures a report states instead of only their range."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from dhad_trainer.evaluation.mmlu_subjects import SUBJECT_CATEGORY

YES, NO = "نعم", "لا"


def predictions(report: Path, suite: str, method: str) -> list[dict]:
    path = report / f"predictions_{suite}_{method.replace('+', '_')}.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def recount(report: Path, suite: str, method: str) -> float:
    """The suite's headline from its predictions: MMLU the mean of category accuracies, EXAMS accuracy,
    ACVA macro-F1 over نعم/لا (an unparsed answer is wrong for its gold class), open-ended
    (wins + ties / 2) / judged pairs over every judge run."""
    rows = predictions(report, suite, method)
    if suite == "arabic-mmlu":
        by_category: dict[str, list[bool]] = defaultdict(list)
        for r in rows:
            by_category[SUBJECT_CATEGORY[r["subject"]]].append(r["pred"] == r["gold"])
        return sum(sum(v) / len(v) for v in by_category.values()) / len(by_category)
    if suite == "exams":
        return sum(r["pred"] == r["gold"] for r in rows) / len(rows)
    if suite == "acva":
        f1s = []
        for label in (YES, NO):
            tp = sum(r["gold"] == label and r["pred"] == label for r in rows)
            fp = sum(r["gold"] != label and r["pred"] == label for r in rows)
            fn = sum(r["gold"] == label and r["pred"] != label for r in rows)
            if tp + fp + fn:
                f1s.append(2 * tp / (2 * tp + fp + fn))
        return sum(f1s) / len(f1s)
    outcomes = [o for r in rows for o in r["judged"] if o is not None]
    return (outcomes.count("win") + outcomes.count("tie") / 2) / len(outcomes)
