"""Quality gates for teacher responses (QualityGates): each verdict is a reason that stats.json counts.

A bad teacher answer trained on teaches the student to refuse, answer in English or stop mid-sentence,
so every response is checked; rejected ones are kept, with their reason, in a side file by the caller.
Checks run cheapest and most specific first, and only accepted responses enter the duplicate index, so
a refusal repeated 500 times is counted as 500 refusals, not one refusal and 499 duplicates.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from enum import StrEnum

from dhad_api.stages import QualityGates
from dhad_trainer.data.filters import arabic_ratio
from dhad_trainer.data.normalize import TASHKEEL, TATWEEL, match_words


class Reject(StrEnum):
    """Why a response was not kept; the values are the keys of `rejected` in stats.json."""

    EMPTY = "empty"
    TRUNCATED = "truncated"
    PROMPT_COPY = "prompt_copy"
    REFUSAL = "refusal"
    NOT_ARABIC = "not_arabic"
    DUPLICATE = "duplicate"


# Matched (case-insensitively) against the response start with harakat and tatweel removed, so patterns
# need not spell out tanwin (عذرًا) and a quoted "لا أستطيع" deep inside a story does not count.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"^\W*(عذرا|[اأ]سف|[اأ]عتذر|معذرة|للاسف|للأسف)\W+(و?لكن(ني)?\s+)?(لا|لن)\s+(يمكنني|[اأ]ستطيع|[اأ]قدر)",
    r"(لا|لن)\s+(يمكنني|[اأ]ستطيع)\s+(المساعدة|مساعدتك|تقديم|الإجابة|الاجابة|تلبية|تنفيذ)",
    r"(لست|غير)\s+قادر[اةً]?\s+على\s+(المساعدة|مساعدتك|تقديم|الإجابة|الاجابة|تلبية)",
    r"(بصفتي|بوصفي|كوني|ك)\s*(نموذج|مساعد|ذكاء)ا?\s*(لغوي|ذكاء|ا?صطناعي|رقمي)",
    r"^\W*(I'?m|I am)\s+(sorry|afraid|unable|not able)\b",
    r"\bI\s+(can(no|')?t|cannot|won'?t|am unable to)\s+(help|assist|provide|comply|answer|do that)",
    r"\bas an AI\b",
)
REFUSAL_WINDOW = 400  # characters from the start that refusal patterns see
COPY_SIMILARITY = 0.9  # word-level similarity at which a response counts as the prompt repeated
_STRIP = str.maketrans({ord(c): None for c in TASHKEEL + TATWEEL})


def _digest(words: list[str]) -> bytes:
    """Digest of the spelling-normalised words, so whitespace, harakat and alef forms do not matter."""
    return hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=16).digest()


class Gates:
    """Applies one QualityGates spec; `check` remembers accepted responses for deduplication."""

    def __init__(self, spec: QualityGates) -> None:
        self.spec = spec
        try:
            self._refusal = re.compile(
                "|".join(f"(?:{p})" for p in (*REFUSAL_PATTERNS, *spec.refusal_patterns)), re.IGNORECASE
            )
        except re.error as err:
            raise ValueError(f"quality.refusalPatterns: invalid regular expression: {err}") from None
        self._seen: set[bytes] = set()

    def is_refusal(self, text: str) -> bool:
        return self._refusal.search(text[:REFUSAL_WINDOW].translate(_STRIP)) is not None

    def check(self, response: str, prompt: str, finish_reason: str | None) -> Reject | None:
        """The first failing gate, or None (then the response is remembered for deduplication)."""
        words = match_words(response)
        if not words:
            return Reject.EMPTY
        if self.spec.drop_truncated and finish_reason == "length":
            return Reject.TRUNCATED
        if is_copy(words, match_words(prompt)):
            return Reject.PROMPT_COPY
        if self.is_refusal(response):
            return Reject.REFUSAL
        if arabic_ratio(response) < self.spec.min_arabic_ratio:
            return Reject.NOT_ARABIC
        if self.spec.deduplicate:
            key = _digest(words)
            if key in self._seen:
                return Reject.DUPLICATE
            self._seen.add(key)
        return None


def is_copy(response_words: list[str], prompt_words: list[str]) -> bool:
    """The prompt echoed back (maybe with a word added or dropped) rather than answered."""
    if not prompt_words:
        return False
    if response_words == prompt_words:
        return True
    if len(response_words) > 1.25 * len(prompt_words) + 2:
        return False
    matcher = difflib.SequenceMatcher(None, prompt_words, response_words, autojunk=False)
    return matcher.ratio() >= COPY_SIMILARITY
