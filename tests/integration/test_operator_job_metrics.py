"""Training metrics in Prometheus: while a job runs on kwok and reports progress through its ConfigMap as
rank 0 does, the operator's /metrics carries per-job gauges from its status (state, step, total
steps, loss, tokens/s, ETA, restarts, time of the last report) labelled namespace/kind/job, the
standard process metrics are there, and the job's series disappear when it is deleted.

DHAD_RECORD_METRICS=path writes every scrape to `path` (what docs/assets/recorded-metrics.json is:
hack/dashboard_png.py draws the Grafana dashboard from it)."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.harness.operator import metrics_text
from tests.integration.jobs import PLURAL, apply, exit_pod, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster
KEPT = ("dhad_", "process_")
STEPS = 24


def scrape(operator) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics_text(operator.process)):
        for s in family.samples:
            if s.name.startswith(KEPT):
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    for (metric, got), v in samples.items():
        if metric == name and all(dict(got).get(k) == str(x) for k, x in labels.items()):
            return v
    return None


def report(kube, namespace: str, job: str, progress: dict) -> None:
    """What rank 0's progress sink does: merge-patch the job's progress ConfigMap."""
    client.CoreV1Api(kube).patch_namespaced_config_map(f"{job}-sft-progress", namespace,
                                                       {"data": {"progress": json.dumps(progress)}})


def test_per_job_gauges_follow_status_and_vanish_with_the_job(kube, namespace, dhad_operator):
    job, recording = "tiny-sft", []
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, job, 1, 2)
    wait_state(kube, namespace, "SFTJob", job, "Running")
    ids = {"namespace": namespace, "kind": "SFTJob", "job": job}
    started = time.time()
    for step in range(1, STEPS + 1):
        updated = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        loss = round(4.0 * 0.93 ** step + 0.6, 4)
        report(kube, namespace, job, {"stage": "sft", "step": step * 10, "totalSteps": STEPS * 10, "loss": loss,
                                      "tokensPerSecond": 5200.0 + 40 * step, "etaSeconds": (STEPS - step) * 12,
                                      "updatedAt": updated})
        if step == STEPS // 2:  # a worker dies: the gang restarts, counted once
            exit_pod(kube, namespace, running_pods(kube, namespace, job, 1, 2)[0], 1, "worker died")
            running_pods(kube, namespace, job, 2, 2)
        samples = wait_for(lambda s=step: (lambda got: got if value(got, "dhad_job_step", **ids, stage="sft") == s * 10 else None)(
            scrape(dhad_operator)), 30, f"step {step * 10} exported")
        recording.append({"t": time.time(), "samples": [[n, dict(labels), v] for (n, labels), v in samples.items()]})
        assert value(samples, "dhad_job_loss", **ids, stage="sft") == loss
        assert value(samples, "dhad_job_total_steps", **ids, stage="sft") == STEPS * 10
        assert value(samples, "dhad_job_last_progress_timestamp_seconds", **ids) == datetime.fromisoformat(
            updated.replace("Z", "+00:00")).timestamp()
        time.sleep(0.5)
    last = recording[-1]["samples"]
    final = {(n, tuple(sorted(labels.items()))): v for n, labels, v in last}
    assert value(final, "dhad_job_state", **ids, state="Running") == 1 and value(final, "dhad_job_state", **ids, state="Failed") == 0
    assert value(final, "dhad_job_restarts", **ids) == 1
    assert value(final, "dhad_job_tokens_per_second", **ids, stage="sft") == 5200.0 + 40 * STEPS
    assert value(final, "dhad_job_eta_seconds", **ids, stage="sft") == 0
    assert value(final, "process_resident_memory_bytes") > 0 and value(final, "process_cpu_seconds_total") > 0
    assert time.time() - started < 240

    client.CustomObjectsApi(kube).delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"], job)
    gone = wait_for(lambda: (lambda got: got if not any(dict(lab).get("job") == job and n.startswith("dhad_job_")
                                                         for n, lab in got) else None)(scrape(dhad_operator)),
                    60, "the deleted job's series removed")
    recording.append({"t": time.time(), "samples": [[n, dict(labels), v] for (n, labels), v in gone.items()]})
    if os.environ.get("DHAD_RECORD_METRICS"):
        Path(os.environ["DHAD_RECORD_METRICS"]).write_text(json.dumps({"scrapes": recording}, separators=(",", ":")))
