"""Benchmark metrics, each defined here once so reports and tests agree on the formula.

- Unparseable answers (pred None) are always wrong and always counted (`unparsed`).
- MMLU: a category's score is the accuracy over all of its questions (Hendrycks' per-category figure);
  the headline is the unweighted mean of the 4 category scores (AceGPT's aggregate). Micro accuracy
  (all questions) and the macro mean over subjects are reported beside it.
- ACVA: per-class F1 = 2TP / (2TP + FP + FN) over نعم and لا, pooled over every topic; the headline is
  the mean of the two (macro-F1). An unparsed answer is a third confusion-matrix column: a false
  negative for its gold class and a false positive for neither, so it lowers recall without inventing
  a prediction. A class that neither occurs in gold nor is predicted (possible inside one topic) has
  no F1 and is left out of the mean instead of counting as 0.
- Open-ended: the judge sees (model, reference) and (reference, model). A win needs both orders to
  prefer the model, a loss both to prefer the reference; a tie verdict or orders that disagree make a
  tie (position bias cancels out). A missing verdict makes the pair invalid: counted, not scored.
  score = (wins + ties/2) / valid, 0.5 meaning parity with the reference; ratio_to_reference =
  (wins + ties/2) / (losses + ties/2), the model's points over the reference's under the same rule,
  the pairwise analogue of AceGPT's "ratio to reference" (1.0 = parity; None if the reference has 0).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dhad_trainer.evaluation.mmlu_subjects import CATEGORIES

YES, NO = "نعم", "لا"
UNPARSED = "unparsed"


@dataclass(frozen=True)
class Outcome:
    """One scored item: gold label, predicted label (None = unparseable) and its grouping keys."""

    item_id: str
    gold: str
    pred: str | None
    group: str | None = None
    category: str | None = None

    @property
    def correct(self) -> bool:
        return self.pred is not None and self.pred == self.gold


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return _ratio(sum(o.correct for o in outcomes), len(outcomes))


def _counts(outcomes: Sequence[Outcome]) -> dict:
    return {
        "accuracy": accuracy(outcomes),
        "n": len(outcomes),
        "correct": sum(o.correct for o in outcomes),
        "unparsed": sum(o.pred is None for o in outcomes),
    }


def _by(outcomes: Iterable[Outcome], key: str) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[str(getattr(o, key))].append(o)
    return dict(sorted(groups.items()))


def mc_summary(outcomes: Sequence[Outcome]) -> dict:
    """Multiple choice (EXAMS): micro accuracy (the headline) and per-subject figures."""
    per = {s: _counts(g) for s, g in _by(outcomes, "group").items()}
    return {
        **_counts(outcomes),
        "headline": accuracy(outcomes),
        "headline_metric": "accuracy",
        "subject_mean": _ratio(sum(v["accuracy"] for v in per.values()), len(per)),
        "per_subject": per,
    }


def mmlu_summary(outcomes: Sequence[Outcome]) -> dict:
    """MMLU: mean of the category scores present (the headline), micro accuracy, per category/subject."""
    base = mc_summary(outcomes)
    cats = _by(outcomes, "category")
    per_category = {c: _counts(cats[c]) for c in CATEGORIES if c in cats}
    per_category.update({c: _counts(g) for c, g in cats.items() if c not in CATEGORIES})  # unknown subjects
    headline = _ratio(sum(v["accuracy"] for v in per_category.values()), len(per_category))
    return {
        **base,
        "headline": headline,
        "headline_metric": "category_mean",
        "category_mean": headline,
        "micro_accuracy": base["accuracy"],
        "per_category": per_category,
    }


def confusion(outcomes: Sequence[Outcome], labels: Sequence[str] = (YES, NO)) -> dict[str, dict[str, int]]:
    """gold -> predicted (or "unparsed") -> count."""
    table = {g: dict.fromkeys([*labels, UNPARSED], 0) for g in labels}
    for o in outcomes:
        table.setdefault(o.gold, dict.fromkeys([*labels, UNPARSED], 0))
        col = UNPARSED if o.pred is None else o.pred
        table[o.gold][col] = table[o.gold].get(col, 0) + 1
    return table


def per_class_f1(outcomes: Sequence[Outcome], labels: Sequence[str] = (YES, NO)) -> dict[str, dict]:
    out = {}
    for c in labels:
        tp = sum(o.gold == c and o.pred == c for o in outcomes)
        fp = sum(o.gold != c and o.pred == c for o in outcomes)
        fn = sum(o.gold == c and o.pred != c for o in outcomes)
        out[c] = {
            "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn),
            "f1": (2 * tp / (2 * tp + fp + fn)) if (tp + fp + fn) else None,
            "support": tp + fn,
        }
    return out


def macro_f1(outcomes: Sequence[Outcome], labels: Sequence[str] = (YES, NO)) -> float:
    f1s = [v["f1"] for v in per_class_f1(outcomes, labels).values() if v["f1"] is not None]
    return _ratio(sum(f1s), len(f1s))


def acva_summary(outcomes: Sequence[Outcome]) -> dict:
    """ACVA: macro-F1 pooled over all topics (the headline), accuracy, and per-topic figures."""
    per_topic = {t: {**_counts(g), "macro_f1": macro_f1(g)} for t, g in _by(outcomes, "group").items()}
    pooled = macro_f1(outcomes)
    return {
        **_counts(outcomes),
        "headline": pooled,
        "headline_metric": "macro_f1",
        "macro_f1": pooled,
        "per_class": per_class_f1(outcomes),
        "confusion": confusion(outcomes),
        "per_topic": per_topic,
    }


def combine_orders(first: str | None, second: str | None) -> str | None:
    """Judge verdicts for (model=A, ref=B) then (ref=A, model=B) -> "win" | "tie" | "loss" | None."""
    as_model = {"A": "win", "B": "loss", "tie": "tie"}.get(first or "")
    swapped = {"B": "win", "A": "loss", "tie": "tie"}.get(second or "")
    if as_model is None or swapped is None:
        return None
    return as_model if as_model == swapped and as_model != "tie" else "tie"


def pairwise_summary(results: Sequence[str | None]) -> dict:
    """Aggregate per-pair results (over all questions and judge runs) into the open-ended figures."""
    wins, ties, losses = (sum(r == k for r in results) for k in ("win", "tie", "loss"))
    valid = wins + ties + losses
    points, ref_points = wins + ties / 2, losses + ties / 2
    score = _ratio(points, valid)
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "invalid": len(results) - valid,
        "n": len(results),
        "score": score,
        "headline": score,
        "headline_metric": "win_tie_score",
        "ratio_to_reference": (points / ref_points) if ref_points else None,
    }
