"""Metric formulas against small tables computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dhad_trainer.evaluation.metrics import (
    NO,
    YES,
    Outcome,
    PairVerdicts,
    ScorePair,
    acva_summary,
    bootstrap,
    chance_macro_f1,
    combine_orders,
    confusion,
    macro_f1,
    mc_summary,
    mmlu_summary,
    pairwise_summary,
    ratio_summary,
    resample_indices,
    wilson,
)


def _o(gold: str, pred: str | None, group: str = "g", category: str | None = None) -> Outcome:
    return Outcome(f"{group}-{gold}-{pred}", gold, pred, group, category)


def test_accuracy_counts_unparsed_as_wrong() -> None:
    s = mc_summary([_o("A", "A", "x"), _o("B", None, "x"), _o("C", "D", "y"), _o("D", "D", "y")])
    assert s["accuracy"] == 0.5 and s["correct"] == 2 and s["unparsed"] == 1 and s["n"] == 4
    assert s["per_subject"]["x"]["accuracy"] == 0.5 and s["per_subject"]["x"]["unparsed"] == 1
    assert s["headline"] == 0.5 and s["headline_metric"] == "accuracy"


def test_mmlu_mean_of_category_means() -> None:
    # STEM: abstract_algebra 1/2, astronomy 2/2 -> 3/4; humanities: formal_logic 0/2 (one unparsed) -> 0;
    # social sciences: econometrics 1/1 -> 1; other: anatomy 1/3 -> 1/3.
    rows = [
        ("abstract_algebra", "STEM", "A", "A"),
        ("abstract_algebra", "STEM", "B", "C"),
        ("astronomy", "STEM", "C", "C"),
        ("astronomy", "STEM", "D", "D"),
        ("formal_logic", "humanities", "A", None),
        ("formal_logic", "humanities", "B", "A"),
        ("econometrics", "social sciences", "C", "C"),
        ("anatomy", "other", "A", "A"),
        ("anatomy", "other", "B", "A"),
        ("anatomy", "other", "C", None),
    ]
    s = mmlu_summary([Outcome(f"{i}", g, p, subj, cat) for i, (subj, cat, g, p) in enumerate(rows)])
    assert s["per_category"]["STEM"]["accuracy"] == pytest.approx(0.75)
    assert s["per_category"]["humanities"]["accuracy"] == 0.0
    assert s["per_category"]["other"]["accuracy"] == pytest.approx(1 / 3)
    assert s["category_mean"] == pytest.approx((0.75 + 0 + 1 + 1 / 3) / 4)  # 0.5208
    assert s["headline"] == s["category_mean"]
    assert s["micro_accuracy"] == pytest.approx(5 / 10)
    assert s["subject_mean"] == pytest.approx((0.5 + 1 + 0 + 1 + 1 / 3) / 5)
    assert s["unparsed"] == 2


ACVA = [
    # topic T1
    ("T1", YES, YES),
    ("T1", YES, NO),
    ("T1", NO, NO),
    ("T1", NO, None),
    # topic T2
    ("T2", YES, YES),
    ("T2", YES, YES),
    ("T2", NO, YES),
]


def test_acva_macro_f1_pooled_by_hand() -> None:
    outcomes = [Outcome(str(i), g, p, t) for i, (t, g, p) in enumerate(ACVA)]
    s = acva_summary(outcomes)
    # yes: TP 3, FP 1, FN 1 -> F1 = 6/8 = 0.75; no: TP 1, FP 1, FN 2 (one unparsed) -> 2/5 = 0.4
    assert s["per_class"][YES]["f1"] == pytest.approx(0.75)
    assert s["per_class"][NO]["f1"] == pytest.approx(0.4)
    assert s["per_class"][NO]["precision"] == pytest.approx(0.5) and s["per_class"][NO][
        "recall"
    ] == pytest.approx(1 / 3)
    assert s["macro_f1"] == pytest.approx(0.575) and s["headline"] == s["macro_f1"]
    assert s["accuracy"] == pytest.approx(4 / 7) and s["unparsed"] == 1
    # T1: yes 2/3, no 2/4 -> 0.58333; T2: yes 4/5, no 0 (present in gold, never right) -> 0.4
    assert s["per_topic"]["T1"]["macro_f1"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert s["per_topic"]["T2"]["macro_f1"] == pytest.approx(0.4)
    assert s["confusion"] == {YES: {YES: 3, NO: 1, "unparsed": 0}, NO: {YES: 1, NO: 1, "unparsed": 1}}


def test_class_absent_from_gold_and_predictions_is_left_out() -> None:
    assert macro_f1([_o(YES, YES), _o(YES, YES)]) == 1.0
    assert macro_f1([_o(YES, NO), _o(YES, YES)]) == pytest.approx((2 / 3 + 0) / 2)  # no: FP 1 -> F1 0


def test_confusion_unparsed_column() -> None:
    assert confusion([_o(YES, None), _o(NO, None)])[YES]["unparsed"] == 1


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("A", "B", "win"),  # model preferred in both orders
        ("B", "A", "loss"),
        ("A", "A", "tie"),  # position bias: the first answer always wins
        ("B", "B", "tie"),
        ("tie", "B", "tie"),
        ("A", "tie", "tie"),
        ("tie", "tie", "tie"),
        ("A", None, None),
        (None, None, None),
        ("maybe", "B", None),
    ],
)
def test_combine_orders(first: str | None, second: str | None, expected: str | None) -> None:
    assert combine_orders(first, second) == expected


def _pairs(*outcomes: tuple[str | None, str | None], forced: int = 0) -> list[PairVerdicts]:
    return [PairVerdicts(str(i), a, b, forced) for i, (a, b) in enumerate(outcomes)]


def test_pairwise_summary_by_hand() -> None:
    # win, win, tie (A then tie), loss, invalid (second verdict missing)
    s = pairwise_summary(_pairs(("A", "B"), ("A", "B"), ("A", "tie"), ("B", "A"), ("A", None)))
    assert (s["wins"], s["ties"], s["losses"], s["invalid"], s["n"]) == (2, 1, 1, 1, 5)
    assert s["score"] == pytest.approx(2.5 / 4)
    assert s["ratio_to_reference"] == pytest.approx(2.5 / 1.5)
    assert (s["verdicts"], s["unparseable"], s["forced"], s["inconsistent"]) == (10, 1, 0, 0)
    assert s["flag"] is None and s["chance"] == 0.5
    assert pairwise_summary(_pairs(("A", "B")))["ratio_to_reference"] is None
    assert pairwise_summary(_pairs(("tie", "tie"), ("tie", "tie")))["ratio_to_reference"] == 1.0


def test_pairwise_flags_forced_and_inconsistent_verdicts() -> None:
    biased = pairwise_summary(_pairs(("A", "A"), ("A", "A"), ("B", "B"), ("A", "B")))
    assert biased["inconsistent"] == 3 and biased["flag"] == "mostly position-inconsistent pairs (3 of 4)"
    forced = pairwise_summary(_pairs(("A", "B"), ("A", "B"), ("B", "A"), forced=2))
    assert forced["forced"] == 6 and forced["flag"] == "mostly forced verdicts (6 of 6)"
    half = pairwise_summary(_pairs(("A", "B"), ("B", "A"), forced=1))  # 2 of 4 forced: not most
    assert half["flag"] is None
    assert pairwise_summary(_pairs((None, None)))["flag"] == "no valid verdict"


def test_wilson_interval_matches_published_values() -> None:
    # 8 of 10 and 0 of 10 at 95% (Wilson 1927; the values every table of the interval gives)
    assert wilson(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)
    assert wilson(0, 10) == pytest.approx([0.0, 0.2775], abs=1e-4)
    assert wilson(0, 0) is None
    s = mc_summary([_o("A", "A"), _o("B", "B"), _o("C", "D"), _o("D", None)])
    assert s["ci95"] == pytest.approx(wilson(2, 4)) and s["ci_method"] == "wilson" and s["chance"] == 0.25


def test_bootstrap_is_seeded_and_stratified() -> None:
    x = np.asarray([0.0] * 30 + [1.0] * 70)
    a = bootstrap(lambda idx: x[idx].mean(axis=1), len(x), seed=1)
    assert a == bootstrap(lambda idx: x[idx].mean(axis=1), len(x), seed=1)
    assert a[0] < 0.7 < a[1] and a[1] - a[0] < 0.25  # about 2 * 1.96 * sqrt(.21/100) = 0.18 wide
    idx = resample_indices(6, seed=0, strata=["a", "a", "b", "b", "b", "c"], resamples=50)
    assert set(idx[:, 5]) == {5} and set(idx[:, :2].ravel()) <= {0, 1} and set(idx[:, 2:5].ravel()) <= {2, 3, 4}


def test_chance_levels_by_hand() -> None:
    # 3 yes, 1 no; a uniform guess: yes 3 / (3 + 2) = 0.6, no 1 / (1 + 2) = 1/3
    assert chance_macro_f1([YES, YES, YES, NO]) == pytest.approx((0.6 + 1 / 3) / 2)
    assert chance_macro_f1([YES, NO]) == pytest.approx(0.5)
    s = acva_summary([Outcome(str(i), g, p, t) for i, (t, g, p) in enumerate(ACVA)])
    assert s["chance"] == pytest.approx(chance_macro_f1([g for _, g, _ in ACVA]))
    assert s["ci95"][0] <= s["macro_f1"] <= s["ci95"][1] and s["ci_method"] == "bootstrap"


def test_mmlu_category_mean_interval_covers_the_estimate() -> None:
    rows = [(f"s{k % 4}", ("STEM", "humanities", "social sciences", "other")[k % 4], "A", "A" if k % 3 else "B")
            for k in range(80)]
    s = mmlu_summary([Outcome(str(i), g, p, subj, cat) for i, (subj, cat, g, p) in enumerate(rows)])
    assert s["ci95"][0] <= s["category_mean"] <= s["ci95"][1]
    assert s["ci_method"].startswith("bootstrap (stratified")


def test_ratio_summary_by_hand() -> None:
    """Two questions, two runs, both positions; one judgement unparseable, one pair inconsistent."""
    j = [
        # run 0: q1 model first (8, 6); reference first: the judge gave the reference 7, the model 5
        ScorePair("q1", 0, True, 8, 6), ScorePair("q1", 0, False, 5, 7),
        ScorePair("q2", 0, True, 4, 4), ScorePair("q2", 0, False, None, None, "unparseable"),
        # run 1
        ScorePair("q1", 1, True, 9, 5), ScorePair("q1", 1, False, 6, 6),
        ScorePair("q2", 1, True, 3, 7), ScorePair("q2", 1, False, 2, 8),
    ]
    s = ratio_summary(j, runs=2)
    run0, run1 = (8 + 5 + 4) / (6 + 7 + 4), (9 + 6 + 3 + 2) / (5 + 6 + 7 + 8)
    assert s["ratio_per_run"] == pytest.approx([run0, run1])
    assert s["score_ratio"] == pytest.approx((run0 + run1) / 2) and s["headline"] == s["score_ratio"]
    assert s["ratio_std"] == pytest.approx(abs(run0 - run1) / math.sqrt(2))
    assert (s["unparseable"], s["judgements"], s["valid_judgements"], s["n"]) == (1, 8, 7, 2)
    assert s["inconsistent"] == 1  # run 0, q1: the model ahead when first, behind when second
    assert s["unparseable_by_status"] == {"unparseable": 1} and s["flag"] is None and s["chance"] == 1.0
    assert s["ci95"][0] <= s["score_ratio"] <= s["ci95"][1]
    bad = ratio_summary([ScorePair("q", 0, True, None, None, "unparseable")] * 3 + [ScorePair("q", 0, False, 5, 5)], 1)
    assert bad["flag"] == "mostly unparseable verdicts (3 of 4)"
