"""Answer parsing traps: whole words only, tolerant of marks and answer prefixes, never raises."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhad_trainer.evaluation.parsing import (
    ABSTAINED,
    HEDGED,
    LEFTOVER,
    NO,
    NO_ANSWER,
    OK,
    YES,
    first_line,
    parse_answer,
    parse_choice,
    parse_choice_detail,
    parse_detail,
    parse_yes_no,
    parse_yes_no_detail,
)


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


# Hedges: two or more different options named, none marked as the answer (the module docstring's rule).
@pytest.mark.parametrize(
    "text",
    [
        "A, B, C, D",  # all four: credited whenever A was right under the first-letter rule
        "A, B, C",
        "أ و ب",
        "أ أو ب",
        "ب، ج",
        "A/B",
        "A and C",
        "(A) or (B)",
        "الإجابة: أ أو ب",  # the marker is followed by a list, not by one option
        "B. A is wrong",  # being first is not a mark when another option is named
        "الإجابة هي أ والإجابة هي ب",  # two marked answers
    ],
)
def test_choice_hedges_are_unparseable(text: str) -> None:
    assert parse_choice_detail(text) == (None, HEDGED)


# Several options named, one of them marked as the answer.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("الخيار أ خاطئ والإجابة هي ب", "B"),  # an option noun names; "هي" marks
        ("ليس أ بل الإجابة هي ج", "C"),
        ("A good answer here is (C)", "C"),
        ("The answer is D, not A", "D"),
        ("B, B", "B"),  # one option named twice is no hedge
    ],
)
def test_choice_one_marked_among_several(text: str, expected: str) -> None:
    assert parse_choice_detail(text) == (expected, OK)


# A single letter counts only where the rules say so: first token, right after an answer marker, or a label.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("كلام لا معنى له هنا ثم ب", None),  # left over at the end of noise
        ("ثم ثم ثم د", None),
        ("نص عشوائي A", None),
        ("الطقس جميل اليوم ج", None),
        ("أعتقد أنها ب", "B"),  # after an answer marker
        ("The answer is C", "C"),
        ("الخيار ج", "C"),  # a leading option noun is skipped: ج is the first content token
        ("اخترت [C]", "C"),  # written as a label
        ("نص ما (ب)", "B"),
        ("c. something", "C"),  # a lower-case first token is a letter only when marked
        ("ب", "B"),
    ],
)
def test_single_letter_rules(text: str, expected: str | None) -> None:
    got = parse_choice_detail(text)
    assert got == ((expected, OK) if expected else (None, LEFTOVER))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("نعم أو لا", (None, HEDGED)),
        ("لا أو نعم", (None, HEDGED)),
        ("نعم/لا", (None, HEDGED)),
        ("Yes or no", (None, HEDGED)),
        ("صح أو خطأ", (None, HEDGED)),
        ("الإجابة: نعم أو لا", (None, HEDGED)),
        ("نعم، لا شك في ذلك", (YES, OK)),  # a comma does not offer alternatives; لا negates شك
        ("لا، هذه العبارة خاطئة", (NO, OK)),
        ("لا أعرف", (None, ABSTAINED)),
        ("العبارة", (None, NO_ANSWER)),
    ],
)
def test_yes_no_hedges_and_reasons(text: str, expected: tuple) -> None:
    assert parse_yes_no_detail(text) == expected


def test_detail_dispatch_and_abstention_in_mc() -> None:
    assert parse_detail("exams", "لا أعرف") == (None, ABSTAINED)
    assert parse_detail("acva", "نعم") == (YES, OK)
    assert parse_detail("vicuna-80", "نعم") == (None, NO_ANSWER)


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
