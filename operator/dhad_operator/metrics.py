"""Prometheus metrics: jobs by kind and state, restarts by reason, reconcile duration, errors, API requests."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
RESTARTS = Counter("dhad_restarts", "Attempts ended and restarted, by reason", ["kind", "reason"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("dhad_reconcile_duration_seconds", "Time of one reconcile", ["kind"], registry=REGISTRY,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("dhad_reconcile_errors", "Reconciles that raised", ["kind"], registry=REGISTRY)
API_REQUESTS = Counter("dhad_api_requests", "Kubernetes API requests made by the operator", ["verb"], registry=REGISTRY)


class JobStates:
    """The last state seen of every job, exported as a gauge of counts per (kind, state)."""

    def __init__(self):
        self._states: dict[tuple[str, str, str], str] = {}
        self._lock = threading.Lock()

    def set(self, kind: str, namespace: str, name: str, state: str | None) -> None:
        with self._lock:
            if state is None:
                self._states.pop((kind, namespace, name), None)
            else:
                self._states[(kind, namespace, name)] = state

    def collect(self):
        family = GaugeMetricFamily("dhad_jobs", "Dhad jobs by kind and state", labels=["kind", "state"])
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for (kind, _, _), state in self._states.items():
                counts[(kind, state)] = counts.get((kind, state), 0) + 1
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], count)
        yield family


JOB_STATES = JobStates()
REGISTRY.register(JOB_STATES)


def serve(port: int, address: str = "0.0.0.0") -> None:
    start_http_server(port, addr=address, registry=REGISTRY)
