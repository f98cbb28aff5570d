"""Runs the reconcile for one job at a time per key, and again later when the plan asks to."""

from __future__ import annotations

import heapq
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from dhad_api.jobs import parse_spec
from dhad_operator import metrics
from dhad_operator.k8s import Kube
from dhad_operator.reconcile import decide
from dhad_operator.render import Defaults
from dhad_operator.status import now_utc

log = logging.getLogger("dhad.controller")
Key = tuple[str, str, str]  # kind, namespace, name


class Controller:
    """Serialises reconciles of the same job (events from the job, its Jobs, Pods and progress)."""

    def __init__(self, kube: Kube, defaults: Defaults, resync_seconds: float = 60.0, workers: int = 4):
        self.kube, self.defaults, self.resync_seconds = kube, defaults, resync_seconds
        self._locks: dict[Key, threading.Lock] = {}
        self._guard = threading.Lock()
        self._due: list[tuple[float, Key]] = []
        self._scheduled: dict[Key, float] = {}  # one pending run per job: the earliest asked for
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dhad-requeue")
        self._stopped = False
        threading.Thread(target=self._requeue_loop, name="dhad-requeue", daemon=True).start()

    def _lock(self, key: Key) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())

    def reconcile(self, kind: str, namespace: str, name: str) -> None:
        key = (kind, namespace, name)
        with self._lock(key):
            started = time.monotonic()
            try:
                self._reconcile(key)
            except Exception:
                metrics.ERRORS.labels(kind).inc()
                log.exception("reconcile failed", extra={"job": f"{kind}/{namespace}/{name}"})
                self.requeue(key, 5)
            finally:
                metrics.RECONCILE_SECONDS.labels(kind).observe(time.monotonic() - started)

    def _reconcile(self, key: Key) -> None:
        kind, namespace, name = key
        obj = self.kube.get(kind, namespace, name)  # fresh: an event body may predate our last status patch
        if obj is None or obj["metadata"].get("deletionTimestamp"):
            metrics.JOB_STATES.set(kind, namespace, name, None)
            return
        try:
            spec = parse_spec(kind, obj["spec"])
        except ValueError:
            spec = None
        observed = self.kube.observe(obj, spec)
        now = now_utc()
        plan = decide(obj, observed, now, self.defaults)
        self.kube.execute(obj, plan, now)
        if plan.restart_reason:
            metrics.RESTARTS.labels(kind, plan.restart_reason).inc()
        metrics.JOB_STATES.set(kind, namespace, name, plan.status.get("state"), plan.status)
        if plan.status.get("state") in ("Succeeded", "Failed") and plan.requeue_after is None:
            return
        self.requeue(key, min(plan.requeue_after or self.resync_seconds, self.resync_seconds))

    def enqueue(self, kind: str, namespace: str, name: str) -> None:
        """What event handlers call: a burst of events about one job becomes one reconcile."""
        self.requeue((kind, namespace, name), 0)

    def requeue(self, key: Key, delay: float) -> None:
        due = time.monotonic() + max(delay, 0.0)
        with self._wake:
            if key in self._scheduled and self._scheduled[key] <= due:
                return
            self._scheduled[key] = due
            heapq.heappush(self._due, (due, key))
            self._wake.notify()

    def _requeue_loop(self) -> None:
        while not self._stopped:
            with self._wake:
                while not self._due or self._due[0][0] > time.monotonic():
                    timeout = self._due[0][0] - time.monotonic() if self._due else None
                    self._wake.wait(timeout)
                    if self._stopped:
                        return
                due, key = heapq.heappop(self._due)
                if self._scheduled.get(key) != due:
                    continue  # superseded by an earlier run
                del self._scheduled[key]
            self._pool.submit(self.reconcile, *key)

    def stop(self) -> None:
        self._stopped = True
        with self._wake:
            self._wake.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
