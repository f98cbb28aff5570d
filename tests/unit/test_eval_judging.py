"""The open-ended judges against the scripted OpenAI-compatible server: AceGPT's score ratio computed
exactly from known scores, unparseable scores counted (never guessed), and requests sent concurrently."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from dhad_trainer.evaluation.judging import EndpointScoreJudge, parse_scores, prompt_text
from dhad_trainer.evaluation.loaders import SAMPLE_BENCHMARKS, EvalItem
from dhad_trainer.evaluation.report import headline_scores
from dhad_trainer.evaluation.scoring import PAIRWISE, SCORES, judge_pairwise, judge_scores
from dhad_trainer.llm.judges import EndpointJudge
from dhad_trainer.llm.types import EndpointConfig
from tests.support.openai_server import OpenAIServer, Reply, prompt_of


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8 6\nالإجابة الأولى أدق.", (8.0, 6.0)),
        ("٧ ٩\nشرح", (7.0, 9.0)),  # Arabic-Indic digits
        ("**8** **7**", (8.0, 7.0)),
        ("8/10 6/10", (8.0, 6.0)),
        ("7.5 6", (7.5, 6.0)),
        ("التقييم:\nالمساعد 1: 9\nالمساعد 2: 4", (9.0, 4.0)),  # labelled, not on the first line
        ("Assistant 1: 3, Assistant 2: 10", (3.0, 10.0)),
        ("<score1>6</score1> ... <score2>2</score2>", (6.0, 2.0)),
        ("11 5", None),  # out of range
        ("0 5", None),
        ("8", None),  # one score
        ("8 7 6", None),  # three numbers on the first line and no labels
        ("كلتا الإجابتين جيدة", None),
        ("", None),
        (None, None),
        ("المساعد 1: 8\nالمساعد 1: 6\nالمساعد 2: 5", None),  # the same answer labelled twice
    ],
)
def test_parse_scores(text: str | None, expected: tuple | None) -> None:
    assert parse_scores(text) == expected


ITEMS = [EvalItem("vicuna-80", str(i), f"سؤال رقم {i}", None, None, "generic") for i in range(1, 4)]
ANSWERS = [f"إجابة النموذج {i}" for i in range(1, 4)]
REFS = {str(i): f"إجابة المرجع {i}" for i in range(1, 4)}
# (item, run) -> (model, reference) scores when the model is assistant 1, then when it is assistant 2
KNOWN = {
    ("1", 0): ((8, 6), (7, 7)),
    ("2", 0): ((5, 9), (6, 8)),
    ("3", 0): ((9, 3), (4, 6)),  # position-inconsistent: ahead when first, behind when second
    ("1", 1): ((7, 6), (8, 5)),
    ("2", 1): ((4, 8), None),  # never parseable: counted, both scores dropped
    ("3", 1): ((10, 4), (9, 5)),
}
SLOT_1 = re.compile(r"\[بداية إجابة المساعد 1\]\n(.*?)\n\[نهاية", re.S)


def scripted_judge(body: dict, attempt: int) -> Reply:
    """Scores from KNOWN by which answer sits in slot 1; the run is read from the request's seed."""
    first = SLOT_1.search(prompt_of(body)).group(1)
    item, model_first = first.split()[-1], "النموذج" in first
    run = int(body.get("seed") or 0) // 1000
    if (item, run, model_first) == ("1", 0, True) and attempt == 1:
        return Reply(content="الإجابتان ممتازتان.")  # unparseable once, then asked again (sampled)
    scores = KNOWN[(item, run)][0 if model_first else 1]
    if scores is None:
        return Reply(content="لا أستطيع إعطاء درجة.")
    model, reference = scores
    shown = (model, reference) if model_first else (reference, model)
    return Reply(content=f"{shown[0]} {shown[1]}\nشرح التقييم.")


def test_acegpt_ratio_from_a_scripted_judge_is_exact() -> None:
    with OpenAIServer(api_key=None, script=scripted_judge, latency_s=0.05) as srv:
        judge = EndpointScoreJudge(EndpointConfig(base_url=srv.base_url, model="judge", max_concurrency=16),
                                   max_new_tokens=64, max_attempts=2)
        r = judge_scores(ITEMS, ANSWERS, judge, REFS, runs=2)
        bodies = list(srv.bodies)
    # run 0: model 8 + 7 + 5 + 6 + 9 + 4 = 39, reference 6 + 7 + 9 + 8 + 3 + 6 = 39
    # run 1 (item 2's second position dropped): model 7 + 8 + 4 + 10 + 9 = 38, reference 6 + 5 + 8 + 4 + 5 = 28
    run0, run1 = 39 / 39, 38 / 28
    m = r.metrics
    assert r.method == SCORES and m["headline_metric"] == "score_ratio"
    assert m["ratio_per_run"] == [run0, run1]  # exactly: sums of integers divided once
    assert m["score_ratio"] == (run0 + run1) / 2 and r.headline == m["score_ratio"]
    assert m["ratio_std"] == pytest.approx(abs(run1 - run0) / 2**0.5)
    assert (m["judgements"], m["valid_judgements"], m["unparseable"]) == (12, 11, 1)
    assert m["inconsistent"] == 1 and m["forced"] == 0 and r.flag is None
    assert m["model_mean_score"] == pytest.approx((39 + 38) / 11)
    retried = [j for j in r.items[0].judged if j["run"] == 0 and j["model_first"]]
    assert retried[0]["attempts"] == 2 and retried[0]["model"] == 8
    dropped = [j for j in r.items[1].judged if j["run"] == 1 and not j["model_first"]]
    assert dropped[0]["status"] == "unparseable" and dropped[0]["model"] is None and dropped[0]["attempts"] == 2
    assert len(bodies) == 12 + 1 + 1  # one retry that parsed, one that did not
    run0 = [b for b in bodies if "seed" not in b]
    assert len(run0) == 6 and {b["temperature"] for b in run0} == {0.0}  # run 0 greedy, retries and run 1 sampled
    assert {b["temperature"] for b in bodies if "seed" in b} == {0.7}
    assert sorted(int(b["seed"]) for b in bodies if "seed" in b) == [2] + [1001] * 6 + [1002]
    assert "1 إلى 10" in m["prompt"] and m["prompt"] == prompt_text()


