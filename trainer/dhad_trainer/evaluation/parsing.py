"""Answer parsing from the first non-empty line of a model output, as whole words only.

The original AceGPT scorer searched `لا` as a substring, so `الإسلام` or `لاعب` read as "no", and any
other answer crashed it. Here every parser returns a label or None (unparseable, scored as wrong and
counted), and never raises.

Decisions:
- Text is NFKC-folded (the ﻻ ligature becomes لا), tashkeel and tatweel are removed, then split into
  tokens of letters/digits, so a label must be a whole token: never a piece of another word.
- Leading answer markers are skipped: "الإجابة:", "الجواب هو", "الإجابة الصحيحة هي", "Answer:".
- Yes/no: the first content token decides when it is a yes/no word (نعم, لا, كلا, yes, no, and the
  true/false words صح/صحيح/صحيحة, خطأ/خاطئ/خاطئة that ACVA's "TF" statements invite). Otherwise the
  first whole-word نعم/لا/yes/no anywhere on the line decides. "لا" followed by an abstention verb
  (لا أعرف, لا أدري, لا يمكن ...) is not a "no": it is unparseable.
- Letters: Latin A-D (upper case; lower case only when marked, e.g. "(c)") and Arabic أ/ب/ج/د. Bare
  alef ا and إ/آ are accepted for أ: models often drop the hamza and a lone alef has no other use as a
  token. A marked letter ("(ب)", "ب)", "ب.", "C:", or a letter alone on the line / right after an
  answer marker) wins over a bare one, so "A good choice is (C)" is C; otherwise the first bare
  letter token counts ("الإجابة هي ب" is B). "ج:" followed by more text is the usual abbreviation of
  الجواب, an answer marker, not the letter C. With the choices given, a line equal to one choice's text
  (after folding) also parses to its letter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dhad_trainer.evaluation.arabic import fold, strip_marks, unify_alef

YES, NO = "نعم", "لا"
LETTERS = ("A", "B", "C", "D")

_TOKEN = re.compile(r"[^\W_]+")


def _key(token: str) -> str:
    """Token comparison key: alef unified, ta marbuta/alef maqsura folded, case folded."""
    return unify_alef(token).replace("ة", "ه").replace("ى", "ي").casefold()


def _keys(*words: str) -> frozenset[str]:
    return frozenset(_key(w) for w in words)


_LEAD = _keys(
    "الإجابة",
    "إجابة",
    "الجواب",
    "جواب",
    "الإجابه",
    "الصحيحة",
    "الصحيح",
    "هي",
    "هو",
    "إن",
    "answer",
    "the",
    "is",
    "correct",
    "final",
    "الخيار",
    "option",
    "choice",
)
_YES_STRONG, _NO_STRONG = _keys("نعم", "yes"), _keys("لا", "no", "كلا")
_YES_FIRST = _YES_STRONG | _keys("صح", "صحيح", "صحيحة", "true")
_NO_FIRST = _NO_STRONG | _keys("خطأ", "خطا", "خاطئ", "خاطئة", "false")
_ABSTAIN = _keys(
    "أعرف", "أعلم", "أدري", "يمكن", "يمكنني", "أستطيع", "استطيع", "أملك", "توجد", "يوجد", "know", "sure"
)
_ARABIC_LETTERS = {"أ": "A", "ا": "A", "إ": "A", "آ": "A", "ب": "B", "ج": "C", "د": "D"}


def first_line(text: str) -> str:
    """The first line with any non-space character, stripped ("" when there is none)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _tokens(text: str) -> tuple[str, list[re.Match[str]]]:
    line = strip_marks(first_line(text))
    return line, list(_TOKEN.finditer(line))


def _skip_lead(tokens: list[re.Match[str]]) -> int:
    i = 0
    while i < len(tokens) and _key(tokens[i].group()) in _LEAD:
        i += 1
    return i


def parse_yes_no(text: object) -> str | None:
    """نعم, لا, or None when the first non-empty line holds no whole-word yes/no answer."""
    if not isinstance(text, str):
        return None
    _, toks = _tokens(text)
    keys = [_key(t.group()) for t in toks]

    def verdict(i: int, yes: frozenset[str], no: frozenset[str]) -> str | None:
        if keys[i] in yes:
            return YES
        if keys[i] in no:
            return None if i + 1 < len(keys) and keys[i + 1] in _ABSTAIN else NO
        return None

    start = _skip_lead(toks)
    if start < len(keys) and (found := verdict(start, _YES_FIRST, _NO_FIRST)):
        return found
    if start < len(keys) and keys[start] in _NO_STRONG:  # an abstention such as "لا أعرف"
        return None
    for i in range(start, len(keys)):
        if keys[i] in _YES_STRONG or keys[i] in _NO_STRONG:
            return verdict(i, _YES_STRONG, _NO_STRONG)
    return None


def _letter(token: str, lower_ok: bool) -> str | None:
    if token in LETTERS:
        return token
    if lower_ok and token.upper() in LETTERS:
        return token.upper()
    return _ARABIC_LETTERS.get(token)


def parse_choice(text: object, choices: Mapping[str, str] | None = None) -> str | None:
    """A-D from the first non-empty line, or None. See the module docstring for the rules."""
    if not isinstance(text, str):
        return None
    line, toks = _tokens(text)
    start = _skip_lead(toks)
    bare: str | None = None
    for i, t in enumerate(toks):
        if len(t.group()) != 1:
            continue
        before = line[: t.start()].rstrip()[-1:]
        after = line[t.end() :].lstrip()[:1]
        if t.group() == "ج" and after == ":" and i + 1 < len(toks):  # "ج:" abbreviates الجواب
            start = i + 1 if i == start else start
            continue
        punct = (before == "(" and after == ")") or after in (")", ".", ":", "-", "]")
        alone = i == start and (i == len(toks) - 1 or i > 0)
        letter = _letter(t.group(), lower_ok=punct)
        if letter is None:
            continue
        if punct or alone:
            return letter
        bare = bare or letter
    if bare:
        return bare
    if choices:
        target = fold(first_line(text)).rstrip(".。")
        hits = [k for k, v in choices.items() if fold(v) == target]
        if len(hits) == 1:
            return hits[0]
    return None


def parse_answer(suite: str, text: object, choices: Mapping[str, str] | None = None) -> str | None:
    """Dispatch on the suite: ACVA is yes/no, the MC suites are letters, open-ended has no label."""
    if suite == "acva":
        return parse_yes_no(text)
    if suite in ("arabic-mmlu", "exams"):
        return parse_choice(text, choices)
    return None
