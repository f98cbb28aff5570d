"""Errors reach the job (issue 15 item 6): a child the apiserver rejects, or pods that admission
refuses, end in a condition with the apiserver's own message and an event, not a retry loop in the
operator's log. And a job whose memory plan cannot fit the nodes' GPUs fails before any child exists."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.jobs import apply, jobs, tiny, wait_state

pytestmark = pytest.mark.cluster


def _events(kube, namespace: str, name: str, reason: str) -> list:
    items = client.CoreV1Api(kube).list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}").items
    return [e for e in items if e.reason == reason]


def test_a_volume_the_apiserver_rejects_fails_the_job_with_its_message(kube, namespace, dhad_operator):
    bad = {"volumes": [{"name": "scratch_space", "emptyDir": {}}], "volumeMounts": [{"name": "scratch_space", "mountPath": "/scratch"}]}
    apply(kube, namespace, tiny("sft", podTemplate=bad))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 30)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "ChildRejected"
    assert "Job tiny-sft-sft-1" in condition["message"] and "volumes[" in condition["message"]  # the apiserver's field path
    assert failed["status"].get("attempt", 0) == 0 and not jobs(kube, namespace, "tiny-sft")
    (event,) = wait_for(lambda: _events(kube, namespace, "tiny-sft", "ChildRejected"), 30, "a ChildRejected event")
    assert event.type == "Warning" and "volumes[" in event.message


def test_pods_refused_by_pod_security_fail_the_job_with_the_admission_message(kube, namespace, dhad_operator):
    client.CoreV1Api(kube).patch_namespace(namespace, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
    apply(kube, namespace, tiny("sft", podTemplate={"securityContext": {"capabilities": {"add": ["IPC_LOCK"]}}}))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 60)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "PodsRejected"
    assert "violates PodSecurity" in condition["message"] and "IPC_LOCK" in condition["message"]
    wait_for(lambda: _events(kube, namespace, "tiny-sft", "PodsRejected"), 30, "a PodsRejected event")
    wait_for(lambda: not [j for j in jobs(kube, namespace, "tiny-sft") if not j.metadata.deletion_timestamp], 30, "the Job removed")


def test_a_plan_that_exceeds_the_nodes_gpu_memory_fails_the_job_before_any_child(kube, namespace, dhad_operator):
    # the kwok GPU nodes carry GPU feature discovery's labels of an H100 80GB; full fine-tuning of a 7B
    # model with ddp needs about 113 GiB per GPU
    apply(kube, namespace, tiny("sft", model={"uri": "hf://meta-llama/Llama-2-7b-hf"}, resources={"nodes": 1, "gpusPerNode": 8}))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 30)
    conditions = {c["type"]: c for c in failed["status"]["conditions"]}
    assert conditions["Planned"]["status"] == "False" and conditions["Planned"]["reason"] == "PlanExceedsGPUMemory"
    assert "more than the 79.6 GiB of one NVIDIA-H100-80GB-HBM3" in conditions["Planned"]["message"]
    assert conditions["Failed"]["reason"] == "PlanExceedsGPUMemory"
    core = client.CoreV1Api(kube)
    assert not jobs(kube, namespace, "tiny-sft")
    assert not core.list_namespaced_config_map(namespace, label_selector="dhad.dev/job=tiny-sft").items
    (event,) = wait_for(lambda: _events(kube, namespace, "tiny-sft", "PlanExceedsGPUMemory"), 30, "a PlanExceedsGPUMemory event")
    assert event.type == "Warning"
