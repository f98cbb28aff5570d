"""Arabic text folding shared by answer parsing and duplicate detection.

Kept local to the evaluation package so scoring does not change when the data-prep normalizer is tuned:
a benchmark score must mean the same thing across training runs.
"""

from __future__ import annotations

import re
import unicodedata

# Harakat, tanwin, shadda, sukun, superscript alef, Quranic marks, and tatweel (kashida).
_MARKS = re.compile(
    "[\u0610-\u061a\u064b-\u065f\u0670\u06d6-\u06dc\u06df-\u06e4\u06e7\u06e8\u06ea-\u06ed\u0640]"
)
_ALEF = str.maketrans({"\u0623": "\u0627", "\u0625": "\u0627", "\u0622": "\u0627", "\u0671": "\u0627"})


def strip_marks(text: str) -> str:
    """NFKC (so presentation forms such as the lam-alef ligature become letters), then drop
    tashkeel and tatweel, which never change which word a model wrote."""
    return _MARKS.sub("", unicodedata.normalize("NFKC", text))


def unify_alef(text: str) -> str:
    """أ إ آ ٱ -> ا: hamza seats are written inconsistently by models and translators alike."""
    return text.translate(_ALEF)


def fold(text: str) -> str:
    """The comparison key: marks stripped, alef unified, case folded, whitespace collapsed."""
    return " ".join(unify_alef(strip_marks(text)).casefold().split())
