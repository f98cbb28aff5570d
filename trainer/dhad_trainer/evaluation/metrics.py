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
  (wins + ties/2) / (losses + ties/2), the model's points over the reference's under the same rule
  (1.0 = parity; None if the reference has 0). Forced verdicts (a local judge's likelihood fallback),
  unparseable ones and position-inconsistent pairs (each order prefers a different answer) are counted.
- Open-ended, AceGPT's figure (`ratio_summary`): the judge scores both answers 1-10 in one prompt, in
  both positions; per run, ratio = sum of the model's scores / sum of the reference's over every
  judgement whose scores parsed (an unparseable judgement drops both of its scores, never guessed);
  the headline is the mean ratio over runs, with its spread (sample std, min, max).
- Intervals (95%): Wilson for accuracies; a percentile bootstrap over items (seeded, 1000 resamples)
  for macro-F1, category means and open-ended figures (resampling questions, all runs of a question
  together). Chance: 1/options for multiple choice; for ACVA macro-F1 the expected F1 of a uniform
  yes/no guess given the gold labels (class c: n_c / (n_c + N/2)); parity with the reference for
  open-ended figures (0.5 score, 1.0 ratio).
- A figure is flagged (and kept out of the headline scores) when most of its verdicts are forced,
  position-inconsistent or unparseable: it says more about the judge than about the model.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

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
    reason: str | None = None  # why pred is None ("hedged", "leftover", ...), from parsing

    @property
    def correct(self) -> bool:
        return self.pred is not None and self.pred == self.gold


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def accuracy(outcomes: Sequence[Outcome]) -> float:
    return _ratio(sum(o.correct for o in outcomes), len(outcomes))


Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 1000
FLAG_SHARE = 0.5  # more than this share of forced / inconsistent / unparseable verdicts flags a figure


def wilson(k: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score interval for k successes in n trials (None when n is 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def resample_indices(n: int, seed: int = 0, strata: Sequence[object] | None = None,
                     resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement; within each stratum when `strata` is given,
    so every resample keeps the strata's sizes (MMLU's categories)."""
    rng = np.random.default_rng(seed)
    if strata is None:
        return rng.integers(0, n, size=(resamples, n))
    out = np.empty((resamples, n), dtype=np.int64)
    labels = np.asarray([str(s) for s in strata])
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        out[:, where] = where[rng.integers(0, len(where), size=(resamples, len(where)))]
    return out


def percentile_interval(values: np.ndarray) -> list[float] | None:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, seed: int = 0,
              strata: Sequence[object] | None = None) -> list[float] | None:
    """95% percentile interval of `statistic`, which maps a (resamples, n) index matrix to one value
    per resample (vectorised, so 1000 resamples of 14,000 items cost milliseconds)."""
    if n == 0:
        return None
    return percentile_interval(statistic(resample_indices(n, seed, strata)))


def _counts(outcomes: Sequence[Outcome]) -> dict:
    correct = sum(o.correct for o in outcomes)
    reasons = Counter(o.reason or "no_answer" for o in outcomes if o.pred is None)
    return {
        "accuracy": accuracy(outcomes),
        "n": len(outcomes),
        "correct": correct,
        "ci95": wilson(correct, len(outcomes)),
        "unparsed": sum(o.pred is None for o in outcomes),
        "hedged": reasons.get("hedged", 0),
        "unparsed_reasons": dict(sorted(reasons.items())),
    }


def _by(outcomes: Iterable[Outcome], key: str) -> dict[str, list[Outcome]]:
    groups: dict[str, list[Outcome]] = defaultdict(list)
    for o in outcomes:
        groups[str(getattr(o, key))].append(o)
    return dict(sorted(groups.items()))


def mc_summary(outcomes: Sequence[Outcome]) -> dict:
    """Multiple choice (EXAMS): micro accuracy (the headline) and per-subject figures."""
    per = {s: _counts(g) for s, g in _by(outcomes, "group").items()}
    counts = _counts(outcomes)
    return {
        **counts,
        "headline": accuracy(outcomes),
        "headline_metric": "accuracy",
        "ci_method": "wilson",
        "chance": chance_mc(),
        "subject_mean": _ratio(sum(v["accuracy"] for v in per.values()), len(per)),
        "per_subject": per,
    }


def chance_mc(options: int = 4) -> float:
    return 1 / options


def mmlu_summary(outcomes: Sequence[Outcome]) -> dict:
    """MMLU: mean of the category scores present (the headline), micro accuracy, per category/subject."""
    base = mc_summary(outcomes)
    cats = _by(outcomes, "category")
    per_category = {c: _counts(cats[c]) for c in CATEGORIES if c in cats}
    per_category.update({c: _counts(g) for c, g in cats.items() if c not in CATEGORIES})  # unknown subjects
    headline = _ratio(sum(v["accuracy"] for v in per_category.values()), len(per_category))
    cats_of = [str(o.category) for o in outcomes]
    correct = np.asarray([o.correct for o in outcomes], dtype=float)
    columns = [np.flatnonzero(np.asarray(cats_of) == c) for c in per_category]

    def category_mean(idx: np.ndarray) -> np.ndarray:
        picked = correct[idx]  # stratified: column j stays in item j's category
        return np.mean([picked[:, w].mean(axis=1) for w in columns], axis=0)

    return {
        **base,
        "headline": headline,
        "headline_metric": "category_mean",
        "category_mean": headline,
        "ci95": bootstrap(category_mean, len(outcomes), strata=cats_of) if columns else None,
        "ci_method": "bootstrap (stratified by category)",
        "micro_accuracy": base["accuracy"],
        "micro_ci95": base["ci95"],
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


def chance_macro_f1(golds: Sequence[str], labels: Sequence[str] = (YES, NO)) -> float:
    """Expected-count macro-F1 of a uniform random yes/no guess: per class c, n_c / (n_c + N/2)."""
    n = len(golds)
    present = [golds.count(c) for c in labels if c in golds]
    return _ratio(sum(k / (k + n / 2) for k in present), len(present))


def _macro_f1_resampled(outcomes: Sequence[Outcome], labels: Sequence[str] = (YES, NO)):
    code = {c: i for i, c in enumerate(labels)}
    gold = np.asarray([code.get(o.gold, -1) for o in outcomes])
    pred = np.asarray([code.get(o.pred, -2) if o.pred is not None else -2 for o in outcomes])

    def statistic(idx: np.ndarray) -> np.ndarray:
        g, p = gold[idx], pred[idx]
        f1s = []
        for c in range(len(labels)):
            tp = ((g == c) & (p == c)).sum(1)
            fp = ((g != c) & (p == c)).sum(1)
            fn = ((g == c) & (p != c)).sum(1)
            den = 2 * tp + fp + fn
            f1s.append(np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan))
        f1 = np.stack(f1s, axis=1)
        present = np.isfinite(f1)
        return np.where(present.any(1), np.nansum(f1, 1) / np.maximum(present.sum(1), 1), np.nan)

    return statistic


def acva_summary(outcomes: Sequence[Outcome]) -> dict:
    """ACVA: macro-F1 pooled over all topics (the headline), accuracy, and per-topic figures."""
    per_topic = {
        t: {**_counts(g), "macro_f1": macro_f1(g), "chance": chance_macro_f1([o.gold for o in g])}
        for t, g in _by(outcomes, "group").items()
    }
    pooled = macro_f1(outcomes)
    counts = _counts(outcomes)
    return {
        **counts,
        "accuracy_ci95": counts["ci95"],
        "headline": pooled,
        "headline_metric": "macro_f1",
        "macro_f1": pooled,
        "ci95": bootstrap(_macro_f1_resampled(outcomes), len(outcomes)),
        "ci_method": "bootstrap",
        "chance": chance_macro_f1([o.gold for o in outcomes]),
        "chance_rule": "uniform yes/no guess",
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


@dataclass(frozen=True)
class PairVerdicts:
    """The pairwise judge on one question in one run: `first` with the model's answer as A, `second` with
    it as B ("A", "B", "tie" or None), and how many of the two verdicts were forced."""

    item_id: str
    first: str | None
    second: str | None
    forced: int = 0
    run: int = 0

    @property
    def outcome(self) -> str | None:
        return combine_orders(self.first, self.second)

    @property
    def inconsistent(self) -> bool:
        """Each order preferred the answer in the same position, so they disagree on which answer."""
        return (self.first, self.second) in (("A", "A"), ("B", "B"))


_POINTS = {"win": 1.0, "tie": 0.5, "loss": 0.0}


def _per_item(values: dict[str, list[float]]) -> tuple[list[str], np.ndarray]:
    ids = sorted(values)
    return ids, np.asarray([np.mean(values[i]) for i in ids], dtype=float)


def flag(forced: int, inconsistent: int, unparseable: int, verdicts: int, pairs_judged: int) -> str | None:
    """Why a judged figure must not be read as a result, or None. `verdicts` counts every judgement asked
    for, `pairs_judged` the questions (per run) with a valid judgement in both positions."""
    if verdicts - unparseable <= 0:
        return "no valid verdict"
    if forced > FLAG_SHARE * verdicts:
        return f"mostly forced verdicts ({forced} of {verdicts})"
    if unparseable > FLAG_SHARE * verdicts:
        return f"mostly unparseable verdicts ({unparseable} of {verdicts})"
    if inconsistent > FLAG_SHARE * pairs_judged:
        return f"mostly position-inconsistent pairs ({inconsistent} of {pairs_judged})"
    return None


def pairwise_summary(verdicts: Sequence[PairVerdicts], seed: int = 0) -> dict:
    """Aggregate the pairwise judge's verdicts (all questions and runs) into the open-ended figures."""
    results = [v.outcome for v in verdicts]
    wins, ties, losses = (sum(r == k for r in results) for k in ("win", "tie", "loss"))
    valid = wins + ties + losses
    points, ref_points = wins + ties / 2, losses + ties / 2
    score = _ratio(points, valid)
    unparseable = sum((v.first is None) + (v.second is None) for v in verdicts)
    forced = sum(v.forced for v in verdicts)
    inconsistent = sum(v.inconsistent for v in verdicts)
    by_item: dict[str, list[float]] = defaultdict(list)
    for v in verdicts:
        if v.outcome is not None:
            by_item[v.item_id].append(_POINTS[v.outcome])
    _, per_item = _per_item(by_item)
    ci = bootstrap(lambda idx: per_item[idx].mean(axis=1), len(per_item), seed)
    return {
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "invalid": len(results) - valid,
        "n": len(results),
        "questions": len(by_item),
        "score": score,
        "headline": score,
        "headline_metric": "win_tie_score",
        "ci95": ci,
        "ci_method": "bootstrap over questions",
        "chance": 0.5,
        "chance_rule": "parity with the reference",
        "ratio_to_reference": (points / ref_points) if ref_points else None,
        "verdicts": 2 * len(verdicts),
        "forced": forced,
        "unparseable": unparseable,
        "inconsistent": inconsistent,
        "flag": flag(forced, inconsistent, unparseable, 2 * len(verdicts),
                     sum(v.first is not None and v.second is not None for v in verdicts)),
    }


@dataclass(frozen=True)
class ScorePair:
    """The scoring judge on one question, one position, one run: the 1-10 scores it gave the model's and
    the reference's answer (None when its answer did not parse), and the judgement's status."""

    item_id: str
    run: int
    model_first: bool
    model: float | None
    reference: float | None
    status: str = "ok"

    @property
    def valid(self) -> bool:
        return self.model is not None and self.reference is not None


def ratio_summary(judgements: Sequence[ScorePair], runs: int, seed: int = 0) -> dict:
    """AceGPT's open-ended figure: per run, the model's summed scores over the reference's (valid
    judgements only, both positions); the mean and spread over runs; a bootstrap over questions."""
    per_run: list[float | None] = []
    for r in range(runs):
        kept = [j for j in judgements if j.run == r and j.valid]
        ref = sum(j.reference for j in kept)  # type: ignore[misc]
        per_run.append(sum(j.model for j in kept) / ref if ref else None)  # type: ignore[misc]
    ratios = [x for x in per_run if x is not None]
    valid = [j for j in judgements if j.valid]
    statuses = Counter(j.status for j in judgements if not j.valid)
    pairs: dict[tuple[str, int], list[ScorePair]] = defaultdict(list)
    for j in valid:
        pairs[(j.item_id, j.run)].append(j)
    both = [p for p in pairs.values() if len(p) == 2]
    inconsistent = sum(
        len({math.copysign(1, x.model - x.reference) for x in p if x.model != x.reference}) == 2 for p in both
    )  # type: ignore[operator]
    ids = sorted({j.item_id for j in judgements})
    position = {i: k for k, i in enumerate(ids)}
    model_sum, ref_sum = np.zeros((len(ids), runs)), np.zeros((len(ids), runs))
    for j in valid:
        model_sum[position[j.item_id], j.run] += j.model  # type: ignore[operator]
        ref_sum[position[j.item_id], j.run] += j.reference  # type: ignore[operator]

    def mean_ratio(idx: np.ndarray) -> np.ndarray:
        den = ref_sum[idx].sum(axis=1)  # (resamples, runs)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.nanmean(np.where(den > 0, model_sum[idx].sum(axis=1) / den, np.nan), axis=1)

    mean = float(np.mean(ratios)) if ratios else None
    unparseable = len(judgements) - len(valid)
    return {
        "headline": mean,
        "headline_metric": "score_ratio",
        "score_ratio": mean,
        "ratio_per_run": per_run,
        "ratio_std": float(np.std(ratios, ddof=1)) if len(ratios) > 1 else 0.0 if ratios else None,
        "ratio_min": min(ratios) if ratios else None,
        "ratio_max": max(ratios) if ratios else None,
        "runs": runs,
        "n": len(ids),
        "judgements": len(judgements),
        "valid_judgements": len(valid),
        "unparseable": unparseable,
        "unparseable_by_status": dict(sorted(statuses.items())),
        "forced": 0,
        "inconsistent": inconsistent,
        "pairs_with_both_positions": len(both),
        "model_mean_score": float(np.mean([j.model for j in valid])) if valid else None,
        "reference_mean_score": float(np.mean([j.reference for j in valid])) if valid else None,
        "ci95": bootstrap(mean_ratio, len(ids), seed) if valid else None,
        "ci_method": "bootstrap over questions",
        "chance": 1.0,
        "chance_rule": "parity with the reference",
        "flag": flag(0, inconsistent, unparseable, len(judgements), len(both)),
    }
