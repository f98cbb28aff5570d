"""A synchronous client for OpenAI-compatible chat endpoints (teacher, judge), built on the stdlib.

Threads + urllib rather than asyncio/httpx: the callers are synchronous trainer code, requests are long
(seconds of generation), and the trainer image then needs no extra HTTP dependency. Concurrency is a
semaphore around the HTTP exchange, so the bound holds across concurrent `complete_many` calls.
The API key lives only in the Authorization header; every error text is scrubbed of it.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .limiter import RateLimiter
from .types import ChatRequest, ChatResult, EndpointConfig, EndpointStats, Usage

log = logging.getLogger("dhad.endpoint")

RequestLike = ChatRequest | str | list[dict[str, Any]]
_MAX_ERROR_BODY = 4096


class _Secret:
    """Holds the key so that a stray repr/str/log of the client's state shows nothing."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__


@dataclass
class _Outcome:
    status: int | None
    payload: Any = None
    reason: str | None = None  # None means success
    detail: str = ""
    retry_after: float | None = None

    @property
    def retryable(self) -> bool:
        if self.reason in ("timeout", "connection"):
            return True
        return self.status is not None and (self.status in (408, 429) or self.status >= 500)


def parse_retry_after(headers: Mapping[str, str] | Any, cap: float) -> float | None:
    """Seconds to wait from `retry-after-ms`, `Retry-After: <seconds>` or `Retry-After: <HTTP-date>`."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(cap, max(0.0, float(raw_ms) / 1000.0))
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return min(cap, max(0.0, seconds))


def estimate_tokens(request: ChatRequest, config: EndpointConfig) -> int:
    """Upper-ish guess of prompt + completion tokens, used to book tokens-per-minute before sending."""
    chars = sum(len(str(m.get("content") or "")) for m in request.messages)
    prompt = math.ceil(chars / config.chars_per_token) + 4 * len(request.messages) + 3
    return prompt + (request.max_tokens or config.default_max_tokens) * max(1, request.n)


class _StatsBook:
    def __init__(self, config: EndpointConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._sent = self._ok = self._prompt = self._completion = 0
        self._failed: Counter[str] = Counter()
        self._retries: Counter[str] = Counter()

    def sent(self) -> None:
        with self._lock:
            self._sent += 1

    def retry(self, reason: str) -> None:
        with self._lock:
            self._retries[reason] += 1

    def done(self, result: ChatResult) -> None:
        with self._lock:
            if result.ok:
                self._ok += 1
            else:
                self._failed[result.reason or "unknown"] += 1
            if result.usage:
                self._prompt += result.usage.prompt_tokens
                self._completion += result.usage.completion_tokens

    def snapshot(self) -> EndpointStats:
        c = self._config
        with self._lock:
            cost = self._prompt * c.price_prompt_per_1k / 1000
            cost += self._completion * c.price_completion_per_1k / 1000
            return EndpointStats(
                self._sent, self._ok, dict(self._failed), dict(self._retries),
                self._prompt, self._completion, cost,
            )


class EndpointClient:
    """Chat completions against `{base_url}/chat/completions` with limits, retries and accounting."""

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self._key = _Secret(config.resolve_key())
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._slots = threading.BoundedSemaphore(config.max_concurrency)
        self._limiter = RateLimiter(config.requests_per_minute, config.tokens_per_minute)
        self._book = _StatsBook(config)
        self._rng = random.Random()
        self._opener = urllib.request.build_opener()  # honours HTTP(S)_PROXY / NO_PROXY like curl

    def __repr__(self) -> str:
        return f"EndpointClient(model={self.config.model!r}, url={self._url!r})"

    @property
    def stats(self) -> EndpointStats:
        return self._book.snapshot()

    def complete_many(self, requests: Iterable[RequestLike]) -> list[ChatResult]:
        """Results in input order; failures are results with `error` set, never exceptions."""
        items = list(requests)
        if not items:
            return []
        workers = min(self.config.max_concurrency, len(items))
        with ThreadPoolExecutor(workers, thread_name_prefix="dhad-endpoint") as pool:
            return list(pool.map(self.complete, items))

    def complete(self, request: RequestLike) -> ChatResult:
        started = time.monotonic()
        try:
            result = self._complete(_coerce(request))
        except Exception as exc:  # a bug or odd input must not kill the batch
            result = ChatResult(error=f"internal error: {self._scrub(repr(exc))}", reason="internal")
        result.latency_s = time.monotonic() - started
        self._book.done(result)
        return result

    def _complete(self, request: ChatRequest) -> ChatResult:
        cfg = self.config
        body = json.dumps(request.body(cfg.model), ensure_ascii=False).encode()
        estimate = estimate_tokens(request, cfg)
        attempts = 0
        while True:
            attempts += 1
            time.sleep(self._limiter.reserve(estimate))
            with self._slots:
                self._book.sent()
                outcome = self._send(body)
            if outcome.reason is None:
                result = _parse_success(outcome.payload)
                result.attempts, result.tag, result.status = attempts, request.tag, outcome.status
                if result.usage:
                    self._limiter.reconcile(estimate, result.usage.total_tokens)
                return result
            if not outcome.retryable or attempts > cfg.max_retries:
                log.warning("endpoint %s: request failed after %d attempt(s): %s",
                            cfg.model, attempts, outcome.detail)
                return ChatResult(error=outcome.detail, reason=outcome.reason, status=outcome.status,
                                  attempts=attempts, tag=request.tag)
            self._book.retry(outcome.reason)
            wait = outcome.retry_after
            if wait is not None:
                self._limiter.pause(wait)
            else:
                step = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempts - 1))
                wait = step / 2 + self._rng.uniform(0, step / 2)
            log.info("endpoint %s: attempt %d got %s, retrying in %.2fs", cfg.model, attempts,
                     outcome.reason, wait)
            time.sleep(wait)

    def _send(self, body: bytes) -> _Outcome:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key.reveal()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.config.timeout_s) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as exc:
            try:
                with exc:
                    text = exc.read(_MAX_ERROR_BODY).decode("utf-8", "replace")
            except (OSError, http.client.HTTPException):
                text = ""
            return _Outcome(exc.code, reason=str(exc.code),
                            detail=f"HTTP {exc.code}: {self._scrub(_error_message(text))}",
                            retry_after=parse_retry_after(exc.headers, self.config.retry_after_max_s))
        except TimeoutError:
            return _Outcome(None, reason="timeout", detail=f"timed out after {self.config.timeout_s}s")
        except urllib.error.URLError as exc:
            kind = "timeout" if isinstance(exc.reason, TimeoutError) else "connection"
            return _Outcome(None, reason=kind, detail=f"{kind}: {self._scrub(str(exc.reason))}")
        except (OSError, http.client.HTTPException) as exc:
            return _Outcome(None, reason="connection", detail=f"connection: {self._scrub(repr(exc))}")
        try:
            return _Outcome(status, payload=json.loads(raw))
        except ValueError:
            return _Outcome(status, reason="malformed", detail=f"HTTP {status}: response is not JSON")

    def _scrub(self, text: str) -> str:
        key = self._key.reveal()
        text = text.replace(key, "<redacted>") if key else text
        return text[:300]


def _coerce(request: RequestLike) -> ChatRequest:
    if isinstance(request, ChatRequest):
        return request
    if isinstance(request, str):
        return ChatRequest.user(request)
    if isinstance(request, list):
        return ChatRequest(messages=request)
    raise TypeError(f"expected ChatRequest, str or list of messages, got {type(request).__name__}")


def _error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    except (ValueError, AttributeError):
        pass
    return text.strip()


def _parse_success(payload: Any) -> ChatResult:
    """Text of every choice plus usage; a 200 without choices is a failed ("malformed") result."""
    choices = payload.get("choices") if isinstance(payload, dict) else None
    if not isinstance(choices, list) or not choices:
        return ChatResult(error="response has no choices", reason="malformed")
    texts, reasons = [], []
    for choice in sorted(choices, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0):
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            return ChatResult(error="choice without message", reason="malformed")
        texts.append(message.get("content") or "")
        reasons.append(choice.get("finish_reason"))
    usage = None
    raw = payload.get("usage")
    if isinstance(raw, dict):
        usage = Usage(int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0))
    return ChatResult(text=texts[0], texts=texts, finish_reason=reasons[0], finish_reasons=reasons,
                      usage=usage)
