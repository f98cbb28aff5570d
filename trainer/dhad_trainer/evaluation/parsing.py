"""Answer parsing from the first non-empty line of a model output, as whole words only.

The original AceGPT scorer searched `لا` as a substring, so `الإسلام` or `لاعب` read as "no", and any
other answer crashed it. Here every parser returns a label or None (unparseable, scored as wrong and
counted with its reason), and never raises. `parse_detail` gives the reason; the report counts them.

Common to both:
- Only the first non-empty line is read. It is NFKC-folded (the ﻻ ligature becomes لا), tashkeel and
  tatweel are removed, then split into tokens of letters/digits, so a label must be a whole token.
- Leading answer markers are skipped: "الإجابة:", "الجواب هو", "الإجابة الصحيحة هي", "Answer:",
  "الخيار", "ج:" (the usual abbreviation of الجواب).

Yes/no (ACVA):
- The first content token decides when it is a yes/no word (نعم, لا, كلا, yes, no, and the
  true/false words صح/صحيح/صحيحة, خطأ/خاطئ/خاطئة that ACVA's "TF" statements invite). Otherwise the
  first whole-word نعم/لا/yes/no anywhere on the line decides.
- "لا" followed by an abstention verb (لا أعرف, لا أدري, لا يمكن ...) is not a "no": it is
  unparseable ("abstained").
- Hedge: a yes word and a no word offered as alternatives, next to each other and joined by a
  conjunction or a slash ("نعم أو لا", "نعم/لا", "yes or no", "صح أو خطأ"), is unparseable
  ("hedged"), wherever it stands on the line. A comma alone does not join them ("نعم، لا شك" is yes).

Letters (MMLU, EXAMS):
- A mention of an option is a one-character token: Latin A-D (upper case; lower case only as a label
  such as "(c)" or as the first token followed by "." or ":", "c. ..."), or Arabic أ/ب/ج/د, with bare
  alef ا and إ/آ read as أ (models drop the hamza and a lone alef has no other use as a token).
- A mention is *eligible* when it is the first content token of the line ("B", "ب. اثنان",
  "الإجابة: ب"), when it directly follows an answer marker (الإجابة, الجواب, هي, هو, أنها, answer,
  is ...: "الإجابة الصحيحة هي د", "The answer is C"), or when it is written as a label: "(ب)",
  "[B]", "C)". Option nouns (الخيار, option, choice) name an option without answering, so
  "الخيار أ خاطئ" does not make أ eligible.
- One letter named (any number of times): it is the answer if one of its mentions is eligible;
  otherwise it is a leftover ("leftover", unparseable): a single letter at the end of text that
  does not say it is the answer ("كلام لا معنى له ثم ب") is noise, not an answer.
- Two or more different letters named: mentions joined only by separators (spaces, punctuation,
  و, أو, or, and) form one list. The answer is the letter of the one list that directly follows an
  answer marker, when there is exactly one such list and it names one letter ("الخيار أ خاطئ
  والإجابة هي ب" is B; "A good answer here is (C)" is C). Anything else is a hedge ("hedged",
  unparseable): "A, B, C", "أ و ب", "الإجابة: أ أو ب", "B. A is wrong" (being first is not a mark
  when other options are named).
- No letter named: with the choices given, a line equal to one choice's text (after folding) parses
  to its letter; otherwise "no_answer".
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from dhad_trainer.evaluation.arabic import fold, strip_marks, unify_alef

YES, NO = "نعم", "لا"
LETTERS = ("A", "B", "C", "D")
OK, HEDGED, LEFTOVER, ABSTAINED, NO_ANSWER = "ok", "hedged", "leftover", "abstained", "no_answer"
REASONS = (HEDGED, LEFTOVER, ABSTAINED, NO_ANSWER)  # why an answer is unparseable

_TOKEN = re.compile(r"[^\W_]+")
_SEPARATOR = re.compile(r"^[\s,،؛;:./&+\-|()\[\]{}\"'«»*]*$")  # what may stand between listed options


class Parsed(NamedTuple):
    """A parsed answer: `label` (None when unparseable) and `reason` (OK or one of REASONS)."""

    label: str | None
    reason: str


def _key(token: str) -> str:
    """Token comparison key: alef unified, ta marbuta/alef maqsura folded, case folded."""
    return unify_alef(token).replace("ة", "ه").replace("ى", "ي").casefold()


def _keys(*words: str) -> frozenset[str]:
    return frozenset(_key(w) for w in words)


# Words that say "what follows is the answer".
_ANSWER_MARKERS = _keys(
    "الإجابة", "إجابة", "الجواب", "جواب", "الإجابه", "الصحيحة", "الصحيح", "هي", "هو", "إن", "أنها", "أنه",
    "answer", "is", "correct", "final",
)  # fmt: skip
_OPTION_NOUNS = _keys("الخيار", "الاختيار", "option", "choice", "the")
_LEAD = _ANSWER_MARKERS | _OPTION_NOUNS
_CONJUNCTIONS = _keys("و", "أو", "او", "or", "and", "ثم")
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


def _joined(line: str, tokens: list[re.Match[str]], i: int, j: int) -> bool:
    """Tokens i < j are joined only by separators and conjunctions (a list such as "أ، ب أو ج")."""
    between = [_key(t.group()) for t in tokens[i + 1 : j]]
    if any(k not in _CONJUNCTIONS for k in between):
        return False
    gaps = [line[a.end() : b.start()] for a, b in zip(tokens[i:j], tokens[i + 1 : j + 1], strict=True)]
    return all(_SEPARATOR.match(g) for g in gaps)


def _yes_no_hedge(line: str, toks: list[re.Match[str]], keys: list[str]) -> bool:
    """A yes word and a no word offered as alternatives: next to each other, joined by a conjunction
    or a slash ("نعم أو لا", "نعم/لا"). A comma alone does not join them: "نعم، لا شك" is a yes."""
    polar = [(i, k in _YES_FIRST) for i, k in enumerate(keys) if k in _YES_FIRST or k in _NO_FIRST]
    for (a, yes_a), (b, yes_b) in itertools.pairwise(polar):
        if yes_a != yes_b and _joined(line, toks, a, b):
            conjunction = any(_key(t.group()) in _CONJUNCTIONS for t in toks[a + 1 : b])
            if conjunction or "/" in line[toks[a].end() : toks[b].start()]:
                return True
    return False


def _abstains(keys: list[str], i: int) -> bool:
    """"لا أعرف", "لا أدري": a no word followed by an abstention verb."""
    return i + 1 < len(keys) and keys[i] in _NO_STRONG and keys[i + 1] in _ABSTAIN


def parse_yes_no_detail(text: object) -> Parsed:
    """نعم / لا with the reason when unparseable; see the module docstring for the rules."""
    if not isinstance(text, str):
        return Parsed(None, NO_ANSWER)
    line, toks = _tokens(text)
    keys = [_key(t.group()) for t in toks]
    start = _skip_lead(toks)
    if _yes_no_hedge(line, toks, keys):
        return Parsed(None, HEDGED)

    def verdict(i: int, yes: frozenset[str], no: frozenset[str]) -> Parsed | None:
        if keys[i] in yes:
            return Parsed(YES, OK)
        if keys[i] in no:
            return Parsed(None, ABSTAINED) if _abstains(keys, i) else Parsed(NO, OK)
        return None

    if start < len(keys) and (found := verdict(start, _YES_FIRST, _NO_FIRST)):
        return found
    for i in range(start, len(keys)):
        if keys[i] in _YES_STRONG or keys[i] in _NO_STRONG:
            return verdict(i, _YES_STRONG, _NO_STRONG) or Parsed(None, NO_ANSWER)
    return Parsed(None, NO_ANSWER)


def parse_yes_no(text: object) -> str | None:
    """نعم, لا, or None when the first non-empty line holds no whole-word yes/no answer."""
    return parse_yes_no_detail(text).label


@dataclass(frozen=True)
class _Mention:
    letter: str
    index: int  # token index
    eligible: bool
    after_marker: bool


def _letter(token: str, lower_ok: bool) -> str | None:
    if token in LETTERS:
        return token
    if lower_ok and token.upper() in LETTERS:
        return token.upper()
    return _ARABIC_LETTERS.get(token)


def _mentions(line: str, toks: list[re.Match[str]]) -> list[_Mention]:
    start = _skip_lead(toks)
    out = []
    for i, t in enumerate(toks):
        if len(t.group()) != 1:
            continue
        before = line[: t.start()].rstrip()[-1:]
        after = line[t.end() :].lstrip()[:1]
        if t.group() == "ج" and after == ":" and i + 1 < len(toks):  # "ج:" abbreviates الجواب
            if i == start:
                start = i + 1
            continue
        label = (before in "([" and after in ")]") or after == ")"
        first = i == start
        letter = _letter(t.group(), lower_ok=label or (first and after in (".", ":")))
        if letter is None:
            continue
        after_marker = i > 0 and _key(toks[i - 1].group()) in _ANSWER_MARKERS and _joined(line, toks, i - 1, i)
        out.append(_Mention(letter, i, first or label or after_marker, after_marker))
    return out


def parse_choice_detail(text: object, choices: Mapping[str, str] | None = None) -> Parsed:
    """A-D with the reason when unparseable; see the module docstring for the rules."""
    if not isinstance(text, str):
        return Parsed(None, NO_ANSWER)
    line, toks = _tokens(text)
    mentions = _mentions(line, toks)
    letters = {m.letter for m in mentions}
    if len(letters) == 1:
        if any(m.eligible for m in mentions):
            return Parsed(mentions[0].letter, OK)
        return Parsed(None, LEFTOVER)
    if len(letters) > 1:
        lists: list[list[_Mention]] = []
        for m in mentions:
            if lists and _joined(line, toks, lists[-1][-1].index, m.index):
                lists[-1].append(m)
            else:
                lists.append([m])
        marked = [group for group in lists if group[0].after_marker]
        if len(marked) == 1 and len({m.letter for m in marked[0]}) == 1:
            return Parsed(marked[0][0].letter, OK)
        return Parsed(None, HEDGED)
    if choices:
        target = fold(first_line(text)).rstrip(".。")
        hits = [k for k, v in choices.items() if fold(v) == target]
        if len(hits) == 1:
            return Parsed(hits[0], OK)
    if _abstains([_key(t.group()) for t in toks], _skip_lead(toks)):
        return Parsed(None, ABSTAINED)
    return Parsed(None, NO_ANSWER)


def parse_choice(text: object, choices: Mapping[str, str] | None = None) -> str | None:
    """A-D from the first non-empty line, or None. See the module docstring for the rules."""
    return parse_choice_detail(text, choices).label


def parse_detail(suite: str, text: object, choices: Mapping[str, str] | None = None) -> Parsed:
    """Dispatch on the suite: ACVA is yes/no, the MC suites are letters, open-ended has no label."""
    if suite == "acva":
        return parse_yes_no_detail(text)
    if suite in ("arabic-mmlu", "exams"):
        return parse_choice_detail(text, choices)
    return Parsed(None, NO_ANSWER)


def parse_answer(suite: str, text: object, choices: Mapping[str, str] | None = None) -> str | None:
    return parse_detail(suite, text, choices).label
