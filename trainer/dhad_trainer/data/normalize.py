"""Arabic orthographic normalization (per NormalizationSpec) and the matching key dedup/decontam compare.

All character edits are folded into one `str.translate` table so a document is scanned once; NFKC can
compose new characters after a deletion (alef + tatweel + hamza-above), so when NFKC is on the steps
repeat until the text is NFKC-stable, which makes every normalizer idempotent.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

from dhad_api.data_prep import DigitStyle, NormalizationSpec

ALEF = "\u0627"
ALEF_VARIANTS = "\u0623\u0625\u0622\u0671\u0672\u0673"  # أ إ آ ٱ and the wavy-hamza alefs
ALEF_MAQSURA, YA = "\u0649", "\u064a"
TA_MARBUTA, HA = "\u0629", "\u0647"
TATWEEL = "\u0640"
ARABIC_INDIC_DIGITS = "\u0660\u0661\u0662\u0663\u0664\u0665\u0666\u0667\u0668\u0669"
PERSIAN_DIGITS = "\u06f0\u06f1\u06f2\u06f3\u06f4\u06f5\u06f6\u06f7\u06f8\u06f9"
WESTERN_DIGITS = "0123456789"


def _chars(*ranges: tuple[int, int]) -> str:
    return "".join(chr(c) for lo, hi in ranges for c in range(lo, hi + 1))


# Harakat (fatha..sukun, tanwin, shadda), madda/hamza marks and other combining marks of the Arabic
# block, superscript alef, and the Quranic annotation signs; not the letters ۥ ۦ (U+06E5/6).
TASHKEEL = _chars(
    (0x0610, 0x061A),
    (0x064B, 0x065F),
    (0x0670, 0x0670),
    (0x06D6, 0x06DC),
    (0x06DF, 0x06E4),
    (0x06E7, 0x06E8),
    (0x06EA, 0x06ED),
)

_NOT_NEWLINE_SPACE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NEWLINE = re.compile(r" ?\n ?")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_WORD = re.compile(r"\w+")


def _table(spec: NormalizationSpec) -> dict[int, str | None]:
    table: dict[int, str | None] = {}
    if spec.remove_tashkeel:
        table.update({ord(c): None for c in TASHKEEL})
    if spec.remove_tatweel:
        table[ord(TATWEEL)] = None
    if spec.unify_alef:
        table.update({ord(c): ALEF for c in ALEF_VARIANTS})
    if spec.alef_maqsura_to_ya:
        table[ord(ALEF_MAQSURA)] = YA
    if spec.ta_marbuta_to_ha:
        table[ord(TA_MARBUTA)] = HA
    if spec.arabic_indic_digits is DigitStyle.WESTERN:
        table.update({ord(a): w for a, w in zip(ARABIC_INDIC_DIGITS, WESTERN_DIGITS, strict=True)})
        table.update({ord(p): w for p, w in zip(PERSIAN_DIGITS, WESTERN_DIGITS, strict=True)})
    elif spec.arabic_indic_digits is DigitStyle.ARABIC_INDIC:
        table.update({ord(w): a for w, a in zip(WESTERN_DIGITS, ARABIC_INDIC_DIGITS, strict=True)})
        table.update({ord(p): a for p, a in zip(PERSIAN_DIGITS, ARABIC_INDIC_DIGITS, strict=True)})
    return table


def collapse_whitespace(text: str) -> str:
    """Runs of horizontal space -> one space; lines trimmed; at most one blank line; ends trimmed."""
    text = _NOT_NEWLINE_SPACE.sub(" ", text.replace("\r\n", "\n"))
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def make_normalizer(spec: NormalizationSpec | None = None) -> Callable[[str], str]:
    """A fast `str -> str` normalizer for `spec` (translate table built once)."""
    spec = spec or NormalizationSpec()
    table = _table(spec)

    def once(text: str) -> str:
        if spec.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if table:
            text = text.translate(table)
        if spec.collapse_whitespace:
            text = collapse_whitespace(text)
        return text

    def normalize(text: str) -> str:
        text = once(text)
        # Deleting marks/tatweel or trimming can expose a new NFKC composition; a few rounds settle it.
        for _ in range(4):
            if not spec.nfkc or unicodedata.is_normalized("NFKC", text):
                break
            text = once(text)
        return text

    return normalize


def normalize(text: str, spec: NormalizationSpec | None = None) -> str:
    """Normalize one text; build a normalizer with `make_normalizer` for many."""
    return make_normalizer(spec)(text)


# The matching key: every spelling variant unified, marks dropped, digits western, case folded, and
# hamza carriers ؤ ئ reduced to و ي, so "the same text spelled differently" compares equal.
_MATCH_SPEC = NormalizationSpec(
    unify_alef=True,
    alef_maqsura_to_ya=True,
    ta_marbuta_to_ha=True,
    remove_tashkeel=True,
    remove_tatweel=True,
    arabic_indic_digits=DigitStyle.WESTERN,
    nfkc=True,
    collapse_whitespace=False,
)
_match_normalize = make_normalizer(_MATCH_SPEC)
_HAMZA_CARRIERS = str.maketrans({"\u0624": "\u0648", "\u0626": YA})


def match_words(text: str) -> list[str]:
    """The words (runs of letters/digits) of the aggressive matching normalization of `text`."""
    return _WORD.findall(_match_normalize(text).translate(_HAMZA_CARRIERS).casefold())
