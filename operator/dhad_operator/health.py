"""/healthz and /readyz, served from process start so a standby waiting for the Lease stays alive.

/healthz: the process serves HTTP (a standby waiting for the Lease is healthy). /readyz: this replica
leads and kopf has started its watches.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse


class Health:
    def __init__(self):
        self.ready = False
        self.leading = False

    def healthy(self) -> bool:
        return True

    def serve(self, url: str) -> None:
        parsed = urlparse(url)
        health = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's naming
                ok = {"/healthz": health.healthy, "/readyz": lambda: health.ready}.get(self.path, lambda: False)()
                self.send_response(200 if ok else 503)
                self.end_headers()
                self.wfile.write(b"ok\n" if ok else b"not ready\n")

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer((parsed.hostname or "0.0.0.0", parsed.port or 8081), Handler)
        threading.Thread(target=server.serve_forever, name="dhad-health", daemon=True).start()


HEALTH = Health()
