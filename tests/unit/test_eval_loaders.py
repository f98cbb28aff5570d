"""Loaders on the real AceGPT files (read in place from shared/, never copied)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import IO

import pytest

from dhad_trainer.evaluation.loaders import NO, YES, EvalItem, apply_limit, load_suite
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


def test_limit_per_subject_and_total_is_deterministic() -> None:
    per = load_suite("arabic-mmlu", BENCH, limit=2)
    assert len(per) == 114 and all(n == 2 for n in Counter(i.subject for i in per).values())
    assert per == load_suite("arabic-mmlu", BENCH, limit=2)
    total = load_suite("acva", BENCH, limit=10, limit_per="total")
    assert [i.id for i in total] == [i.id for i in load_suite("acva", BENCH)[:10]]
    assert len(load_suite("acva", BENCH, limit=1)) == 58
    assert apply_limit(total, None, "total") == total


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
