"""Status is exactly what decide() computes (issue 17's status defects, on the real control plane):
keys it removes are gone, values the trainer reports are checked before they are written (so one bad
value cannot stop suspend, deadline or TTL), and the TTL clean-up is announced once."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.jobs import (
    FINISH,
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


def report(kube, namespace: str, config_map: str, **progress) -> None:
    """What rank 0 does: a merge patch of the progress key of the job's progress ConfigMap."""
    client.CoreV1Api(kube).patch_namespaced_config_map(config_map, namespace, {"data": {"progress": json.dumps(progress)}})


def test_a_backoff_that_has_passed_leaves_no_next_attempt_after(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", restartPolicy={"backoffSeconds": 2, "maxBackoffSeconds": 2}))
    first = running_pods(kube, namespace, "tiny-sft", 1, 2)
    exit_pod(kube, namespace, first[0], 70, json.dumps({"reason": "WorkerFailed", "message": "boom"}))
    restarting = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Restarting", 30)
    assert restarting["status"]["nextAttemptAfter"]
    running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    status = wait_for(lambda: (lambda s: s if s.get("attempt") == 2 else None)(get(kube, namespace, "SFTJob", "tiny-sft")["status"]),
                      30, "attempt 2 recorded")
    assert "nextAttemptAfter" not in status, f"a stale nextAttemptAfter stayed: {status['nextAttemptAfter']}"


def test_the_next_sub_stage_does_not_show_the_previous_ones_progress(kube, namespace, dhad_operator):
    sft = tiny("sft")
    sft["spec"]["respond"] = {"prompts": [{"uri": "s3://dhad-demo/data/arabic_prompts.jsonl", "schema": "prompt-completion"}],
                              "teacher": {"endpoint": {"baseUrl": "https://teacher.example/v1", "model": "teacher-large"}}}
    apply(kube, namespace, sft)
    respond = running_pods(kube, namespace, "tiny-sft", 1, 1)  # respond: one pod (rank 0 answers; stage_pods)
    report(kube, namespace, "tiny-sft-sft-progress", stage="respond", step=10, totalSteps=10, updatedAt="2026-01-01T00:00:00Z")
    wait_for(lambda: ((get(kube, namespace, "SFTJob", "tiny-sft")["status"].get("progress") or {}).get("percent") == 100), 30, "respond at 100%")
    for pod in respond:
        exit_pod(kube, namespace, pod, 0)
    wait_for(lambda: [p for p in pods(kube, namespace, "tiny-sft", phase="Running") if p.metadata.labels["dhad.dev/stage"] == "sft"], 60, "sft running")
    status = wait_for(lambda: (lambda s: s if s.get("stage") == "sft" and s.get("state") == "Running" else None)(
        get(kube, namespace, "SFTJob", "tiny-sft")["status"]), 30, "the sft sub-stage Running")
    assert "progress" not in status, f"sft shows respond's progress: {status['progress']}"


def test_bad_values_from_the_trainer_do_not_stop_suspend(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    report(kube, namespace, "tiny-sft-sft-progress", stage="sft", step=3, totalSteps=20, updatedAt="2026-01-01T00:00:00Z",
           scores={"acc": "high", "f1": 0.5}, lastCheckpoint="s3://dhad-demo/" + "x" * 5000, loss="NaN")
    flagged = wait_for(lambda: (lambda o: o if any(c["type"] == "InvalidProgressReport" and c["status"] == "True"
                                                   for c in o["status"].get("conditions", [])) else None)(
        get(kube, namespace, "SFTJob", "tiny-sft")), 30, "the bad report flagged")
    status = flagged["status"]
    assert status["scores"] == {"f1": 0.5} and len(status["lastCheckpoint"]) == 1024 and status["progress"]["step"] == 3
    message = next(c["message"] for c in status["conditions"] if c["type"] == "InvalidProgressReport")
    assert "scores.acc" in message and "loss" in message
    patch_spec(kube, namespace, "SFTJob", "tiny-sft", {"suspend": True})
    wait_state(kube, namespace, "SFTJob", "tiny-sft", "Suspended", 30)
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft"), 60, "pods stopped")


def test_ttl_clean_up_is_announced_once(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", podTemplate=FINISH, ttlSecondsAfterFinished=3))
    core = client.CoreV1Api(kube)
    # one child is slow to go (a finalizer), and changes while it goes: every event about it reaches the operator
    wait_for(lambda: core.read_namespaced_config_map("tiny-sft-sft-progress", namespace), 30, "the progress ConfigMap")
    core.patch_namespaced_config_map("tiny-sft-sft-progress", namespace, {"metadata": {"finalizers": ["dhad.test/hold"]}})
    try:
        wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
        wait_for(lambda: core.read_namespaced_config_map("tiny-sft-sft-progress", namespace).metadata.deletion_timestamp, 30, "TTL clean-up")
        for i in range(3):
            core.patch_namespaced_config_map("tiny-sft-sft-progress", namespace, {"metadata": {"annotations": {"touched": str(i)}}})
            time.sleep(1)
    finally:
        core.patch_namespaced_config_map("tiny-sft-sft-progress", namespace, {"metadata": {"finalizers": None}})
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft") and not pods(kube, namespace, "tiny-sft")
             and not core.list_namespaced_config_map(namespace, label_selector="dhad.dev/job=tiny-sft").items
             and not core.list_namespaced_service_account(namespace, label_selector="dhad.dev/job=tiny-sft").items, 60, "every child gone")
    time.sleep(2)
    events = [e for e in core.list_namespaced_event(namespace, field_selector="involvedObject.name=tiny-sft").items if e.reason == "TTLExpired"]
    assert sum(e.count or 1 for e in events) == 1, [e.message for e in events]
    assert get(kube, namespace, "SFTJob", "tiny-sft")["status"]["state"] == "Succeeded"