def test_judge_requests_go_out_concurrently_within_the_limit() -> None:
    items = [EvalItem("alpaca-eval", str(i), f"سؤال {i}", None, None, "oasst") for i in range(12)]
    answers, refs = [f"إجابة {i}" for i in range(12)], {str(i): f"مرجع {i}" for i in range(12)}
    with OpenAIServer(api_key=None, latency_s=0.3, script=lambda body, n: Reply(content="7 7\nمتكافئتان")) as srv:
        judge = EndpointScoreJudge(EndpointConfig(base_url=srv.base_url, model="j", max_concurrency=8),
                                   max_new_tokens=16, max_attempts=1)
        scored = judge_scores(items, answers, judge, refs, runs=1)
        peak = srv.peak_in_flight
    assert scored.metrics["score_ratio"] == 1.0 and peak == 8  # 24 requests, 8 at a time
    no_verdict = lambda body, n: Reply(content="كلتاهما جيدتان")  # noqa: E731
    with OpenAIServer(api_key=None, latency_s=0.3, script=no_verdict) as srv:  # RLAIF's judge, via judge_many
        pairwise = EndpointJudge(EndpointConfig(base_url=srv.base_url, model="j", max_concurrency=6),
                                 constitution="x", language="ar", max_new_tokens=8, max_attempts=1)
        r = judge_pairwise(items, answers, pairwise, refs)
        assert 1 < srv.peak_in_flight <= 6
    assert r.method == PAIRWISE and r.metrics["unparseable"] == 24 and r.flag == "no valid verdict"
    assert headline_scores([r, scored]) == {"alpaca-eval/judge-scores": 1.0}  # the flagged figure is left out


class ForcedJudge:
    """Shaped like RLAIF's ModelJudge: verdicts from judge_many, each marked forced."""

    class J:
        def __init__(self, verdict: str) -> None:
            self.verdict, self.status, self.forced = verdict, "ok", True

    def judge_many(self, items):
        return [self.J("A" if "النموذج" in a else "B") for _, a, _ in items]


def test_mostly_forced_pairwise_verdicts_are_flagged_not_headlined() -> None:
    r = judge_pairwise(ITEMS, ANSWERS, ForcedJudge(), REFS)
    assert r.metrics["wins"] == 3 and r.metrics["score"] == 1.0  # what the demo used to headline
    assert r.metrics["forced"] == 6 and r.flag == "mostly forced verdicts (6 of 6)"
    assert headline_scores([r]) == {}


BENCH = SAMPLE_BENCHMARKS  # the suites' format is all this needs


def test_endpoint_judging_overlaps_the_next_suites_generation(tmp_path: Path) -> None:
    """While the model answers AlpacaEval, the endpoint judge is still scoring Vicuna's answers."""
    from dhad_trainer.evaluation.job import EvalSettings, run_eval
    from dhad_trainer.evaluation.loaders import load_suite

    with OpenAIServer(api_key=None, latency_s=1.0, script=lambda body, n: Reply(content="7 7\nمتكافئتان")) as srv:

        class Runner:
            calls, judging_meanwhile = 0, False

            def generate(self, prompts, max_new_tokens):
                self.calls += 1
                if self.calls == 2:  # AlpacaEval: are Vicuna's judgements in flight now?
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and not self.judging_meanwhile:
                        self.judging_meanwhile = srv.in_flight > 0
                        time.sleep(0.02)
                return ["إجابة"] * len(prompts)

        runner = Runner()
        suites = ("vicuna-80", "alpaca-eval")
        refs = {s: {i.id: "مرجع" for i in load_suite(s, BENCH, limit=2)} for s in suites}
        judge = EndpointScoreJudge(EndpointConfig(base_url=srv.base_url, model="j", max_concurrency=4), max_attempts=1)
        settings = EvalSettings(source=str(BENCH), suites=suites, limit=2, runs=1, open_metrics=("judge-scores",))
        headline = run_eval(settings, runner, tmp_path, score_judge=judge, references=refs)
    assert runner.judging_meanwhile
    assert headline == {"vicuna-80/judge-scores": 1.0, "alpaca-eval/judge-scores": 1.0}
