"""Plain data for the endpoint client: config the lead maps the API spec onto, requests, results, stats.

Dataclasses rather than pydantic so the trainer hot path and tests build them without validation cost;
the CR spec is validated once in `dhad_api`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EndpointConfig:
    """How to reach one OpenAI-compatible endpoint (teacher or judge) and how hard to push it.

    The key comes from `api_key` or the env var named by `api_key_env` (the operator injects it from a
    Secret); neither set means no Authorization header (an in-cluster vLLM without auth).
    `max_retries` counts retries, so a request makes at most `max_retries + 1` attempts.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    max_concurrency: int = 8
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    max_retries: int = 4
    timeout_s: float = 120.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_max_s: float = 300.0
    price_prompt_per_1k: float = 0.0
    price_completion_per_1k: float = 0.0
    default_max_tokens: int = 1024
    chars_per_token: float = 3.0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be http(s)://..., got {self.base_url!r}")
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        for name in ("requests_per_minute", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None")
        if self.timeout_s <= 0 or self.backoff_base_s < 0 or self.backoff_max_s < 0:
            raise ValueError("timeout_s must be > 0 and backoff times >= 0")

    def resolve_key(self) -> str | None:
        """The key itself; errors name the env var, never a value."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"env var {self.api_key_env} (endpoint API key) is not set or empty")
            return value
        return None


@dataclass
class ChatRequest:
    """One chat completion; `extra` is merged into the JSON body, `tag` is the caller's and never sent."""

    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stop: list[str] | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    tag: Any = None

    @classmethod
    def user(cls, prompt: str, **kw: Any) -> ChatRequest:
        return cls(messages=[{"role": "user", "content": prompt}], **kw)

    def body(self, model: str) -> dict[str, Any]:
        out: dict[str, Any] = {"model": model, "messages": self.messages}
        for name in ("max_tokens", "temperature", "top_p", "stop", "seed"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.n != 1:
            out["n"] = self.n
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResult:
    """Outcome of one request: `error`/`reason` set instead of raising, so one bad item never sinks a batch.

    `reason` is a short key ("400", "429", "timeout", "connection", "malformed", ...) also used in stats.
    """

    text: str | None = None
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    finish_reasons: list[str | None] = field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    reason: str | None = None
    status: int | None = None
    attempts: int = 0
    latency_s: float = 0.0
    tag: Any = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class EndpointStats:
    """Counters since the client was made. `requests_sent` counts HTTP attempts; succeeded/failed count
    logical requests; `failed` and `retries` are keyed by reason ("429", "500", "timeout", ...)."""

    requests_sent: int = 0
    succeeded: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def failed_total(self) -> int:
        return sum(self.failed.values())
