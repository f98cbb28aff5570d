"""Operating the operator: Prometheus metrics, and high availability through a Lease taken before kopf
starts (a standby stays unready and takes over when the leader dies)."""

from __future__ import annotations

import re
import urllib.request

import pytest

from tests.conftest import wait_for
from tests.harness.operator import metrics_text, start_operator
from tests.integration.jobs import apply, exit_pod, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster


def _metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_jobs_restarts_and_reconciles(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    pod = running_pods(kube, namespace, "tiny-sft", 1, 2)[0]
    exit_pod(kube, namespace, pod, 1, "boom")
    running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    text = wait_for(lambda: (lambda t: t if _metric(t, "dhad_restarts_total", kind="SFTJob", reason="WorkerFailed") >= 1 else None)(
        metrics_text(dhad_operator.process)), 30, "restart counted")
    assert _metric(text, "dhad_jobs", kind="SFTJob") >= 1
    assert _metric(text, "dhad_reconcile_duration_seconds_count", kind="SFTJob") > 0
    assert _metric(text, "dhad_api_requests_total", verb="create") > 0
    assert re.search(r'^dhad_jobs\{kind="SFTJob",state="(Running|Pending|Restarting)"\}', text, re.M)


def test_standby_waits_for_the_lease_and_takes_over(kube, namespace, control_plane, dhad_operator, tmp_path):
    dhad_operator.stop()
    env = {"DHAD_LEADER_ELECTION": "true", "DHAD_LEASE_NAME": "dhad-ha-test", "POD_NAMESPACE": namespace,
           "DHAD_LEASE_DURATION_SECONDS": "6"}
    leader = start_operator(control_plane, tmp_path, "leader", {**env, "POD_NAME": "leader"})
    standby = None
    try:
        standby_url = _start_standby(control_plane, tmp_path, env)
        standby = standby_url[0]
        assert _status(standby_url[1] + "/readyz") == 503 and _status(standby_url[1] + "/healthz") == 200
        apply(kube, namespace, tiny("sft", podTemplate={"annotations": {"dhad.test/kwok-exit": "0", "dhad.test/kwok-delay": "1s"}}))
        wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
        leader.kill()
        wait_for(lambda: _status(standby_url[1] + "/readyz") == 200, 60, "the standby leads")
        apply(kube, namespace, tiny("sft", podTemplate={"annotations": {"dhad.test/kwok-exit": "0", "dhad.test/kwok-delay": "1s"}}), "after-failover")
        wait_state(kube, namespace, "SFTJob", "after-failover", "Succeeded", 60)
    finally:
        leader.stop()
        if standby:
            standby.stop()
        dhad_operator.start()


def _start_standby(control_plane, tmp_path, env):
    import sys

    from tests.harness.processes import Process, free_port

    metrics, health = free_port(), free_port()
    process = Process("standby", [sys.executable, "-m", "dhad_operator", f"--liveness=http://127.0.0.1:{health}/healthz"], tmp_path,
                      env={"KUBECONFIG": str(control_plane.kubeconfig), "DHAD_METRICS_PORT": str(metrics), **env, "POD_NAME": "standby"})
    url = f"http://127.0.0.1:{health}"
    process.wait_ready(lambda: _status(url + "/healthz") == 200, 60)
    return process, url


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as error:
        return error.code
