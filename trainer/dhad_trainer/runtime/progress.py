"""Rank 0's progress reports: coalesced to one per interval, sent from a background thread.

The operator never talks to the pods; it reads a ConfigMap that only this job's ServiceAccount may
patch. So the sink merge-patches `{"data": {"progress": "<json>"}}` through the Kubernetes API with the
pod's own token and plain urllib (no Kubernetes client in the trainer image). Without that env the
reports go to a JSON-lines file (DHAD_PROGRESS_FILE) or the log. A slow or failing API never blocks
or fails training: reports are dropped with a rate-limited warning, and only the newest is kept.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from dhad_api.reasons import NAMESPACE_ENV, PROGRESS_CONFIGMAP_ENV, PROGRESS_KEY

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
Sink = Callable[[dict], None]


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class KubeConfigMapSink:
    """Merge-patches the progress key of one ConfigMap with the in-cluster ServiceAccount token."""

    def __init__(self, namespace: str, name: str, env: dict | None = None) -> None:
        env = os.environ if env is None else env
        api = env.get("DHAD_KUBE_API")
        if not api:
            host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise RuntimeError("no Kubernetes API: KUBERNETES_SERVICE_HOST and DHAD_KUBE_API are unset")
            api = f"https://{'[' + host + ']' if ':' in host else host}:{port}"
        self.url = f"{api.rstrip('/')}/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.token_file = Path(env.get("DHAD_KUBE_TOKEN_FILE", SA_DIR / "token"))
        ca = Path(env.get("DHAD_KUBE_CA_FILE", SA_DIR / "ca.crt"))
        self.context = ssl.create_default_context(cafile=str(ca)) if self.url.startswith("https") and ca.exists() else None

    def __call__(self, report: dict) -> None:
        body = json.dumps({"data": {PROGRESS_KEY: json.dumps(report, separators=(",", ":"))}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH")
        request.add_header("Content-Type", "application/merge-patch+json")
        if self.token_file.exists():  # re-read each time: projected tokens rotate
            request.add_header("Authorization", "Bearer " + self.token_file.read_text().strip())
        with urllib.request.urlopen(request, timeout=10, context=self.context) as resp:
            resp.read()


class FileSink:
    """Appends one JSON line per report (local mode, tests)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, report: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(report, ensure_ascii=False) + "\n")


def log_sink(report: dict) -> None:
    log.info("progress %s", json.dumps(report, ensure_ascii=False))


def sink_from_env(env: dict | None = None) -> Sink:
    env = os.environ if env is None else env
    if env.get(PROGRESS_CONFIGMAP_ENV) and env.get(NAMESPACE_ENV):
        return KubeConfigMapSink(env[NAMESPACE_ENV], env[PROGRESS_CONFIGMAP_ENV], env)
    if env.get("DHAD_PROGRESS_FILE"):
        return FileSink(env["DHAD_PROGRESS_FILE"])
    return log_sink


class ProgressReporter:
    """Keeps the newest report and sends it at most once per `interval` seconds; `close()` sends the last."""

    def __init__(self, sink: Sink, stage: str, interval: float | None = None) -> None:
        self.sink, self.stage = sink, stage
        self.interval = float(os.environ.get("DHAD_PROGRESS_INTERVAL", "10")) if interval is None else interval
        self.state: dict = {"stage": stage, "step": 0}
        self._dirty = False
        self._lock = threading.Condition()
        self._closed = False
        self._last_error = 0.0
        self._seq = self._sent = 0
        self._send_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._thread.start()

    def update(self, **fields) -> None:
        with self._lock:
            self.state.update({k: v for k, v in fields.items() if v is not None})
            self._dirty = True
            self._lock.notify()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._dirty and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                report, self._dirty = self._snapshot(), False
            self._send(*report)
            time.sleep(self.interval)  # coalesce: whatever arrives meanwhile goes out as one report

    def _snapshot(self) -> tuple[dict, int]:
        self._seq += 1
        return {**self.state, "updatedAt": now_rfc3339()}, self._seq

    def _send(self, report: dict, seq: int) -> None:
        with self._send_lock:
            if seq <= self._sent:  # a newer report (the final one) already went out
                return
            self._sent = seq
            try:
                self.sink(report)
            except Exception as error:  # noqa: BLE001 - progress must never fail training
                if time.monotonic() - self._last_error > 60:
                    log.warning("progress report not delivered: %s", error)
                    self._last_error = time.monotonic()

    def close(self, **final) -> None:
        """Sends a final report (always, even when nothing changed) and stops the thread."""
        with self._lock:
            self.state.update({k: v for k, v in final.items() if v is not None})
            self._closed = True
            self._lock.notify()
            report = self._snapshot()
        self._send(*report)
