"""/readyz and /healthz, with controller-runtime's meaning, served from process start.

- /readyz is 200 once every watch cache has listed (the informers' first LIST is in), whether this
  replica leads or stands by: a standby serves (it can take over within a lease) and counts as
  available, so a Deployment with 2 replicas, maxSurge 0 and maxUnavailable 1 rolls out, and
  `kubectl rollout status` or `helm --wait` finish. Leading is not readiness; the `dhad_leader`
  gauge says which replica leads.
- /healthz is 200 unless the replica is wedged: a watch loop has not moved for longer than its own
  read timeout allows, a reconcile has been running far longer than its API calls' timeouts allow,
  the queue's timer stopped, the lease loop stopped, or a leader could not renew (its gate shut at
  the renew deadline) and has not reached the Lease for a lease duration since. The body names what
  is wrong. Failing it makes the kubelet restart the container.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class Health:
    def __init__(self):
        self.ready = lambda: False
        self.problems: list = []  # callables returning a list of what is wedged

    def wedged(self) -> list[str]:
        return [p for check in self.problems for p in check()]

    def serve(self, url: str) -> None:
        parsed = urlparse(url)
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                path = urlparse(self.path).path
                if path == "/readyz":
                    ok, body = health.ready(), "caches not listed yet"
                elif path == "/healthz":
                    problems = health.wedged()
                    ok, body = not problems, "; ".join(problems)
                else:
                    ok, body = False, "not found"
                self.send_response(200 if ok else 503 if path in ("/readyz", "/healthz") else 404)
                self.end_headers()
                self.wfile.write(b"ok\n" if ok else body.encode() + b"\n")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 8081), Handler)
        threading.Thread(target=server.serve_forever, name="dhad-health", daemon=True).start()


HEALTH = Health()
