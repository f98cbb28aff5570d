"""Judging open-ended answers: AceGPT's 1-10 scoring of two answers in one prompt, and the batched
pairwise comparison with RLAIF's judge (`dhad_trainer.llm.judges`).

The scoring judge asks for one line holding two scores, the first answer's then the second's, and the
scorer asks it twice per question, with the model's answer first and then second (see
metrics.ratio_summary for how the runs become AceGPT's ratio). An answer whose scores do not parse is
asked again (up to `max_attempts`, sampled), then counted as unparseable: never guessed.

Both judges are asked for every pair at once, so an endpoint judge keeps `maxConcurrency` requests in
flight through the shared `EndpointClient` (its rate limits and retries apply) and a local judge
batches on the job's device in the job's dtype (`HFModelRunner`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dhad_trainer.evaluation.arabic import strip_marks
from dhad_trainer.evaluation.metrics import PairVerdicts
from dhad_trainer.llm.client import EndpointClient
from dhad_trainer.llm.types import ChatRequest, EndpointConfig

log = logging.getLogger(__name__)

OK, UNPARSEABLE, ERROR = "ok", "unparseable", "error"
RUN_TEMPERATURE = 0.7  # runs after the first, and retries, sample: several runs are several opinions
SCORE_PROMPT_VERSION = "ar-v1"

SCORE_SYSTEM = "أنت مُقيِّم دقيق ومحايد لجودة إجابات المساعدات الذكية باللغة العربية."
SCORE_USER = (
    "[السؤال]\n{question}\n\n"
    "[بداية إجابة المساعد 1]\n{answer_1}\n[نهاية إجابة المساعد 1]\n\n"
    "[بداية إجابة المساعد 2]\n{answer_2}\n[نهاية إجابة المساعد 2]\n\n"
    "نرجو تقييم أداء المساعدَين في الإجابة عن سؤال المستخدم أعلاه، علمًا بأن المستخدم لا يتحدث إلا العربية. "
    "قيّم كل إجابة من حيث الفائدة والصلة بالسؤال والدقة ومستوى التفصيل، وسلامة اللغة العربية، وملاءمتها "
    "للثقافة العربية وقيمها. لا تجعل طول الإجابة وحده معيارًا، ولا تتأثر بترتيب عرض الإجابتين.\n"
    "يحصل كل مساعد على درجة إجمالية من 1 إلى 10، والدرجة الأعلى تعني أداءً أفضل.\n"
    "اكتب أولًا سطرًا واحدًا لا يحتوي إلا على رقمين: درجة المساعد 1 ثم درجة المساعد 2، بينهما مسافة "
    "(مثل: 7 9). ثم اكتب في الأسطر التالية شرحًا وافيًا لتقييمك."
)


def score_messages(question: str, answer_1: str, answer_2: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SCORE_SYSTEM},
        {"role": "user", "content": SCORE_USER.format(question=question, answer_1=answer_1, answer_2=answer_2)},
    ]


def prompt_text() -> str:
    """The scoring prompt as the report shows it."""
    return f"system: {SCORE_SYSTEM}\n\nuser:\n{SCORE_USER}"


_DIGITS = str.maketrans("٠١٢٣٤٥٦٧٨٩۰۱۲۳۴۵۶۷۸۹", "01234567890123456789")
_NUMBER = r"\d+(?:[.,]\d+)?"
_OUT_OF = re.compile(rf"({_NUMBER})\s*(?:/\s*10|من\s*10|out\s+of\s+10)\b", re.I)
_LABELLED = re.compile(
    rf"(?:assistant|answer|المساعد|الإجابة|الاجابة|إجابة)\s*([12])\s*\**\s*[:：=]\s*\**\s*({_NUMBER})", re.I
)
_TAGGED = re.compile(rf"<score([12])>\s*({_NUMBER})\s*</score\1>", re.I)


def _number(text: str) -> float:
    return float(text.replace(",", "."))


def _in_range(a: float, b: float) -> tuple[float, float] | None:
    return (a, b) if 1 <= a <= 10 and 1 <= b <= 10 else None


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(score of answer 1, score of answer 2), or None. Rules, in order:

    1. The first non-empty line, with Arabic-Indic digits read as digits, markdown emphasis dropped and
       "X/10", "X من 10", "X out of 10" read as X, holding exactly two numbers and no answer label
       ("المساعد 1: 8" has two numbers, one of them the label): those two.
    2. Else each answer labelled exactly once anywhere ("المساعد 1: 8", "Assistant 2: 7", or
       "<score1>8</score1>"): those.
    Scores outside 1-10 make the answer unparseable, as does anything else. Nothing is guessed.
    """
    if not text:
        return None
    text = strip_marks(text).translate(_DIGITS)
    first = next((line for line in text.splitlines() if line.strip()), "")
    first = _OUT_OF.sub(r"\1", first.replace("*", ""))
    numbers = re.findall(_NUMBER, first)
    if len(numbers) == 2 and not _LABELLED.search(first) and not _TAGGED.search(first):
        return _in_range(_number(numbers[0]), _number(numbers[1]))
    found: dict[str, list[str]] = {"1": [], "2": []}
    for pattern in (_TAGGED, _LABELLED):
        for m in pattern.finditer(_OUT_OF.sub(r"\1", text.replace("*", ""))):
            found[m.group(1)].append(m.group(2))
        if len(found["1"]) == 1 and len(found["2"]) == 1:
            return _in_range(_number(found["1"][0]), _number(found["2"][0]))
        found = {"1": [], "2": []}
    return None


