"""Suspend, delete, TTL, deadline, fromJob chaining, Kueue and RLAIF sub-stages on the real control plane."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.jobs import (
    FINISH,
    PLURAL,
    apply,
    exit_pod,
    get,
    jobs,
    patch_spec,
    pods,
    running_pods,
    tiny,
    wait_state,
)

pytestmark = pytest.mark.cluster


def test_suspend_stops_pods_and_resume_starts_a_new_attempt(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    patch_spec(kube, namespace, "SFTJob", "tiny-sft", {"suspend": True})
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Suspended", 30)
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft") and not pods(kube, namespace, "tiny-sft"), 60, "pods gone")
    patch_spec(kube, namespace, "SFTJob", "tiny-sft", {"suspend": False})
    second = running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    status = get(kube, namespace, "SFTJob", "tiny-sft")["status"]
    assert status["attempt"] == 2 and status.get("restarts", 0) == 0
    for pod in second:
        exit_pod(kube, namespace, pod, 0)
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)


def test_deleting_the_job_garbage_collects_its_children(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    client.CustomObjectsApi(kube).delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, "sftjobs", "tiny-sft")
    core = client.CoreV1Api(kube)
    selector = "dhad.dev/job=tiny-sft"

    def all_gone():
        return not (jobs(kube, namespace, "tiny-sft") or pods(kube, namespace, "tiny-sft")
                    or core.list_namespaced_config_map(namespace, label_selector=selector).items
                    or core.list_namespaced_service_account(namespace, label_selector=selector).items)

    wait_for(all_gone, 90, "children garbage-collected")


def test_ttl_removes_children_but_keeps_the_job(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", podTemplate=FINISH, ttlSecondsAfterFinished=2))
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    core = client.CoreV1Api(kube)
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft")
             and not core.list_namespaced_config_map(namespace, label_selector="dhad.dev/job=tiny-sft").items, 60, "TTL cleanup")
    kept = get(kube, namespace, "SFTJob", "tiny-sft")
    assert kept["status"]["state"] == "Succeeded" and kept["status"]["outputModel"]


def test_active_deadline_counts_over_the_whole_job(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", activeDeadlineSeconds=4))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 60)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "DeadlineExceeded"
    wait_for(lambda: not pods(kube, namespace, "tiny-sft", phase="Running"), 60, "pods stopped")


def test_from_job_waits_for_the_referenced_job_then_uses_its_model(kube, namespace, dhad_operator):
    sft = tiny("sft", podTemplate=FINISH)
    sft["spec"]["model"] = {"fromJob": {"kind": "PretrainJob", "name": "tiny-pretrain"}}
    apply(kube, namespace, sft)
    waiting = wait_for(lambda: (get(kube, namespace, "SFTJob", "tiny-sft").get("status") or {}).get("conditions"), 30, "status")
    assert any(c["reason"] == "WaitingForModel" and "PretrainJob tiny-pretrain" in c["message"] for c in waiting)
    assert not jobs(kube, namespace, "tiny-sft")
    apply(kube, namespace, tiny("pretrain", podTemplate=FINISH))
    pretrain = wait_state(kube, namespace, "PretrainJob", "tiny-pretrain", "Succeeded", 60)
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    assert done["status"]["resolvedModel"] == pretrain["status"]["outputModel"]
    job_file = json.loads(client.CoreV1Api(kube).read_namespaced_config_map("tiny-sft-sft-spec", namespace).data["job.json"])
    assert job_file["resolved"]["modelUri"] == pretrain["status"]["outputModel"]


def test_queued_job_waits_for_kueue_admission(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", podTemplate=FINISH, queueName="gpu-queue"))
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Queued", 30)
    job = wait_for(lambda: jobs(kube, namespace, "tiny-sft"), 30, "Job")[0]
    assert job.spec.suspend is True and job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert not pods(kube, namespace, "tiny-sft")
    # Kueue admits a workload by unsuspending its Job (and may add node selectors).
    client.BatchV1Api(kube).patch_namespaced_job(job.metadata.name, namespace, {"spec": {"suspend": False}})
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    assert done["status"]["attempt"] == 1


def test_rlaif_runs_feedback_reward_policy_in_order(kube, namespace, dhad_operator):
    rlaif = tiny("rlaif", podTemplate=FINISH)
    rlaif["spec"]["resources"] = {"nodes": 1, "gpusPerNode": 8}
    rlaif["spec"]["feedback"]["judge"] = {"model": {"uri": "s3://dhad-demo/models/judge"}}
    apply(kube, namespace, rlaif)
    done = wait_state(kube, namespace, "RLAIFJob", "tiny-rlaif", "Succeeded", 120)
    stages = done["status"]["stages"]
    assert [s["name"] for s in stages] == ["feedback", "reward", "policy"]
    assert all(s["state"] == "Succeeded" and s["output"].endswith("/" + s["name"]) for s in stages)
    made = sorted((j.metadata.creation_timestamp, j.metadata.name) for j in jobs(kube, namespace, "tiny-rlaif"))
    assert [name for _, name in made] == ["tiny-rlaif-fb-1", "tiny-rlaif-rm-1", "tiny-rlaif-po-1"]
    assert done["status"]["outputModel"].endswith("/policy/model")
    assert PLURAL["RLAIFJob"] == "rlaifjobs"


def test_sft_with_respond_runs_both_sub_stages(kube, namespace, dhad_operator):
    sft = tiny("sft", podTemplate=FINISH)
    sft["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 8}
    sft["spec"]["respond"] = {
        "prompts": [{"uri": "s3://dhad-demo/data/arabic_prompts.jsonl", "schema": "prompt-completion"}],
        "teacher": {"endpoint": {"baseUrl": "https://teacher.example/v1", "model": "teacher-large",
                                 "apiKeySecretRef": {"name": "teacher", "key": "api-key"}}},
    }
    apply(kube, namespace, sft)
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 90)
    assert [s["name"] for s in done["status"]["stages"]] == ["respond", "sft"]
    made = sorted((j.metadata.creation_timestamp, j.metadata.name) for j in jobs(kube, namespace, "tiny-sft"))
    assert [name for _, name in made] == ["tiny-sft-rsp-1", "tiny-sft-sft-1"]
    respond_pod = next(p for p in pods(kube, namespace, "tiny-sft") if p.metadata.labels["dhad.dev/stage"] == "respond")
    env = {e.name: e for e in respond_pod.spec.containers[0].env}
    assert env["DHAD_STAGE"].value == "respond"
    by_stage = {}
    for p in pods(kube, namespace, "tiny-sft"):
        by_stage.setdefault(p.metadata.labels["dhad.dev/stage"], []).append(p)
    assert len(by_stage["respond"]) == 1  # only rank 0 answers: one pod, no GPU for an endpoint teacher
    assert "nvidia.com/gpu" not in (respond_pod.spec.containers[0].resources.limits or {})
    assert env["NNODES"].value == "1" and env["NPROC_PER_NODE"].value == "1"
    assert len(by_stage["sft"]) == 2  # the training gang
    assert all(p.spec.containers[0].resources.limits["nvidia.com/gpu"] == "8" for p in by_stage["sft"])
    assert env["DHAD_TEACHER_API_KEY"].value_from.secret_key_ref.name == "teacher"
    assert done["status"]["outputModel"].endswith("/sft/model")
