"""The endpoint client against the scripted OpenAI server: retries, limits, accounting, key hygiene.

Timing checks assert lower bounds only (a loaded CI box may be slow, never fast).
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhad_trainer.llm.client import EndpointClient, estimate_tokens, parse_retry_after
from dhad_trainer.llm.limiter import RateLimiter
from dhad_trainer.llm.types import ChatRequest, EndpointConfig
from tests.support.openai_server import OpenAIServer

KEY = "sk-dhad-SECRET-7f3a9c1e5b"


def client_for(srv: OpenAIServer, **kw) -> EndpointClient:
    kw.setdefault("api_key", KEY)
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.05)
    kw.setdefault("timeout_s", 10)
    return EndpointClient(EndpointConfig(base_url=srv.base_url, model="teacher", **kw))


def test_batch_in_order_with_markers_and_n_choices():
    with OpenAIServer(KEY) as srv:
        client = client_for(srv)
        results = client.complete_many(
            ["س1", "[refuse] س2", "[english] س3", "[truncate] س4",
             ChatRequest.user("س5", n=3, tag="five"), [{"role": "user", "content": "س6"}]]
        )
    assert [r.ok for r in results] == [True] * 6
    assert results[0].text == "إجابة: س1" and results[0].attempts == 1
    assert "عذر" in results[1].text and "English" in results[2].text
    assert results[3].finish_reason == "length"
    assert len(results[4].texts) == 3 and len(set(results[4].texts)) == 3 and results[4].tag == "five"
    assert results[4].usage.completion_tokens == 60
    assert results[5].text == "إجابة: س6"
    assert srv.bodies[0]["model"] == "teacher"


def test_429_waits_retry_after_and_never_repeats_after_success():
    with OpenAIServer(KEY, retry_after_s=0.6) as srv:
        client = client_for(srv)
        [res] = client.complete_many(["[429] q"])
        time.sleep(0.1)
        first, second = srv.times["[429] q"]
        assert srv.counts["[429] q"] == 2
    assert res.ok and res.attempts == 2
    assert second - first >= 0.6
    stats = client.stats
    assert stats.retries == {"429": 1} and stats.succeeded == 1 and stats.requests_sent == 2


def test_500_twice_then_success_with_backoff():
    with OpenAIServer(KEY) as srv:
        client = client_for(srv, backoff_base_s=0.2, backoff_max_s=1.0)
        res = client.complete("[500x2] q")
        times = srv.times["[500x2] q"]
    assert res.ok and res.attempts == 3 and len(times) == 3
    assert times[1] - times[0] >= 0.1 and times[2] - times[1] >= 0.2  # half of 0.2 * 2**k at least
    assert client.stats.retries == {"500": 2}


def test_permanent_400_fails_that_item_only():
    with OpenAIServer(KEY) as srv:
        client = client_for(srv)
        results = client.complete_many(["ok", "[400] bad", "[malformed] m", "ok2"])
        assert srv.counts["[400] bad"] == 1 and srv.counts["[malformed] m"] == 1
    assert [r.ok for r in results] == [True, False, False, True]
    assert results[1].reason == "400" and results[1].status == 400 and results[1].attempts == 1
    assert results[2].reason == "malformed"
    assert client.stats.failed == {"400": 1, "malformed": 1} and client.stats.succeeded == 2


def test_retries_are_bounded():
    with OpenAIServer(KEY) as srv:
        res = client_for(srv, max_retries=2).complete("[503x9] q")
        assert srv.counts["[503x9] q"] == 3
    assert not res.ok and res.reason == "503" and res.attempts == 3


def test_dropped_connection_and_timeout_are_retried():
    with OpenAIServer(KEY) as srv:
        client = client_for(srv, max_retries=1, timeout_s=0.3)
        dropped, slow = client.complete_many(["[drop] q", "[sleep=1] s"])
    assert dropped.ok and dropped.attempts == 2
    assert not slow.ok and slow.reason == "timeout" and slow.attempts == 2
    assert client.stats.retries == {"connection": 1, "timeout": 1}


def test_wrong_key_is_401_not_retried_and_redacted():
    with OpenAIServer("sk-the-right-one") as srv:
        res = client_for(srv).complete("q")
        assert srv.unauthorized == 1
    assert not res.ok and res.reason == "401" and res.attempts == 1
    assert "Incorrect API key" in res.error and KEY not in res.error


def test_key_from_env_never_logged_or_shown(monkeypatch, caplog):
    monkeypatch.setenv("DHAD_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with OpenAIServer("sk-other") as bad_srv:
        bad = client_for(bad_srv, api_key=None, api_key_env="DHAD_TEST_KEY")
        wrong = bad.complete_many(["q", "[429] q"])
    with OpenAIServer(KEY, retry_after_s=0) as srv:
        good = client_for(srv, api_key=None, api_key_env="DHAD_TEST_KEY", max_retries=1)
        results = good.complete_many(["[400] a", "[429x5] b", "[drop] c", "[malformed] d", "e", 42])
        assert srv.bodies  # the right key really was sent
    assert results[-1].reason == "internal"  # bad input is an error result, not an exception
    shown = [caplog.text, repr(bad), repr(good), repr(good.config), str(good.stats), repr(wrong),
             repr(results)]
    assert all(KEY not in s for s in shown)
    assert "retrying" in caplog.text and "failed" in caplog.text


def test_missing_key_env_names_the_variable(monkeypatch):
    monkeypatch.delenv("DHAD_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="DHAD_NO_SUCH_KEY"):
        EndpointClient(EndpointConfig("http://x/v1", "m", api_key_env="DHAD_NO_SUCH_KEY"))
    with pytest.raises(ValueError):
        EndpointConfig("x/v1", "m")


def test_concurrency_bound_holds_across_batches():
    with OpenAIServer(KEY, latency_s=0.1) as srv:
        client = client_for(srv, max_concurrency=3)
        other = threading.Thread(target=client.complete_many, args=([f"a{i}" for i in range(9)],))
        other.start()
        results = client.complete_many([f"b{i}" for i in range(9)])
        other.join()
        peak = srv.peak_in_flight
    assert all(r.ok for r in results)
    assert peak == 3  # 18 requests of 0.1 s queued behind a bound of 3: the bound is reached, never passed


def test_requests_per_minute_paces_a_burst():
    with OpenAIServer(KEY) as srv:
        client = client_for(srv, requests_per_minute=600, max_concurrency=8)  # one per 0.1 s
        start = time.monotonic()
        results = client.complete_many([f"q{i}" for i in range(11)])
        elapsed = time.monotonic() - start
    assert all(r.ok for r in results)
    assert elapsed >= 1.0 - 1e-6


def test_tokens_per_minute_paces_a_burst():
    # usage matches the estimate (8 + 192), so reconciliation neither adds nor gives back time
    with OpenAIServer(KEY, prompt_tokens=8, completion_tokens=192) as srv:
        client = client_for(srv, tokens_per_minute=60_000, max_concurrency=8)  # 1000 tokens/s
        requests = [ChatRequest.user(f"q{i}", max_tokens=192) for i in range(6)]
        assert estimate_tokens(requests[0], client.config) == 200
        start = time.monotonic()
        client.complete_many(requests)
        elapsed = time.monotonic() - start
    assert elapsed >= 5 * 0.2 - 1e-6


def test_usage_and_cost_totals_are_exact():
    with OpenAIServer(KEY, prompt_tokens=10, completion_tokens=20) as srv:
        client = client_for(srv, price_prompt_per_1k=0.5, price_completion_per_1k=1.5)
        client.complete_many(["a", "[500] b", ChatRequest.user("c", n=2), "[400] d"])
    s = client.stats
    assert (s.prompt_tokens, s.completion_tokens, s.total_tokens) == (30, 80, 110)
    assert s.cost == pytest.approx(30 * 0.5 / 1000 + 80 * 1.5 / 1000, abs=1e-12)
    assert (s.requests_sent, s.succeeded, s.failed_total) == (5, 3, 1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_reconcile_and_pause():
    clock = FakeClock()
    lim = RateLimiter(None, 6000, clock)  # 100 tokens/s
    assert lim.reserve(500) == 0
    assert lim.reserve(100) == pytest.approx(5.0)
    lim.reconcile(estimated=500, actual=100)  # the first used far less: give 4 s back
    assert lim.reserve(100) == pytest.approx(2.0)
    lim.pause(30)
    assert lim.reserve(1) == pytest.approx(30)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.floats(0, 3)), min_size=1, max_size=30))
def test_limiter_never_exceeds_either_rate(steps):
    clock = FakeClock()
    lim = RateLimiter(120, 60_000, clock)
    starts = []
    for tokens, advance in steps:
        clock.now += advance
        starts.append((clock.now + lim.reserve(tokens), tokens))
    for (a, tokens), (b, _) in zip(starts, starts[1:], strict=False):
        assert b - a >= max(0.5, tokens * 60 / 60_000) - 1e-9


def test_parse_retry_after_forms():
    assert parse_retry_after({"retry-after": "7"}, cap=60) == 7
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}, cap=60) == 0.25
    assert parse_retry_after({"retry-after": "9999"}, cap=60) == 60
    assert parse_retry_after({"retry-after": "soon"}, cap=60) is None
    assert parse_retry_after({}, cap=60) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": future}, cap=60) <= 30


def test_throughput_bench_concurrency_1_vs_16(capsys):
    """Measured, not asserted: responses/s at 200 ms server latency."""
    figures = {}
    with OpenAIServer(KEY, latency_s=0.2) as srv:
        for conc, count in ((1, 8), (16, 64)):
            client = client_for(srv, max_concurrency=conc)
            start = time.monotonic()
            results = client.complete_many([f"bench{conc}-{i}" for i in range(count)])
            figures[conc] = count / (time.monotonic() - start)
            assert all(r.ok for r in results)
    with capsys.disabled():
        print(f"\nendpoint throughput @200ms: c=1 {figures[1]:.2f} resp/s, c=16 {figures[16]:.2f} resp/s")
