"""One client for every OpenAI-compatible model endpoint Dhad calls: the teacher and the AI judge."""

from .client import EndpointClient, estimate_tokens, parse_retry_after
from .limiter import RateLimiter
from .types import ChatRequest, ChatResult, EndpointConfig, EndpointStats, Usage

__all__ = [
    "ChatRequest",
    "ChatResult",
    "EndpointClient",
    "EndpointConfig",
    "EndpointStats",
    "RateLimiter",
    "Usage",
    "estimate_tokens",
    "parse_retry_after",
]
