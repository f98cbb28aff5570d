"""Scoring logic and reports with scripted runners and judges (no model, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhad_trainer.evaluation.duplicates import find_duplicates
from dhad_trainer.evaluation.loaders import EvalItem, load_suite
from dhad_trainer.evaluation.mmlu_subjects import CATEGORIES
from dhad_trainer.evaluation.prompts import build_prompt, continuations, shots_by_subject
from dhad_trainer.evaluation.report import write_report
from dhad_trainer.evaluation.scoring import GENERATE, JUDGED, LOGLIKELIHOOD, PAIRWISE, score_suite
from tests.conftest import ACEGPT

CHOICES = {"A": "واحد", "B": "اثنان", "C": "ثلاثة", "D": "أربعة"}


def mc(i: int, answer: str, subject: str = "anatomy", suite: str = "arabic-mmlu") -> EvalItem:
    return EvalItem(
        suite, f"{subject}-{i}", f"سؤال رقم {i} عن الجسم", dict(CHOICES), answer, subject, "other"
    )


class ScriptedRunner:
    """generate: replies from a list in order; loglikelihood: a score per continuation text."""

    def __init__(self, replies: list[str] | None = None, scores: dict[str, float] | None = None) -> None:
        self.replies, self.scores, self.calls = list(replies or []), scores or {}, []

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        self.calls.append(("generate", len(prompts), max_new_tokens))
        return [self.replies[i % len(self.replies)] for i in range(len(prompts))]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        self.calls.append(("loglikelihood", len(requests), 0))
        return [self.scores.get(cont, -100.0) for _, cont in requests]


class LengthJudge:
    """Prefers the longer answer; equal length is a tie. Deterministic and order-independent."""

    def compare(self, question: str, answer_a: str, answer_b: str) -> str | None:
        if len(answer_a) == len(answer_b):
            return "tie"
        return "A" if len(answer_a) > len(answer_b) else "B"


class FirstJudge:
    def compare(self, question: str, answer_a: str, answer_b: str) -> str | None:
        return "A"  # pure position bias


class BrokenJudge:
    def compare(self, question: str, answer_a: str, answer_b: str) -> str | None:
        raise TimeoutError("judge endpoint down")


def test_prompts_follow_acegpt_format() -> None:
    dev = [mc(i, "B", suite="arabic-mmlu") for i in range(7)]
    shots = shots_by_subject(dev, 5)["anatomy"]
    assert len(shots) == 5
    p = build_prompt(mc(99, "A"), shots)
    assert p.startswith("فيما يلي أسئلة الاختيار من متعدد (مع الإجابات) حول علم التشريح\n\n")
    assert p.count("إجابة: B\n\n") == 5 and p.endswith(
        "سؤال: سؤال رقم 99 عن الجسم\nA. واحد\nB. اثنان\nC. ثلاثة\nD. أربعة\nإجابة:"
    )
    zero = build_prompt(mc(1, "A"))
    assert "دون شرح" in zero and zero.endswith("\nإجابة:")
    acva = EvalItem("acva", "Algeria-1", "الجزائر دولة عربية", None, "نعم", "Algeria")
    assert "'نعم' أو 'لا'" in build_prompt(acva) and continuations(acva) == {"نعم": " نعم", "لا": " لا"}
    assert continuations(mc(1, "A")) == {k: f" {k}" for k in "ABCD"}
    assert continuations(mc(1, "A"), "text")["D"] == " أربعة"
    assert build_prompt(EvalItem("vicuna-80", "1", "كيف حالك؟", None, None, "generic")) == "كيف حالك؟"


def test_generate_parses_first_line_and_counts_unparsed() -> None:
    items = [mc(0, "A"), mc(1, "B"), mc(2, "C"), mc(3, "D")]
    runner = ScriptedRunner(["أ\nب", "الإجابة: ب", "لا أعرف", "(C)"])
    r = score_suite(items, runner, GENERATE)
    assert [x.pred for x in r.items] == ["A", "B", None, "C"]
    assert r.metrics["accuracy"] == 0.5 and r.metrics["unparsed"] == 1 and r.method == GENERATE
    assert runner.calls == [("generate", 4, 10)]  # at most 10 new tokens for MC


def test_loglikelihood_normalises_by_characters() -> None:
    item = mc(0, "D")
    # raw sums favour " واحد" (-6 vs -7), per character " أربعة" wins (-7/6 > -6/5)
    r = score_suite(
        [item], ScriptedRunner(scores={" واحد": -6.0, " أربعة": -7.0}), LOGLIKELIHOOD, continuation="text"
    )
    assert r.items[0].pred == "D" and r.items[0].scores["A"] == pytest.approx(-6 / 5)
    assert r.metrics["accuracy"] == 1.0 and r.metrics["unparsed"] == 0
    acva = [EvalItem("acva", f"T-{i}", "عبارة", None, g, "T") for i, g in enumerate(["نعم", "لا"])]
    r = score_suite(acva, ScriptedRunner(scores={" نعم": -1.0, " لا": -1.5}), LOGLIKELIHOOD)
    assert [x.pred for x in r.items] == ["نعم", "نعم"] and r.metrics["macro_f1"] == pytest.approx(
        (2 / 3 + 0) / 2
    )


def test_duplicates_excluded_from_dedup_figures() -> None:
    items = [
        mc(0, "A"),
        mc(1, "B"),
        EvalItem("arabic-mmlu", "anatomy-9", "سؤال رقم 0 عن الجسم", CHOICES, "C", "anatomy", "other"),
    ]
    exclude = frozenset(find_duplicates(items).exclude_ids("all"))
    assert exclude == {"anatomy-0", "anatomy-9"}
    r = score_suite(items, ScriptedRunner(["A"]), GENERATE, exclude=exclude)
    assert r.metrics["accuracy"] == pytest.approx(1 / 3) and r.metrics_dedup["accuracy"] == 0.0
    assert [x.excluded for x in r.items] == [True, False, True]


def test_open_ended_judged_in_both_orders() -> None:
    items = [EvalItem("vicuna-80", str(i), f"سؤال {i}", None, None, "generic") for i in range(4)]
    refs = {"0": "قصير", "1": "إجابة مرجعية طويلة جدا جدا", "2": "إجابة طويلة"}  # "3" has no reference
    runner = ScriptedRunner(["إجابة طويلة"])
    r = score_suite(items, runner, GENERATE, judge=LengthJudge(), references=refs, max_new_tokens_open=64)
    assert r.method == JUDGED == PAIRWISE and [x.pred for x in r.items] == ["win", "loss", "tie", None]
    assert (r.metrics["wins"], r.metrics["ties"], r.metrics["losses"], r.metrics["invalid"]) == (1, 1, 1, 0)
    assert r.metrics["score"] == pytest.approx(0.5) and r.metrics["missing_references"] == 1  # not judged
    assert runner.calls == [("generate", 4, 64)]
    biased = score_suite(items[:3], runner, GENERATE, judge=FirstJudge(), references=refs, judge_runs=3)
    assert biased.metrics["ties"] == 9 and biased.metrics["score"] == 0.5  # position bias cancels out...
    assert biased.metrics["inconsistent"] == 9 and biased.flag  # ...and the report says the judge is biased
    broken = score_suite(items[:2], runner, GENERATE, judge=BrokenJudge(), references=refs)
    assert broken.metrics["invalid"] == 2 and broken.flag == "no valid verdict"
    unjudged = score_suite(items, runner, GENERATE)
    assert unjudged.headline is None and unjudged.items[0].output == "إجابة طويلة"


def test_generate_counts_hedges_apart() -> None:
    items = [mc(i, "A") for i in range(4)]
    r = score_suite(items, ScriptedRunner(["A, B, C, D", "A", "كلام عشوائي ب", "لا أعرف"]), GENERATE)
    assert [x.pred for x in r.items] == [None, "A", None, None]
    assert [x.reason for x in r.items] == ["hedged", None, "leftover", "abstained"]
    assert r.metrics["accuracy"] == 0.25 and r.metrics["hedged"] == 1  # the hedge earns nothing
    assert r.metrics["unparsed_reasons"] == {"abstained": 1, "hedged": 1, "leftover": 1}


def test_report_files(tmp_path: Path) -> None:
    mmlu = [
        mc(i, "ABCD"[i % 4], s)
        for i, s in enumerate(["anatomy", "astronomy", "formal_logic", "sociology"] * 3)
    ]
    mmlu = [
        EvalItem(i.suite, i.id, i.question + i.id, i.choices, i.answer, i.subject, CATEGORIES[k % 4])
        for k, i in enumerate(mmlu)
    ]
    acva = [
        EvalItem("acva", f"{t}-{i}", f"عبارة {t} {i}", None, "نعم" if i % 2 else "لا", t)
        for t in ("Algeria", "Iraq", "Oman")
        for i in range(4)
    ]
    open_items = [EvalItem("alpaca-eval", str(i), f"اكتب {i}", None, None, "oasst") for i in range(3)]
    runner = ScriptedRunner(["A", "نعم", "B"], scores={" A": -1.0, " نعم": -0.5})
    results = [score_suite(mmlu, runner, m) for m in (GENERATE, LOGLIKELIHOOD)]
    results += [score_suite(acva, runner, m) for m in (GENERATE, LOGLIKELIHOOD)]
    results.append(score_suite(open_items, runner, GENERATE, judge=LengthJudge(), references={"0": "x"}))
    dups = {"acva": find_duplicates(acva), "arabic-mmlu": find_duplicates(mmlu)}
    headline = write_report(results, tmp_path / "out", model="tiny", duplicates=dups)
    assert set(headline) == {
        "arabic-mmlu/generate",
        "arabic-mmlu/loglikelihood",
        "acva/generate",
        "acva/loglikelihood",
        "alpaca-eval/judge-pairwise",
    }
    out = tmp_path / "out"
    for name in (
        "scores.png",
        "acva_topics_generate.png",
        "acva_topics_loglikelihood.png",
        "mmlu_categories_generate.png",
        "mmlu_categories_loglikelihood.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert doc["headline"] == headline and len(doc["suites"]) == 5
    assert {s["method"] for s in doc["suites"]} == {GENERATE, LOGLIKELIHOOD, JUDGED}
    assert doc["suites"][0]["metrics"]["per_category"] and doc["duplicates"]["acva"]["n_items"] == 12
    md = (out / "summary.md").read_text(encoding="utf-8")
    assert "| arabic-mmlu | loglikelihood |" in md and "not comparable" in md and "Duplicate questions" in md
    preds = (out / "predictions_alpaca-eval_judge-pairwise.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(preds) == 3 and json.loads(preds[0])["method"] == JUDGED


class PreferModelScores:
    """A scoring judge (score_many) that scores by content, whatever the position: an answer starting with
    "جيد" 9, the reference ("مرجع") 7, anything else 3."""

    identity = "scripted"

    def score_many(self, items, run, sample):
        from dhad_trainer.evaluation.judging import Scored

        def score(text: str) -> float:
            return 9.0 if text.startswith("جيد") else 7.0 if text == "مرجع" else 3.0

        return [Scored((score(a), score(b)), "ok") for _, a, b in items]


BENCH = ACEGPT  # the scripted replies line up with the real files' batches (on the samples, other counts)


@pytest.mark.benchmarks
def test_several_models_side_by_side(tmp_path: Path) -> None:
    from dhad_trainer.evaluation.job import EvalSettings, run_eval

    aligned, base = ScriptedRunner(["جيد: A", "نعم"]), ScriptedRunner(["B, C", "لا"])
    released = []
    refs = {s: {i.id: "مرجع" for i in load_suite(s, BENCH, limit=6)} for s in ("vicuna-80",)}
    settings = EvalSettings(source=str(BENCH), suites=("exams", "vicuna-80"), methods=(GENERATE,), limit=6, seed=2,
                            runs=2, max_new_tokens_open=8)
    headline = run_eval(settings, {"aligned": aligned, "base": lambda: base}, tmp_path, judge=LengthJudge(),
                        score_judge=PreferModelScores(), references=refs, release=released.append)
    assert released == [aligned, base]  # each model freed once its suites are done
    assert headline["vicuna-80/judge-scores"] == round(9 / 7, 4)  # 9 vs 7 in both positions, both runs
    assert headline["base:vicuna-80/judge-scores"] == round(3 / 7, 4)
    assert "exams/generate" in headline and "base:exams/generate" in headline
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert doc["models"] == ["aligned", "base"] and set(doc["compared"]) == {"base"}
    base_exams = next(s for s in doc["compared"]["base"] if s["suite"] == "exams")
    assert base_exams["metrics"]["hedged"] == 3 and base_exams["metrics"]["unparsed"] == 6  # "B, C" and "لا"
    ids = {json.loads(line)["id"] for line in (tmp_path / "predictions_exams_generate.jsonl").open()}
    assert ids == {json.loads(line)["id"] for line in (tmp_path / "predictions_base_exams_generate.jsonl").open()}
    assert ids == set(doc["samples"]["exams"]["ids"]) and doc["samples"]["exams"]["seed"] == 2
    md = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| suite | method | metric | chance | aligned | base |" in md
    assert "ratio of summed 1-10 scores" in md and "(parity)" in md
    assert (tmp_path / "open_ended_ratio.png").is_file() and (tmp_path / "scores.png").is_file()
