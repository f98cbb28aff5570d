"""Quality gates of the respond stage: each gate on its own, with edge cases."""

from __future__ import annotations

import pytest

from dhad_api.stages import QualityGates
from dhad_trainer.llm.quality import Gates, Reject, is_copy

GOOD = "الماء ضروري للجسم لأنه ينظم الحرارة ويساعد على الهضم ونقل الغذاء إلى الخلايا."
PROMPT = "ما فوائد شرب الماء بانتظام؟"


def check(text: str, finish: str | None = "stop", prompt: str = PROMPT, **spec) -> Reject | None:
    return Gates(QualityGates(**spec)).check(text, prompt, finish)


@pytest.mark.parametrize("text", [
    "عذرًا، لا يمكنني المساعدة في هذا الطلب.",
    "أعتذر، لكنني لا أستطيع تقديم هذه المعلومات.",
    "للأسف لا يمكنني الإجابة عن هذا السؤال.",
    "بصفتي نموذجًا لغويًا، لا أملك آراء شخصية.",
    "لست قادرًا على المساعدة في ذلك.",
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "As an AI, I do not have opinions.",
])
def test_refusals_are_caught_in_arabic_and_english(text):
    assert check(text) is Reject.REFUSAL


def test_refusal_phrase_deep_inside_an_answer_is_not_a_refusal():
    story = GOOD + " " + "ويحكى أن رجلًا كان يكرر دائمًا قوله لجاره. " * 12 + "قال: لا أستطيع المساعدة اليوم."
    assert check(story) is None


def test_extra_refusal_patterns_are_added_and_bad_ones_are_a_clear_error():
    assert check("هذا السؤال خارج نطاق عملي تمامًا ولا أجيب عنه.") is None
    assert check("هذا السؤال خارج نطاق عملي تمامًا ولا أجيب عنه.", refusal_patterns=["خارج نطاق عملي"]) is Reject.REFUSAL
    with pytest.raises(ValueError, match="refusalPatterns"):
        Gates(QualityGates(refusal_patterns=["(unclosed"]))


def test_arabic_ratio_threshold():
    assert check("Sure, here is the answer in English.") is Reject.NOT_ARABIC
    mixed = "استخدم الأمر git status لمعرفة حالة المستودع."  # mostly Arabic with a command
    assert check(mixed) is None
    assert check(mixed, min_arabic_ratio=1.0) is Reject.NOT_ARABIC
    assert check("Sure, in English.", min_arabic_ratio=0.0) is None


def test_truncated_only_when_drop_truncated():
    assert check(GOOD, "length") is Reject.TRUNCATED
    assert check(GOOD, "length", drop_truncated=False) is None


@pytest.mark.parametrize("text", ["", "   \n", "...!!", "؟؟"])
def test_empty_responses(text):
    assert check(text) is Reject.EMPTY


def test_prompt_copies():
    assert check(PROMPT) is Reject.PROMPT_COPY
    assert check("  ما فوائدُ شربِ الماءِ بانتظام  ") is Reject.PROMPT_COPY  # harakat and punctuation differ
    assert check("إجابة: ما فوائد شرب الماء بانتظام؟") is Reject.PROMPT_COPY  # an echo is not an answer
    assert check(PROMPT + " " + GOOD) is None  # restating the question before answering is fine
    assert not is_copy(["a"], [])


def test_duplicates_after_normalisation_and_only_among_accepted():
    gates = Gates(QualityGates())
    refusal = "عذرًا، لا يمكنني المساعدة في هذا الطلب."
    assert gates.check(refusal, PROMPT, "stop") is Reject.REFUSAL
    assert gates.check(refusal, PROMPT, "stop") is Reject.REFUSAL  # not "duplicate": it never got in
    assert gates.check(GOOD, PROMPT, "stop") is None
    variant = "  الماءُ ضروريٌّ للجسم لأنه ينظم الحرارة\nويساعد على الهضم ونقل الغذاء إلى الخلايا "
    assert gates.check(variant, "سؤال آخر", "stop") is Reject.DUPLICATE
    off = Gates(QualityGates(deduplicate=False))
    assert off.check(GOOD, PROMPT, "stop") is None and off.check(GOOD, PROMPT, "stop") is None
