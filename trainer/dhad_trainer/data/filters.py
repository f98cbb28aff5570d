"""Document quality filters: UTF-8 validity, length, Arabic-script share, language and repetition.

Each check returns the drop reason (a `DropReason` value, also the key in stats.json) or None, so the
pipeline can count exactly why every document went.
"""

from __future__ import annotations

from collections import Counter
from enum import StrEnum

from dhad_api.data_prep import FilterSpec

# Arabic, Arabic Supplement, Arabic Extended-A/B and the two presentation-form blocks.
_ARABIC_RANGES = ((0x0600, 0x06FF), (0x0750, 0x077F), (0x0870, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF))


class DropReason(StrEnum):
    """Why a record was dropped; the values are the keys of `dropped` in stats.json."""

    BAD_RECORD = "bad_record"
    BAD_UTF8 = "bad_utf8"
    TOO_SHORT = "too_short"
    TOO_LONG = "too_long"
    LOW_ARABIC_RATIO = "low_arabic_ratio"
    LANGUAGE = "language"
    REPETITIVE = "repetitive"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    CONTAMINATED = "contaminated"


def is_arabic_char(ch: str) -> bool:
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in _ARABIC_RANGES)


def arabic_ratio(text: str) -> float:
    """Share of letters (str.isalpha) that are Arabic script; 0.0 for a text with no letters."""
    letters = arabic = 0
    for ch in text:
        if ch.isalpha():
            letters += 1
            if "\u0600" <= ch <= "\u06ff" or is_arabic_char(ch):
                arabic += 1
    return arabic / letters if letters else 0.0


def decode_utf8(raw: str | bytes, drop_bad: bool = True) -> str | None:
    """Text of a record: str passes through; bytes are decoded strictly, or with U+FFFD if not
    `drop_bad`. None means "invalid UTF-8, drop it"."""
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None if drop_bad else raw.decode("utf-8", errors="replace")


def duplicate_line_ratio(text: str) -> float:
    """Share of non-blank lines that repeat an earlier line (boilerplate, menus, spam)."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    if len(lines) < 2:
        return 0.0
    return 1.0 - len(set(lines)) / len(lines)


def repeated_ngram_ratio(words: list[str], n: int) -> float:
    """Share of word positions covered by a word n-gram that occurs more than once in the text."""
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(covered) / len(words)


def repetition_ratio(text: str, n: int = 5) -> float:
    """The larger of the duplicated-line share and the repeated-n-gram word share."""
    return max(duplicate_line_ratio(text), repeated_ngram_ratio(text.split(), n))


def check(text: str, spec: FilterSpec, language: tuple[str, float] | None = None) -> DropReason | None:
    """First failing filter for an already-normalized text, cheapest first; None keeps it.

    `language` is the text's (code, probability) when already identified; otherwise it is identified
    here when `spec.languages` asks for it.
    """
    n = len(text)
    if n == 0 or n < spec.min_chars:
        return DropReason.TOO_SHORT
    if n > spec.max_chars:
        return DropReason.TOO_LONG
    if spec.min_arabic_ratio > 0 and arabic_ratio(text) < spec.min_arabic_ratio:
        return DropReason.LOW_ARABIC_RATIO
    if spec.languages:
        if language is None:
            from dhad_trainer.data.language import identify

            language = identify(text)
        code, confidence = language
        if code not in spec.languages or confidence < spec.min_language_confidence:
            return DropReason.LANGUAGE
    if spec.max_repetition_ratio < 1 and repetition_ratio(text, spec.repetition_ngram_words) > (
        spec.max_repetition_ratio
    ):
        return DropReason.REPETITIVE
    return None
