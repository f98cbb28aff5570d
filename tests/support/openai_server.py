"""A scripted OpenAI-compatible chat server, so endpoint tests plant exact failures instead of mocking.

Replies are chosen from markers in the last user message (or by a `script` callable), so a test states
counts: "[429x2] q" fails twice with 429 + Retry-After and then answers. Markers:

  [refuse] Arabic refusal   [english] English answer   [truncate] finish_reason "length"
  [malformed] 200 with a non-JSON body   [sleep=S] answer after S extra seconds
  [NNN] / [NNNxK] HTTP NNN: 429 and 5xx fail K times (default 1) then answer; other 4xx always fail
  [drop] / [dropxK] close the connection without answering, K times (default 1)

The server checks the bearer key (401 echoing the given key, as OpenAI does, to test redaction),
counts requests per prompt, records arrival times and the peak number of requests in flight.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_STATUS = re.compile(r"\[(\d{3}|drop)(?:x(\d+))?\]")
_SLEEP = re.compile(r"\[sleep=([0-9.]+)\]")


@dataclass
class Reply:
    """One scripted answer; `raw` is sent verbatim (for malformed bodies), `drop` closes the socket."""

    status: int = 200
    content: str | None = None
    finish_reason: str = "stop"
    headers: dict[str, str] = field(default_factory=dict)
    raw: bytes | None = None
    delay_s: float = 0.0
    drop: bool = False


Script = Callable[[dict[str, Any], int], "Reply | None"]


def prompt_of(body: dict[str, Any]) -> str:
    """The key requests are counted under: the last user message's content."""
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return str(message.get("content"))
    return ""


class OpenAIServer:
    """`with OpenAIServer(api_key="k") as srv:` then point a client at `srv.base_url`."""

    def __init__(
        self,
        api_key: str | None = "sk-test",
        *,
        script: Script | None = None,
        latency_s: float = 0.0,
        retry_after_s: float = 1.0,
        prompt_tokens: int = 10,
        completion_tokens: int = 20,
    ) -> None:
        self.api_key = api_key
        self.script = script
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.counts: Counter[str] = Counter()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.bodies: list[dict[str, Any]] = []
        self.unauthorized = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _arrive(self, body: dict[str, Any]) -> int:
        prompt = prompt_of(body)
        with self._lock:
            self.counts[prompt] += 1
            self.times[prompt].append(time.monotonic())
            self.bodies.append(body)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return self.counts[prompt]

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def reply_for(self, body: dict[str, Any], attempt: int) -> Reply:
        """The scripted reply: `script` first, then the markers in the prompt."""
        if self.script is not None:
            reply = self.script(body, attempt)
            if reply is not None:
                return reply
        prompt = prompt_of(body)
        delay = float(m.group(1)) if (m := _SLEEP.search(prompt)) else 0.0
        for m in _STATUS.finditer(prompt):
            code, times = m.group(1), int(m.group(2) or 1)
            if code == "drop":
                if attempt <= times:
                    return Reply(drop=True, delay_s=delay)
                continue
            status = int(code)
            transient = status == 429 or status >= 500
            if not transient or attempt <= times:
                headers = {"Retry-After": f"{self.retry_after_s:g}"} if status == 429 else {}
                return Reply(status=status, headers=headers, delay_s=delay)
        if "[malformed]" in prompt:
            return Reply(raw=b'{"choices": [ this is not json', delay_s=delay)
        if "[refuse]" in prompt:
            return Reply(content="عذرًا، لا يمكنني المساعدة في هذا الطلب.", delay_s=delay)
        if "[english]" in prompt:
            return Reply(content="Sure, here is the answer in English.", delay_s=delay)
        if "[truncate]" in prompt:
            return Reply(content="هذه إجابة مقطوعة", finish_reason="length", delay_s=delay)
        return Reply(content=f"إجابة: {prompt}", delay_s=delay)

    def render(self, body: dict[str, Any], reply: Reply) -> bytes:
        n = int(body.get("n") or 1)
        text = reply.content or ""
        choices = [
            {"index": i, "message": {"role": "assistant", "content": text + (f" #{i}" if i else "")},
             "finish_reason": reply.finish_reason}
            for i in range(n)
        ]
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens * n,
                 "total_tokens": self.prompt_tokens + self.completion_tokens * n}
        doc = {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
               "model": body.get("model"), "choices": choices, "usage": usage}
        return json.dumps(doc, ensure_ascii=False).encode()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a burst of 16+ connects must not overflow the listen backlog
    owner: OpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout test) makes the late answer hit a closed socket: not news."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server_version = "openai-test/1"

    def log_message(self, format: str, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        doc = {"error": {"message": message, "type": "test_error", "code": status}}
        self._send(status, json.dumps(doc).encode(), headers)

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        owner = self.server.owner  # type: ignore[attr-defined]
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        if owner.api_key is not None and given != owner.api_key:
            with owner._lock:
                owner.unauthorized += 1
            return self._error(401, f"Incorrect API key provided: {given}")
        try:
            body = json.loads(raw)
        except ValueError:
            return self._error(400, "body is not JSON")
        attempt = owner._arrive(body)
        try:
            reply = owner.reply_for(body, attempt)
            time.sleep(owner.latency_s + reply.delay_s)
        finally:
            owner._leave()  # before answering, so the client never sees a stale in-flight count
        if reply.drop:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if reply.raw is not None:
            return self._send(reply.status, reply.raw, reply.headers)
        if reply.status != 200:
            return self._error(reply.status, f"scripted {reply.status}", reply.headers)
        self._send(200, owner.render(body, reply), reply.headers)
