"""The operator on the real control plane with kwok GPU nodes: children, success, gang restarts."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.jobs import apply, exit_pod, get, jobs, pods, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster


def test_sft_job_creates_its_children_and_succeeds(kube, namespace, dhad_operator, gpu_nodes):
    apply(kube, namespace, tiny("sft", podTemplate={"annotations": {"dhad.test/kwok-exit": "0", "dhad.test/kwok-delay": "1s"}}))
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 90)
    core, batch = client.CoreV1Api(kube), client.BatchV1Api(kube)
    services = core.list_namespaced_service(namespace).items  # the namespace's one, no job's own
    assert [s.metadata.name for s in services] == ["dhad-workers"] and not services[0].metadata.owner_references
    assert services[0].spec.cluster_ip == "None" and services[0].spec.publish_not_ready_addresses
    spec_cm = core.read_namespaced_config_map("tiny-sft-sft-spec", namespace)
    job_file = json.loads(spec_cm.data["job.json"])
    assert job_file["kind"] == "SFTJob" and job_file["spec"]["training"]["maxSteps"] == 20
    assert job_file["resolved"]["modelUri"] == "s3://dhad-demo/models/tiny-base"
    made = batch.list_namespaced_job(namespace, label_selector="dhad.dev/job=tiny-sft").items
    assert [j.metadata.name for j in made] == ["tiny-sft-sft-1"]
    job = made[0]
    assert job.spec.completions == job.spec.parallelism == 2 and job.spec.backoff_limit == 0
    assert job.spec.completion_mode == "Indexed" and job.spec.template.spec.subdomain == "dhad-workers"
    assert job.metadata.owner_references[0].kind == "SFTJob"
    ran = pods(kube, namespace, "tiny-sft")
    assert sorted(p.spec.node_name for p in ran) == sorted(gpu_nodes)
    env = {e.name: e.value for e in ran[0].spec.containers[0].env}
    assert env["MASTER_ADDR"] == "tiny-sft-sft-1-0.dhad-workers"
    status = done["status"]
    assert status["outputModel"].endswith("/sft/model") and status["attempt"] == 1 and status.get("restarts", 0) == 0
    assert status["observedGeneration"] == done["metadata"]["generation"]
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "True"


def test_failed_pod_restarts_the_gang_after_backoff(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    first = running_pods(kube, namespace, "tiny-sft", 1, 2)
    exit_pod(kube, namespace, first[0], 1, "CUDA error: an illegal memory access")
    restarting = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Restarting", 30)
    assert "illegal memory access" in restarting["status"]["conditions"][-1]["message"] or any(
        "illegal memory access" in c["message"] for c in restarting["status"]["conditions"])
    second = running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    # the first attempt's Job and pods were gone before the second started
    assert [j.metadata.name for j in jobs(kube, namespace, "tiny-sft")] == ["tiny-sft-sft-2"]
    for pod in second:
        exit_pod(kube, namespace, pod, 0)
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    assert done["status"]["restarts"] == 1 and done["status"]["attempt"] == 2


def test_exhausted_budget_fails_with_the_reason(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", restartPolicy={"maxRestarts": 1, "backoffSeconds": 1}))
    for attempt in (1, 2):
        pod = running_pods(kube, namespace, "tiny-sft", attempt, 2, 60)[1]
        exit_pod(kube, namespace, pod, 70, json.dumps({"reason": "WorkerFailed", "message": f"loss is NaN at attempt {attempt}"}))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 60)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "BackoffLimitExceeded" and "loss is NaN at attempt 2" in condition["message"]
    assert failed["status"]["restarts"] == 2
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft") or all(j.status.failed or j.metadata.deletion_timestamp for j in jobs(kube, namespace, "tiny-sft")), 30, "no running Job")


def test_bad_config_exit_fails_without_restart(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    pod = running_pods(kube, namespace, "tiny-sft", 1, 2)[0]
    exit_pod(kube, namespace, pod, 78, json.dumps({"reason": "BadConfig", "message": "spec.data[0].uri: s3://dhad-demo/x.jsonl does not exist"}))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 30)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "BadConfig" and "does not exist" in condition["message"]
    assert failed["status"]["attempt"] == 1 and failed["status"].get("restarts", 0) == 0
    assert [j.metadata.name for j in jobs(kube, namespace, "tiny-sft")] in (["tiny-sft-sft-1"], [])


def test_disruption_restarts_without_using_the_budget(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", restartPolicy={"maxRestarts": 0, "backoffSeconds": 1}))
    pod = running_pods(kube, namespace, "tiny-sft", 1, 2)[0]
    exit_pod(kube, namespace, pod, 143, json.dumps({"reason": "Preempted", "message": "SIGTERM: node drained; checkpoint saved"}))
    second = running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    status = get(kube, namespace, "SFTJob", "tiny-sft")["status"]
    assert status.get("restarts", 0) == 0 and status["disruptions"] == 1
    for pod in second:
        exit_pod(kube, namespace, pod, 0)
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
