"""Prometheus metrics: jobs by kind and state, restarts by reason, reconcile duration, errors, API
requests, the work queue (client-go's names: depth, adds, queue latency, retries), leadership."""

from __future__ import annotations

import threading

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry()
for _standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # process_*, python_info, python_gc_*
    REGISTRY.register(_standard)
RESTARTS = Counter("dhad_restarts", "Attempts ended and restarted, by reason", ["kind", "reason"], registry=REGISTRY)
RECONCILE_SECONDS = Histogram("dhad_reconcile_duration_seconds", "Time of one reconcile", ["kind"], registry=REGISTRY,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("dhad_reconcile_errors", "Reconciles that raised", ["kind"], registry=REGISTRY)
API_REQUESTS = Counter("dhad_api_requests", "Kubernetes API requests made by the operator", ["verb"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("dhad_workqueue_depth", "Keys waiting in the work queue", registry=REGISTRY)
QUEUE_ADDS = Counter("dhad_workqueue_adds", "Keys added to the work queue (a key already waiting is not added again)", registry=REGISTRY)
QUEUE_LATENCY = Histogram("dhad_workqueue_queue_duration_seconds", "Time a key waited in the queue before a worker took it",
                          registry=REGISTRY, buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
QUEUE_RETRIES = Counter("dhad_workqueue_retries", "Keys requeued after an error, with backoff", registry=REGISTRY)
QUEUE_LONGEST = Gauge("dhad_workqueue_longest_running_processor_seconds", "How long the longest running reconcile has run",
                      registry=REGISTRY)
LEADER = Gauge("dhad_leader", "1 while this replica holds the Lease and may write", registry=REGISTRY)


JOB_LABELS = ["namespace", "kind", "job"]
STATES = ("Pending", "Queued", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
# (metric, help, status.progress key): per-job gauges, labelled also by the sub-stage reporting
PROGRESS_GAUGES = (
    ("dhad_job_step", "Last completed optimizer step of the running sub-stage (status.progress.step)", "step"),
    ("dhad_job_total_steps", "Planned steps of the running sub-stage (status.progress.totalSteps)", "totalSteps"),
    ("dhad_job_loss", "Latest training loss rank 0 reported (status.progress.loss)", "loss"),
    ("dhad_job_tokens_per_second", "Training throughput over all processes (status.progress.tokensPerSecond)", "tokensPerSecond"),
    ("dhad_job_eta_seconds", "Estimated seconds to the end of the sub-stage (status.progress.etaSeconds)", "etaSeconds"),
)


def _timestamp(value) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp() if value else None
    except ValueError:
        return None


class JobStates:
    """The last status seen of every job: counts per (kind, state), and per-job gauges from that status
    (state, progress, restarts, time of the last progress) labelled namespace/kind/job. A job set to
    state None (deleted) loses all its series at once."""

    def __init__(self):
        self._status: dict[tuple[str, str, str], dict] = {}
        self._lock = threading.Lock()

    def set(self, kind: str, namespace: str, name: str, state: str | None, status: dict | None = None) -> None:
        with self._lock:
            if state is None:
                self._status.pop((kind, namespace, name), None)
            else:
                self._status[(kind, namespace, name)] = {**(status or {}), "state": state}

    def collect(self):
        with self._lock:
            jobs = sorted(self._status.items())
        family = GaugeMetricFamily("dhad_jobs", "Dhad jobs by kind and state", labels=["kind", "state"])
        counts: dict[tuple[str, str], int] = {}
        for (kind, _, _), status in jobs:
            counts[(kind, status["state"])] = counts.get((kind, status["state"]), 0) + 1
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], count)
        yield family
        state = GaugeMetricFamily("dhad_job_state", "1 for the job's state (status.state), 0 for the others",
                                  labels=[*JOB_LABELS, "state"])
        restarts = GaugeMetricFamily("dhad_job_restarts", "Gang restarts counted against restartPolicy.maxRestarts (status.restarts)",
                                     labels=JOB_LABELS)
        last = GaugeMetricFamily("dhad_job_last_progress_timestamp_seconds",
                                 "When rank 0 last reported progress (status.progress.updatedAt, else the attempt's start)",
                                 labels=JOB_LABELS)
        gauges = [(GaugeMetricFamily(name, text, labels=[*JOB_LABELS, "stage"]), key) for name, text, key in PROGRESS_GAUGES]
        for (kind, namespace, name), status in jobs:
            labels = [namespace, kind, name]
            for value in STATES:
                state.add_metric([*labels, value], 1.0 if status["state"] == value else 0.0)
            restarts.add_metric(labels, float(status.get("restarts") or 0))
            progress = status.get("progress") or {}
            when = _timestamp(progress.get("updatedAt")) or _timestamp(status.get("attemptStartTime"))
            if when is not None:
                last.add_metric(labels, when)
            stage = str(status.get("stage") or "")
            for family_, key in gauges:
                if isinstance(progress.get(key), int | float):
                    family_.add_metric([*labels, stage], float(progress[key]))
        yield state
        yield restarts
        yield last
        for family_, _ in gauges:
            yield family_


JOB_STATES = JobStates()
REGISTRY.register(JOB_STATES)


def serve(port: int, address: str = "0.0.0.0") -> None:
    start_http_server(port, addr=address, registry=REGISTRY)