@dataclass
class Scored:
    """One scoring judgement: the two scores (None when unparseable), its status and the judge's text."""

    scores: tuple[float, float] | None
    status: str
    text: str = ""
    attempts: int = 1


class ScoreJudge(Protocol):
    identity: str

    def score_many(self, items: Sequence[tuple[str, str, str]], run: int, sample: bool) -> list[Scored]: ...


class _Retrying:
    """Asks again (sampled) for the judgements whose scores did not parse, up to `max_attempts`."""

    max_attempts: int

    def score_many(self, items: Sequence[tuple[str, str, str]], run: int, sample: bool) -> list[Scored]:
        results: list[Scored | None] = [None] * len(items)
        todo = list(range(len(items)))
        for attempt in range(1, self.max_attempts + 1):
            answers = self._answer([items[i] for i in todo], run, attempt, sample or attempt > 1)
            retry = []
            for i, got in zip(todo, answers, strict=True):
                got.attempts = attempt
                results[i] = got
                if got.status == UNPARSEABLE:
                    retry.append(i)
            todo = retry
            if not todo:
                break
        return results  # type: ignore[return-value]

    def _answer(self, items: Sequence[tuple[str, str, str]], run: int, attempt: int, sample: bool) -> list[Scored]:
        raise NotImplementedError


def _scored(text: str | None) -> Scored:
    scores = parse_scores(text)
    return Scored(scores, OK if scores else UNPARSEABLE, text or "")


class EndpointScoreJudge(_Retrying):
    """The scoring judge behind an OpenAI-compatible endpoint: all requests of a call go out together,
    `max_concurrency` at a time, under the endpoint's rate limits."""

    def __init__(self, config: EndpointConfig, *, max_new_tokens: int = 512, max_attempts: int = 3,
                 seed: int = 0) -> None:
        self.client = EndpointClient(config)
        self.max_new_tokens, self.max_attempts, self.seed = max_new_tokens, max_attempts, seed
        self.identity = f"endpoint:{config.base_url}:{config.model}"

    def _answer(self, items, run, attempt, sample):
        requests = [
            ChatRequest(score_messages(*it), max_tokens=self.max_new_tokens,
                        temperature=RUN_TEMPERATURE if sample else 0.0,
                        seed=self.seed + 1000 * run + attempt if sample else None)
            for it in items
        ]
        out = []
        for result in self.client.complete_many(requests):
            out.append(_scored(result.text) if result.ok else Scored(None, ERROR, result.error or ""))
        return out


class LocalScoreJudge(_Retrying):
    """The scoring judge as a local model (`HFModelRunner`: batched, on the job's device and dtype)."""

    def __init__(self, runner: Any, name: str, *, max_new_tokens: int = 512, max_attempts: int = 3,
                 seed: int = 0) -> None:
        self.runner, self.max_new_tokens, self.max_attempts, self.seed = runner, max_new_tokens, max_attempts, seed
        self.identity = f"model:{name}"

    def _answer(self, items, run, attempt, sample):
        texts = self.runner.generate(
            [score_messages(*it) for it in items], self.max_new_tokens,
            temperature=RUN_TEMPERATURE if sample else 0.0, seed=self.seed + 1000 * run + attempt,
        )
        return [_scored(t) for t in texts]


def is_remote(judge: object) -> bool:
    """An endpoint judge waits on the network, so it can judge while the job's GPU generates."""
    return hasattr(judge, "client")


def pairwise_verdicts(
    judge: Any, pairs: Sequence[tuple[str, str, str, str]], runs: int = 1
) -> list[PairVerdicts]:
    """RLAIF's pairwise judge on (item id, question, model answer, reference answer), both orders, `runs`
    times. One `judge_many` call for everything (concurrent or batched); judges with only `compare`
    (tests, other implementations) are asked one pair at a time, a raised error making the verdict None."""
    asks = [(q, a, r) if order == 0 else (q, r, a) for _ in range(runs) for _, q, a, r in pairs for order in (0, 1)]
    if hasattr(judge, "judge_many"):
        try:
            got = judge.judge_many(asks)
            verdicts = [(j.verdict, bool(getattr(j, "forced", False))) for j in got]
        except Exception as e:  # a judge outage marks the pairs invalid; it must not lose the run
            log.warning("judge failed: %s", e)
            verdicts = [(None, False)] * len(asks)
    else:
        verdicts = []
        for q, a, b in asks:
            try:
                verdicts.append((judge.compare(q, a, b), False))
            except Exception as e:
                log.warning("judge failed: %s", e)
                verdicts.append((None, False))
    out = []
    for k, (item_id, *_rest) in enumerate(p for _ in range(runs) for p in pairs):
        (first, forced_1), (second, forced_2) = verdicts[2 * k], verdicts[2 * k + 1]
        out.append(PairVerdicts(item_id, first, second, forced_1 + forced_2, run=k // max(len(pairs), 1)))
    return out
