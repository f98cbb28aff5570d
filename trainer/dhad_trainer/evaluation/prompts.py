"""Prompts in the AceGPT scripts' format, so `generate` numbers are comparable with the paper's.

MC: "فيما يلي أسئلة الاختيار من متعدد (مع الإجابات) حول <subject>", k solved dev examples
"سؤال: ...\\nA. ...\\nD. ...\\nإجابة: X", then the test question ending in "إجابة:". Zero-shot adds
AceGPT's instruction to answer with one of A-D without explanation. ACVA is asked for نعم/لا the same
way (AceGPT's released ACVA labels are نعم/لا). Open-ended questions are sent as they are.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from dhad_trainer.evaluation.loaders import ACVA, LETTERS, MMLU, NO, YES, EvalItem
from dhad_trainer.evaluation.mmlu_subjects import EXAMS_NAME_AR, SUBJECT_NAME_AR

ANSWER = "إجابة:"


def subject_name(item: EvalItem) -> str:
    names = SUBJECT_NAME_AR if item.suite == MMLU else EXAMS_NAME_AR
    return names.get(item.subject or "", (item.subject or "").replace("_", " "))


def _body(item: EvalItem) -> str:
    text = f"سؤال: {item.question}"
    if item.choices:
        text += "".join(f"\n{k}. {v}" for k, v in item.choices.items())
    return text


def shots_by_subject(dev: Sequence[EvalItem], k: int) -> dict[str | None, list[EvalItem]]:
    """The first k dev items of each subject/topic, in file order (AceGPT takes them sequentially)."""
    out: dict[str | None, list[EvalItem]] = defaultdict(list)
    for it in dev:
        if len(out[it.subject]) < k:
            out[it.subject].append(it)
    return out


def build_prompt(item: EvalItem, shots: Sequence[EvalItem] = ()) -> str:
    """The prompt for one item; ends with "إجابة:" for the MC and yes/no suites."""
    if item.answer is None and item.choices is None and item.suite != ACVA:
        return item.question  # open-ended
    if item.suite == ACVA:
        head = "فيما يلي عبارات صحيحة أو خاطئة" + (" (مع الإجابات)" if shots else "")
        tail = "" if shots else f"\nالرجاء الإجابة بـ '{YES}' أو '{NO}' دون شرح."
    else:
        head = (
            "فيما يلي أسئلة الاختيار من متعدد"
            + (" (مع الإجابات)" if shots else "")
            + f" حول {subject_name(item)}"
        )
        tail = "" if shots else "\nمن فضلك اختر إجابة واحدة من بين 'A، B، C، D' دون شرح."
    examples = "".join(f"{_body(s)}\n{ANSWER} {s.answer}\n\n" for s in shots)
    return f"{head}\n\n{examples}{_body(item)}{tail}\n{ANSWER}"


def continuations(item: EvalItem, target: str = "letter") -> dict[str, str]:
    """label -> continuation scored by `loglikelihood`: " A".." D" (or " <choice text>") or " نعم"/" لا"."""
    if item.suite == ACVA:
        return {YES: f" {YES}", NO: f" {NO}"}
    if not item.choices:
        raise ValueError(f"{item.suite}/{item.id}: open-ended items have no choices to score")
    if target == "text":
        return {k: f" {v}" for k, v in item.choices.items()}
    return {k: f" {k}" for k in LETTERS if k in item.choices}
