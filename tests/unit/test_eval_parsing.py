"""Answer parsing traps: whole words only, tolerant of marks and answer prefixes, never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhad_trainer.evaluation.parsing import NO, YES, first_line, parse_answer, parse_choice, parse_yes_no


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("نعم", YES),
        ("لا", NO),
        ("لا.", NO),
        ("لا!", NO),
        ("نعم، هذه العبارة صحيحة", YES),
        ("الإجابة: نعم", YES),
        ("الجواب هو لا", NO),
        ("الإجابة الصحيحة هي: لا", NO),
        ("نَعَمْ", YES),  # tashkeel
        ("لَا", NO),
        ("نـــعـــم", YES),  # tatweel
        ("\ufefb", NO),  # the lam-alef ligature
        ("\n\n   لا\nنعم", NO),  # first non-empty line only
        ("صحيح", YES),
        ("خطأ، لم يحدث ذلك", NO),
        ("كلا", NO),
        ("Yes.", YES),
        ("ج: نعم", YES),
        ("أعتقد أن الجواب نعم", YES),
    ],
)
def test_yes_no_parsed(text: str, expected: str) -> None:
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "الإسلام دين التوحيد",  # contains لا inside a word
        "لاعب كرة القدم",
        "السلام عليكم",
        "الأفلام العربية",
        "ولا",  # conjunction-prefixed, not a standalone لا
        "لا أعرف",  # abstention, not a "no"
        "لا أدري الجواب",
        "هذه العبارة",
        "",
        "   \n  \n",
        "نعمة من الله",  # نعم inside a word
    ],
)
def test_yes_no_unparseable(text: str) -> None:
    assert parse_yes_no(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("الإجابة: ب", "B"),
        ("(ب)", "B"),
        ("ب.", "B"),
        ("ب) الخيار الثاني", "B"),
        ("Answer: C", "C"),
        ("C", "C"),
        ("(c)", "C"),
        ("الإجابة الصحيحة هي د لأن", "D"),
        ("أ", "A"),
        ("إجابة: ا", "A"),  # hamza dropped
        ("إ", "A"),
        ("ج", "C"),
        ("ج: ب", "B"),  # ج: abbreviates الجواب
        ("A good answer here is (C)", "C"),  # a marked letter beats a bare one
        ("B\nA", "B"),
        ("الإجابة: بَ", "B"),  # diacritic on the letter
        ("  \n D. 42", "D"),
    ],
)
def test_choice_parsed(text: str, expected: str) -> None:
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text",
    ["Because", "باب", "أبجد", "دجاج", "the answer is a matter of taste", "cdba", "E", "", "لا أعرف"],
)
def test_letters_inside_words_not_matched(text: str) -> None:
    assert parse_choice(text) is None


def test_choice_by_text_needs_a_unique_exact_match() -> None:
    choices = {"A": "القاهرة", "B": "دمشق", "C": "بغداد", "D": "الرباط"}
    assert parse_choice("دِمَشق.", choices) == "B"
    assert parse_choice("مدينة دمشق", choices) is None


def test_dispatch_and_first_line() -> None:
    assert parse_answer("acva", "نعم") == YES
    assert parse_answer("arabic-mmlu", "ب") == "B"
    assert parse_answer("exams", "(D)") == "D"
    assert parse_answer("vicuna-80", "نعم") is None
    assert first_line("\n \n  x y \n z") == "x y"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=60))
def test_parsers_never_raise(text: str) -> None:
    assert parse_yes_no(text) in (YES, NO, None)
    assert parse_choice(text, {"A": "x", "B": text[:5]}) in ("A", "B", "C", "D", None)


def test_non_strings_are_unparseable() -> None:
    assert parse_yes_no(None) is None
    assert parse_choice(42) is None
