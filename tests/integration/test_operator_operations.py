"""Operating the operator: Prometheus metrics, reads only from watch caches, and high availability
through a Lease that cannot split (a standby is Ready and waits; a holder with a skewed clock keeps
the Lease while it renews; a leader cut off from the apiserver stops writing before a standby leads)."""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.harness.controlplane import write_kubeconfig
from tests.harness.operator import http_status, metric, metrics_text, start_operator
from tests.harness.tcpproxy import PausableProxy
from tests.integration.jobs import FINISH, apply, exit_pod, get, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster
WRITES = ("create", "update", "delete", "patch")


def test_metrics_count_jobs_restarts_reconciles_and_the_queue(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    pod = running_pods(kube, namespace, "tiny-sft", 1, 2)[0]
    exit_pod(kube, namespace, pod, 1, "boom")
    running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    text = wait_for(lambda: (lambda t: t if metric(t, "dhad_restarts_total", kind="SFTJob", reason="WorkerFailed") >= 1 else None)(
        metrics_text(dhad_operator.process)), 30, "restart counted")
    assert metric(text, "dhad_jobs", kind="SFTJob") >= 1
    assert metric(text, "dhad_reconcile_duration_seconds_count", kind="SFTJob") > 0
    assert metric(text, "dhad_api_requests_total", verb="create") > 0
    assert metric(text, "dhad_workqueue_adds_total") > 0 and metric(text, "dhad_workqueue_queue_duration_seconds_count") > 0
    assert metric(text, "dhad_leader") == 1
    assert re.search(r'^dhad_jobs\{kind="SFTJob",state="(Running|Pending|Restarting)"\}', text, re.M)


def test_a_reconcile_reads_nothing_from_the_apiserver_in_the_steady_state(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running = running_pods(kube, namespace, "tiny-sft", 1, 2)
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Running", 30)
    before = metrics_text(dhad_operator.process)
    core = client.CoreV1Api(kube)
    for step in (1, 2, 3):
        core.patch_namespaced_config_map("tiny-sft-sft-progress", namespace, {"data": {"progress": json.dumps(
            {"stage": "sft", "step": step, "totalSteps": 20, "updatedAt": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")})}})
        wait_for(lambda s=step: (get(kube, namespace, "SFTJob", "tiny-sft")["status"].get("progress") or {}).get("step") == s, 30, f"step {step}")
    for pod in running:
        exit_pod(kube, namespace, pod, 0)
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    after = metrics_text(dhad_operator.process)
    reconciles = metric(after, "dhad_reconcile_duration_seconds_count") - metric(before, "dhad_reconcile_duration_seconds_count")
    assert reconciles >= 4
    for verb in ("get", "list"):
        assert metric(after, "dhad_api_requests_total", verb=verb) == metric(before, "dhad_api_requests_total", verb=verb), verb


def _lease_env(namespace: str, name: str, duration: int = 10) -> dict:
    return {"DHAD_LEADER_ELECTION": "true", "DHAD_LEASE_NAME": name, "POD_NAMESPACE": namespace, "DHAD_LEASE_DURATION_SECONDS": str(duration)}


def _holder(kube, namespace: str, lease: str) -> str | None:
    try:
        return client.CoordinationV1Api(kube).read_namespaced_lease(lease, namespace).spec.holder_identity
    except client.ApiException:
        return None


def test_a_standby_is_ready_waits_for_the_lease_and_takes_over(kube, namespace, control_plane, dhad_operator, tmp_path):
    dhad_operator.stop()
    env = _lease_env(namespace, "dhad-ha-test")
    leader = standby = None
    try:
        leader = start_operator(control_plane, tmp_path, "leader", {**env, "POD_NAME": "leader"}, wait="/healthz")
        wait_for(lambda: _holder(kube, namespace, "dhad-ha-test") == "leader", 30, "the first replica leads")
        standby = start_operator(control_plane, tmp_path, "standby", {**env, "POD_NAME": "standby"}, wait="/healthz")
        # controller-runtime's meaning: Ready when its caches have listed, leading or not (rollouts finish)
        wait_for(lambda: http_status(standby.health_url + "/readyz") == 200, 30, "the standby Ready")
        assert http_status(standby.health_url + "/healthz") == 200 and metric(metrics_text(standby), "dhad_leader") == 0
        apply(kube, namespace, tiny("sft", podTemplate=FINISH))
        wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
        leader.kill()
        wait_for(lambda: _holder(kube, namespace, "dhad-ha-test") == "standby", 60, "the standby leads")
        apply(kube, namespace, tiny("sft", podTemplate=FINISH), "after-failover")
        wait_state(kube, namespace, "SFTJob", "after-failover", "Succeeded", 60)
    finally:
        for process in (leader, standby):
            if process:
                process.stop()
        dhad_operator.start()


def test_a_holder_with_a_skewed_clock_keeps_the_lease_while_it_renews(kube, namespace, control_plane, dhad_operator, tmp_path):
    """Expiry is judged by the candidate's own clock since it saw the Lease change, never by renewTime."""
    dhad_operator.stop()
    coordination = client.CoordinationV1Api(kube)
    skew = timedelta(hours=-1)  # the holder's clock is an hour behind
    stamp = lambda: (datetime.now(UTC) + skew).strftime("%Y-%m-%dT%H:%M:%S.%fZ")  # noqa: E731
    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "dhad-skew", "namespace": namespace},
             "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 10, "acquireTime": stamp(), "renewTime": stamp()}}
    api = coordination.api_client

    def put(body: dict, create: bool = False) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases" + ("" if create else "/dhad-skew")
        method, url, headers, data, _ = api.param_serialize("POST" if create else "PUT", path, body=body, auth_settings=["BearerToken"],
                                                            header_params={"Content-Type": "application/json", "Accept": "application/json"})
        api.call_api(method, url, header_params=headers, body=data).read()

    put(lease, create=True)
    renewing = threading.Event()
    renewing.set()

    def ghost():
        while renewing.is_set():
            current = coordination.read_namespaced_lease("dhad-skew", namespace)
            if current.spec.holder_identity != "ghost":
                return
            put({**lease, "metadata": {**lease["metadata"], "resourceVersion": current.metadata.resource_version},
                 "spec": {**lease["spec"], "renewTime": stamp()}})
            time.sleep(2)

    thread = threading.Thread(target=ghost, daemon=True)
    thread.start()
    candidate = None
    try:
        candidate = start_operator(control_plane, tmp_path, "candidate", {**_lease_env(namespace, "dhad-skew"), "POD_NAME": "candidate"}, wait="/healthz")
        deadline = time.monotonic() + 16  # longer than the lease: a candidate trusting renewTime takes over at once
        while time.monotonic() < deadline:
            assert coordination.read_namespaced_lease("dhad-skew", namespace).spec.holder_identity == "ghost", "took a renewed lease"
            time.sleep(0.5)
        renewing.clear()
        thread.join(10)
        stopped = time.monotonic()
        wait_for(lambda: coordination.read_namespaced_lease("dhad-skew", namespace).spec.holder_identity == "candidate", 30, "takeover")
        assert time.monotonic() - stopped >= 7.5, "took the lease before a full lease passed without renewals"
    finally:
        renewing.clear()
        if candidate:
            candidate.stop()
        dhad_operator.start()


def _log_time(process, needle: str) -> float | None:
    """When (epoch seconds) a JSON log line containing `needle` was written."""
    for line in process.log_path.read_text(errors="replace").splitlines():
        if needle in line:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            return datetime.strptime(entry["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def test_a_leader_cut_off_from_the_apiserver_stops_writing_before_a_standby_leads(kube, namespace, control_plane, dhad_operator, tmp_path):
    dhad_operator.stop()
    host, port = control_plane.server.removeprefix("https://").split(":")
    proxy = PausableProxy(host, int(port))
    pki = control_plane.pki
    via_proxy = write_kubeconfig(tmp_path / "via-proxy.kubeconfig", f"https://{host}:{proxy.port}", pki.ca_cert, pki.admin_cert, pki.admin_key)
    env = _lease_env(namespace, "dhad-split")
    leader = standby = None
    try:
        leader = start_operator(control_plane, tmp_path, "cut-off", {**env, "POD_NAME": "cut-off"}, wait="/healthz", kubeconfig=via_proxy)
        wait_for(lambda: _holder(kube, namespace, "dhad-split") == "cut-off", 30, "the first replica leads")
        standby = start_operator(control_plane, tmp_path, "standby", {**env, "POD_NAME": "standby"}, wait="/healthz")
        apply(kube, namespace, tiny("sft"))
        running_pods(kube, namespace, "tiny-sft", 1, 2)
        wait_state(kube, namespace, "SFTJob", "tiny-sft", "Running", 30)
        proxy.pause()
        cut = time.time()
        wait_for(lambda: _log_time(leader, "stopped leading"), 30, "the cut-off leader stops leading")
        writes_when_stopped = sum(metric(metrics_text(leader), "dhad_api_requests_total", verb=v) for v in WRITES)
        wait_for(lambda: _holder(kube, namespace, "dhad-split") == "standby", 40, "the standby leads")
        stopped, took_over = _log_time(leader, "stopped leading"), _log_time(standby, "leading as standby")
        assert stopped and took_over and stopped < took_over, (stopped, took_over)
        assert took_over - cut >= 8, "the standby did not wait a full lease"
        pod = running_pods(kube, namespace, "tiny-sft", 1, 2)[0]  # the new leader handles what happens now
        exit_pod(kube, namespace, pod, 70, json.dumps({"reason": "WorkerFailed", "message": "after the failover"}))
        running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
        proxy.resume()  # the partition heals: whatever the old leader had sent comes through now
        time.sleep(6)
        assert sum(metric(metrics_text(leader), "dhad_api_requests_total", verb=v) for v in WRITES) == writes_when_stopped
        assert metric(metrics_text(leader), "dhad_leader") == 0 and _holder(kube, namespace, "dhad-split") == "standby"
        status = get(kube, namespace, "SFTJob", "tiny-sft")["status"]
        assert (status["attempt"], status["restarts"]) == (2, 1), status
    finally:
        proxy.resume()
        for process in (leader, standby):
            if process:
                process.stop()
        proxy.stop()
        dhad_operator.start()
