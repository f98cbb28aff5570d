"""Requests-per-minute and tokens-per-minute pacing shared by all threads of one client.

GCRA with no burst: each request is given a start time so that requests and (estimated) tokens are spread
evenly over the minute. Reserving returns a delay instead of sleeping under the lock, so waiters are
served in arrival order and nobody spins. Token estimates are reconciled with `usage` afterwards, and a
Retry-After pauses every thread, not just the one that was told.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimiter:
    def __init__(
        self,
        requests_per_minute: float | None,
        tokens_per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._req_interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._tok_interval = 60.0 / tokens_per_minute if tokens_per_minute else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._next_req = now  # earliest start of the next request (theoretical arrival time)
        self._next_tok = now
        self._paused_until = now

    def reserve(self, tokens: int) -> float:
        """Book a slot for a request of `tokens` estimated tokens; returns seconds to wait before sending."""
        with self._lock:
            now = self._clock()
            start = max(now, self._paused_until, self._next_req, self._next_tok)
            if self._req_interval:
                self._next_req = start + self._req_interval
            if self._tok_interval:
                self._next_tok = start + tokens * self._tok_interval
            return start - now

    def reconcile(self, estimated: int, actual: int) -> None:
        """Correct a booking once `usage` says how many tokens the request really used."""
        if self._tok_interval:
            with self._lock:
                self._next_tok += (actual - estimated) * self._tok_interval

    def pause(self, seconds: float) -> None:
        """Hold every new request for `seconds` (the server said Retry-After)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + seconds)
