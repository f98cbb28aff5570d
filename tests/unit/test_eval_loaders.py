"""Loaders on the real AceGPT files (read in place from shared/, never copied)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import IO

import pytest

from dhad_trainer.evaluation.loaders import (
    NO,
    YES,
    EvalItem,
    apply_limit,
    load_suite,
    proportional_quotas,
    sample_summary,
)
from dhad_trainer.evaluation.mmlu_subjects import CATEGORIES, SUBJECT_CATEGORY
from tests.conftest import ACEGPT as BENCH

pytestmark = pytest.mark.benchmarks


def test_mmlu_counts_subjects_and_categories() -> None:
    items = load_suite("arabic-mmlu", BENCH)
    assert len(items) == 14042
    subjects = Counter(i.subject for i in items)
    assert len(subjects) == 57 and set(subjects) == set(SUBJECT_CATEGORY)
    assert subjects["professional_law"] == 1534 and subjects["abstract_algebra"] == 100
    assert all(i.category in CATEGORIES for i in items)
    assert Counter(i.category for i in items) == {
        "STEM": 3018,
        "humanities": 4705,
        "social sciences": 3077,
        "other": 3242,
    }
    assert Counter(i.answer for i in items) == {"D": 3776, "C": 3582, "B": 3462, "A": 3222}
    first = items[0]
    assert first.id == "abstract_algebra-0" and list(first.choices or {}) == ["A", "B", "C", "D"]
    assert first.question.startswith("ما هو الدرجة للامتداد")  # quoted CSV field with a comma
    dev = load_suite("arabic-mmlu", BENCH, "dev")
    assert len(dev) == 285 and Counter(i.subject for i in dev) == dict.fromkeys(SUBJECT_CATEGORY, 5)


def test_exams() -> None:
    test, dev = load_suite("exams", BENCH), load_suite("exams", BENCH, "dev")
    assert len(test) == 537 and len(dev) == 25
    assert Counter(i.subject for i in test) == {
        "Social": 272,
        "Science": 115,
        "Islamic Studies": 73,
        "Physics": 42,
        "Biology": 35,
    }
    assert test[0].id == "Islamic Studies-0" and test[0].answer == "C" and test[0].category is None


def test_acva_topics_from_id_prefix() -> None:
    test, dev = load_suite("acva", BENCH), load_suite("acva", BENCH, "dev")
    assert len(test) == 8711 and len(dev) == 289
    topics = Counter(i.topic for i in test)
    assert len(topics) == 58 and set(topics) == {i.topic for i in dev}
    assert topics["Islam branches and schools"] == 175 and topics["Yemen"] == 11
    assert Counter(i.answer for i in test) == {YES: 5224, NO: 3487}
    assert test[0] == EvalItem(
        "acva", "Algeria-4", "ثورة الجزائر عام 1954 كانت ضد الاستعمار الفرنسي.", None, YES, "Algeria"
    )


def test_open_ended_sets() -> None:
    vicuna, alpaca = load_suite("vicuna-80", BENCH), load_suite("alpaca-eval", BENCH)
    assert len(vicuna) == 80 and len(alpaca) == 805
    assert Counter(i.subject for i in vicuna)["coding"] == 7
    assert Counter(i.subject for i in alpaca) == {
        "selfinstruct": 252,
        "oasst": 188,
        "koala": 156,
        "helpful_base": 129,
        "vicuna": 80,
    }
    assert all(i.answer is None and i.choices is None and i.question for i in vicuna + alpaca)
    assert len({i.id for i in alpaca}) == 805


def test_proportional_quotas_by_hand() -> None:
    # exact shares 3.5, 2.1, 1.4 -> floors 3, 2, 1 (6); the one left goes to the largest remainder (a)
    assert proportional_quotas({"a": 50, "b": 30, "c": 20}, 7) == {"a": 4, "b": 2, "c": 1}
    assert proportional_quotas({"a": 5, "b": 1}, 10) == {"a": 5, "b": 1}  # limit above the total: all
    ties = [proportional_quotas({"x": 1, "y": 1, "z": 1}, 1, seed) for seed in range(12)]
    assert all(sum(q.values()) == 1 for q in ties) and len({next(k for k, v in q.items() if v) for q in ties}) > 1


def test_limit_is_a_stratified_proportional_sample_of_mmlu() -> None:
    population = load_suite("arabic-mmlu", BENCH)
    sample = load_suite("arabic-mmlu", BENCH, limit=570, seed=3)
    sizes, got = Counter(i.subject for i in population), Counter(i.subject for i in sample)
    assert len(sample) == 570 and set(got) == set(sizes)  # all 57 subjects, not the first 5 in name order
    for subject, n in sizes.items():  # each share is floor or ceil of its exact proportional share
        assert abs(got[subject] - 570 * n / 14042) < 1, subject
    cats = Counter(i.category for i in sample)
    for cat, n in {"STEM": 3018, "humanities": 4705, "social sciences": 3077, "other": 3242}.items():
        assert abs(cats[cat] - 570 * n / 14042) <= 57 / 4 + 1  # proportional up to per-subject rounding
    order = {it.id: k for k, it in enumerate(population)}
    assert [order[i.id] for i in sample] == sorted(order[i.id] for i in sample)  # file order
    assert sample == load_suite("arabic-mmlu", BENCH, limit=570, seed=3)  # same seed, same items
    other = load_suite("arabic-mmlu", BENCH, limit=570, seed=4)
    assert Counter(i.subject for i in other) == got and other != sample  # same quotas, other draw
    firsts = {f"{s}-{k}" for s in sizes for k in range(got[s])}
    assert {i.id for i in sample} != firsts  # a draw, not each subject's first items


def test_limit_on_acva_spreads_over_the_largest_topics() -> None:
    sizes = Counter(i.topic for i in load_suite("acva", BENCH))
    sample = load_suite("acva", BENCH, limit=24, seed=0)
    got = Counter(i.topic for i in sample)
    assert len(sample) == 24 and max(got.values()) == 1  # 24 topics, one statement each
    assert min(sizes[t] for t in got) >= max(sizes[t] for t in sizes if t not in got)


def test_limit_per_subject_gives_equal_counts() -> None:
    per = load_suite("arabic-mmlu", BENCH, limit=2, limit_per="subject", seed=1)
    assert len(per) == 114 and all(n == 2 for n in Counter(i.subject for i in per).values())
    assert per == load_suite("arabic-mmlu", BENCH, limit=2, limit_per="subject", seed=1)
    exams = load_suite("exams", BENCH)
    few = [i for i in exams if i.subject in ("Physics", "Biology")]
    alone = apply_limit(few, 3, "subject", seed=1)  # a subject's draw does not depend on the others
    assert [i for i in apply_limit(exams, 3, "subject", seed=1) if i.subject in ("Physics", "Biology")] == alone
    assert apply_limit(exams, None, "total") == exams


def test_sample_summary_lists_the_ids() -> None:
    population = load_suite("exams", BENCH)
    sample = apply_limit(population, 20, "total", seed=5)
    s = sample_summary(population, sample, 20, "total", 5)
    assert s["ids"] == [i.id for i in sample] and s["seed"] == 5 and s["drawn"] == 20
    assert s["subjects_covered"] == "5/5" and s["per_subject"]["Social"] == [10, 272]  # 20 * 272/537 = 10.1
    assert "proportional" in s["rule"]


class FakeS3:
    """An ObjectStore over the local folder, recording what was opened."""

    def __init__(self, root: Path) -> None:
        self.root, self.opened = root, []

    def open(self, uri: str) -> IO[bytes]:
        assert uri.startswith("s3://bench/acegpt/")
        self.opened.append(uri)
        return (self.root / uri.removeprefix("s3://bench/acegpt/")).open("rb")


def test_object_store_source_matches_local() -> None:
    store = FakeS3(BENCH)
    for suite in ("exams", "acva", "vicuna-80"):
        assert load_suite(suite, "s3://bench/acegpt/", store=store) == load_suite(suite, BENCH)
    mmlu = load_suite("arabic-mmlu", "s3://bench/acegpt", "dev", store=store)
    assert mmlu == load_suite("arabic-mmlu", BENCH, "dev")
    assert "s3://bench/acegpt/MMLUArabic/dev/virology_dev.csv" in store.opened  # from the subject table


def test_bad_sources() -> None:
    with pytest.raises(ValueError, match="ObjectStore"):
        load_suite("exams", "s3://bench/acegpt")
    with pytest.raises(ValueError, match="unknown suite"):
        load_suite("mmlu", BENCH)
    with pytest.raises(ValueError, match="no community hub copy"):
        load_suite("vicuna-80", "hf://")
    with pytest.raises(FileNotFoundError):
        load_suite("arabic-mmlu", BENCH / "nowhere")
