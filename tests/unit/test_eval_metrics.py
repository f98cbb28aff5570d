"""Metric formulas against small tables computed by hand."""

from __future__ import annotations

import pytest

from dhad_trainer.evaluation.metrics import (
    NO,
    YES,
    Outcome,
    acva_summary,
    combine_orders,
    confusion,
    macro_f1,
    mc_summary,
    mmlu_summary,
    pairwise_summary,
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


def test_pairwise_summary_by_hand() -> None:
    s = pairwise_summary(["win", "win", "tie", "loss", None])
    assert (s["wins"], s["ties"], s["losses"], s["invalid"], s["n"]) == (2, 1, 1, 1, 5)
    assert s["score"] == pytest.approx(2.5 / 4)
    assert s["ratio_to_reference"] == pytest.approx(2.5 / 1.5)
    assert pairwise_summary(["win"])["ratio_to_reference"] is None
    assert pairwise_summary(["tie", "tie"])["ratio_to_reference"] == 1.0
