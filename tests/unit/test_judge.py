"""Judges: verdict parsing, the Arabic prompt, retries of refused/unparseable answers, endpoint and local model."""

from __future__ import annotations

import re

import pytest

from dhad_api.stages import Endpoint
from dhad_trainer.llm.judges import (
    ERROR,
    FORCED,
    JUDGE_API_KEY_ENV,
    OK,
    REFUSED,
    UNPARSEABLE,
    EndpointJudge,
    ModelJudge,
    endpoint_config,
    judge_messages,
    load_constitution,
    parse_verdict,
    status_of,
)
from tests.support.openai_server import OpenAIServer, Reply, prompt_of


@pytest.mark.parametrize("text,expected", [
    ("التعليل: الأولى أدق.\nالحكم: [[A]]", ("A", OK)),
    ("الحكم: [[ب]]", ("B", OK)),
    ("**الحكم النهائي:** الإجابة A", ("A", OK)),
    ("Both are fine. Verdict: [[tie]]", ("tie", OK)),
    ("الحكم: [[تعادل]]", ("tie", OK)),
    ('{"rationale": "...", "verdict": "B"}', ("B", OK)),
    ("Final verdict: B", ("B", OK)),
    ("في البداية ظننت [[A]] لكن بعد التأمل: [[B]]", ("B", OK)),  # the last verdict wins
    ("الحكـــم: [[A]]", ("A", OK)),  # tatweel
    ("عذرًا، لا يمكنني المقارنة بين هاتين الإجابتين.", (None, REFUSED)),
    ("I'm sorry, but I can't help with that.", (None, REFUSED)),
    ("الإجابتان جيدتان ولكل منهما مزايا.", (None, UNPARSEABLE)),
    ("", (None, UNPARSEABLE)),
    ("Answer B is long. Answer A is short.", (None, UNPARSEABLE)),  # mentions, not a verdict
])
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_prompt_is_arabic_by_default_and_carries_constitution_and_both_answers():
    constitution = load_constitution()
    assert "احترام الثقافة العربية" in constitution and "الصدق" in constitution
    system, user = judge_messages("ما عاصمة مصر؟", "القاهرة", "الإسكندرية", constitution)
    assert constitution in system["content"] and "حَكَم محايد" in system["content"]
    assert "ما عاصمة مصر؟" in user["content"] and "[[تعادل]]" in user["content"]
    assert user["content"].index("القاهرة") < user["content"].index("الإسكندرية")
    _, english = judge_messages("q", "a", "b", "be kind", language="en")
    assert "Verdict: [[A]]" in english["content"] and "language with code" not in english["content"]
    _, french = judge_messages("q", "a", "b", "be kind", language="fr")
    assert "language with code 'fr'" in french["content"]


def answers(body):
    """(question, answer A, answer B) back out of a judge request."""
    text = prompt_of(body)
    a = re.search(r"\[بداية الإجابة A\]\n(.*?)\n\[نهاية الإجابة A\]", text, re.S).group(1)
    b = re.search(r"\[بداية الإجابة B\]\n(.*?)\n\[نهاية الإجابة B\]", text, re.S).group(1)
    return text, a, b


def scripted_judge(body, attempt):
    """A judge with habits chosen per question marker; falls back to the server's own markers ([400])."""
    text, a, b = answers(body)
    if "[good]" in text:
        return Reply(content=f"الإجابة الأقصر أوضح.\nالحكم: [[{'A' if len(a) <= len(b) else 'B'}]]")
    if "[garbage-once]" in text:
        return Reply(content="لا أدري" if attempt == 1 else "الحكم: [[B]]")
    if "[garbage]" in text:
        return Reply(content="كلتاهما مقبولة نوعًا ما.")
    if "[refuse]" in text:
        return Reply(content="عذرًا، لا يمكنني الحكم في هذا.")
    return None


def test_endpoint_judge_retries_counts_and_key(monkeypatch):
    monkeypatch.setenv(JUDGE_API_KEY_ENV, "sk-judge")
    with OpenAIServer(api_key="sk-judge", script=scripted_judge) as srv:
        spec = Endpoint(base_url=srv.base_url, model="judge", api_key_secret_ref={"name": "judge", "key": "k"},
                        max_retries=0)
        judge = EndpointJudge(endpoint_config(spec), constitution="كن منصفًا.", language="ar",
                              max_new_tokens=64, max_attempts=3)
        items = [("[good] س", "قصير", "أطول بكثير"), ("[garbage-once] س", "x", "y"), ("[garbage] س", "x", "y"),
                 ("[refuse] س", "x", "y"), ("[400] س", "x", "y")]
        got = [(j.verdict, j.status, j.requests) for j in judge.judge_many(items)]
        assert got == [("A", OK, 1), ("B", OK, 2), (None, UNPARSEABLE, 3), (None, REFUSED, 3), (None, ERROR, 1)]
        assert judge.compare("[good] س", "أطول بكثير", "قصير") == "B"
        temperatures = [b["temperature"] for b in srv.bodies if "[garbage-once]" in prompt_of(b)]
        assert temperatures == [0.0, 0.7]  # greedy first, sampled when asking again
        assert srv.unauthorized == 0 and srv.bodies[0]["messages"][0]["role"] == "system"


def test_endpoint_judge_reports_a_malformed_http_body_as_error():
    with OpenAIServer(api_key=None) as srv:
        judge = EndpointJudge(endpoint_config(Endpoint(base_url=srv.base_url, model="j", max_retries=0)),
                              constitution=None, language="ar", max_new_tokens=8, max_attempts=3)
        [result] = judge.judge_many([("[malformed] س", "a", "b")])
        assert (result.verdict, result.status, result.requests) == (None, ERROR, 1)


@pytest.fixture(scope="module")
def tiny_judge_dir():
    from tests.support.alignment import tiny_lm

    return tiny_lm()


def test_local_model_judge_unconstrained_gives_up_after_max_attempts(tiny_judge_dir):
    judge = ModelJudge(tiny_judge_dir, constrained=False, constitution="كن منصفًا.", language="ar",
                       max_new_tokens=6, max_attempts=2)
    results = judge.judge_many([("س١", "أ", "ب"), ("س٢", "ج", "د")])
    assert [(r.verdict, r.status, r.requests) for r in results] == [(None, UNPARSEABLE, 2)] * 2


def test_local_model_judge_constrained_forces_a_verdict_after_its_last_attempt(tiny_judge_dir):
    judge = ModelJudge(tiny_judge_dir, constitution="كن منصفًا.", language="ar", max_new_tokens=6, max_attempts=2)
    items = [("س١", "الرباط", "القاهرة"), ("س٢", "نعم", "لا"), ("س١", "القاهرة", "الرباط")]
    first, again = judge.judge_many(items), judge.judge_many(items)
    # asked twice (greedy, then sampled), then decided by likelihood: a status of its own, never OK
    assert all(r.status == FORCED and r.verdict in ("A", "B") and r.forced and r.requests == 2 for r in first)
    assert [r.verdict for r in first] == [r.verdict for r in again]
    assert {first[0].verdict, first[2].verdict} == {"A", "B"}  # order-independent: the same response wins
    assert status_of({"status": OK, "forced": True}) == FORCED  # judgements cached before the status existed
    keys = {judge.cache_key(*it) for it in items}
    assert len(keys) == 3  # order matters to the key: both orders are separate judgements
    other = ModelJudge(tiny_judge_dir, constitution="دستور آخر", language="ar", max_new_tokens=6, max_attempts=2)
    assert other.cache_key(*items[0]) != judge.cache_key(*items[0])
