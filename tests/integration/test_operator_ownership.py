"""Children are ours by UID, never by name or labels (issue 17's ownership defects, on the real
control plane): a re-created job never adopts its predecessor's children, a labelled pod nobody's Job
made cannot fail a job, a missing child is made again whenever it is missing, and a Job deleted by
hand never has its attempt number reused while its pods still stop."""

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
    pods,
    running_pods,
    tiny,
    wait_state,
)

pytestmark = pytest.mark.cluster


def _condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def test_a_job_recreated_after_an_orphaning_delete_never_adopts_the_old_jobs_children(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", podTemplate=FINISH))
    first = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 90)
    custom = client.CustomObjectsApi(kube)
    custom.delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"], "tiny-sft", propagation_policy="Orphan")
    wait_for(lambda: not any(o["metadata"]["name"] == "tiny-sft" for o in custom.list_namespaced_custom_object(
        "dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"])["items"]), 30, "the old job gone")
    wait_for(lambda: all(not j.metadata.owner_references for j in jobs(kube, namespace, "tiny-sft")), 30, "its Job orphaned")
    apply(kube, namespace, tiny("sft", podTemplate=FINISH))
    second = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("state") in ("Failed", "Succeeded") else None)(
        get(kube, namespace, "SFTJob", "tiny-sft")), 60, "the new job decided")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert second["status"]["state"] == "Failed", f"the new job took over the old one's Complete Job: {second['status']}"
    failed = _condition(second, "Failed")
    assert failed["reason"] == "NameCollision" and "tiny-sft-sft" in failed["message"] and "no owner" in failed["message"]
    assert "outputModel" not in second["status"]


def test_a_child_of_a_deleted_job_waits_for_the_garbage_collector_then_the_new_job_runs(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    core = client.CoreV1Api(kube)
    # hold one child of the old job back, as a slow garbage collector would
    core.patch_namespaced_config_map("tiny-sft-sft-spec", namespace, {"metadata": {"finalizers": ["dhad.test/hold"]}})
    try:
        client.CustomObjectsApi(kube).delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"], "tiny-sft")
        wait_for(lambda: not pods(kube, namespace, "tiny-sft"), 60, "the old pods gone")
        apply(kube, namespace, tiny("sft", podTemplate=FINISH))
        waiting = wait_for(lambda: (lambda o: o if _condition(o, "Created").get("reason") == "WaitingForGarbageCollection" else None)(
            get(kube, namespace, "SFTJob", "tiny-sft")), 30, "waiting for the garbage collector")
        assert waiting["status"]["state"] == "Pending" and not jobs(kube, namespace, "tiny-sft")
    finally:
        core.patch_namespaced_config_map("tiny-sft-sft-spec", namespace, {"metadata": {"finalizers": None}})
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 90)
    spec = core.read_namespaced_config_map("tiny-sft-sft-spec", namespace)
    assert spec.metadata.owner_references[0].uid == done["metadata"]["uid"]


def test_a_labelled_pod_that_no_job_of_ours_made_cannot_fail_the_job(kube, namespace, dhad_operator, gpu_nodes):
    apply(kube, namespace, tiny("sft"))
    real = running_pods(kube, namespace, "tiny-sft", 1, 2)
    # our labels only: with the Job controller's own (controller-uid) labels its Job would adopt the pod
    labels = {k: v for k, v in real[0].metadata.labels.items() if k.startswith("dhad.dev/")}
    spoof = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "spoof", "labels": labels},
             "spec": {"nodeName": gpu_nodes[0], "restartPolicy": "Never", "containers": [{"name": "trainer", "image": "x"}]}}
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, spoof)
    wait_for(lambda: core.read_namespaced_pod("spoof", namespace).status.phase == "Running", 30, "the spoof pod running")
    exit_pod(kube, namespace, core.read_namespaced_pod("spoof", namespace), 78, json.dumps({"reason": "BadConfig", "message": "spoofed"}))
    wait_for(lambda: core.read_namespaced_pod("spoof", namespace).status.phase == "Failed", 30, "the spoof pod failed")
    for pod in real:
        exit_pod(kube, namespace, pod, 0)
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    assert done["status"]["attempt"] == 1 and done["status"].get("restarts", 0) == 0


def test_a_deleted_service_account_is_made_again_while_the_job_runs(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    core = client.CoreV1Api(kube)
    before = core.read_namespaced_service_account("tiny-sft-sft-trainer", namespace).metadata.uid
    core.delete_namespaced_service_account("tiny-sft-sft-trainer", namespace)
    again = wait_for(lambda: (lambda sa: sa if sa.metadata.uid != before else None)(
        core.read_namespaced_service_account("tiny-sft-sft-trainer", namespace)), 30, "the ServiceAccount made again")
    assert again.metadata.owner_references[0].uid == get(kube, namespace, "SFTJob", "tiny-sft")["metadata"]["uid"]


def test_a_role_held_by_another_owner_fails_the_job_and_stops_its_job(kube, namespace, dhad_operator):
    """The Role is made after the Job (off its path), so its refusal comes after the Job exists: the job
    still fails naming the Role's owner, and its Job goes."""
    rbac = client.RbacAuthorizationV1Api(kube)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": "tiny-sft-sft-trainer"}, "rules": []})  # no labels: not in our cache
    apply(kube, namespace, tiny("sft"))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 60)
    condition = _condition(failed, "Failed")
    assert condition["reason"] == "NameCollision" and "Role tiny-sft-sft-trainer" in condition["message"], condition
    wait_for(lambda: not jobs(kube, namespace, "tiny-sft"), 60, "the job's Job gone")
    assert rbac.read_namespaced_role("tiny-sft-sft-trainer", namespace).rules in (None, [])  # never adopted or changed


def test_static_children_missing_after_a_crash_are_made_before_the_job_runs(kube, namespace, control_plane, dhad_operator, tmp_path):
    """The operator died after the progress ConfigMap and before the ServiceAccount (the state is made
    by hand here, as the old operator left it: status attempt 1 written, three children created)."""
    from tests.harness.operator import start_operator

    dhad_operator.stop()
    try:
        obj = apply(kube, namespace, tiny("sft", podTemplate=FINISH))
        owner = [{"apiVersion": "dhad.dev/v1alpha1", "kind": "SFTJob", "name": "tiny-sft", "uid": obj["metadata"]["uid"],
                  "controller": True, "blockOwnerDeletion": True}]
        meta = lambda name: {"name": name, "labels": {"dhad.dev/job": "tiny-sft", "dhad.dev/kind": "SFTJob"}, "ownerReferences": owner}  # noqa: E731
        core = client.CoreV1Api(kube)
        core.create_namespaced_service(namespace, {"metadata": meta("tiny-sft-sft"), "spec": {"clusterIP": "None", "ports": [{"port": 29500}]}})
        core.create_namespaced_config_map(namespace, {"metadata": meta("tiny-sft-sft-spec"), "data": {"job.json": "{}"}})
        core.create_namespaced_config_map(namespace, {"metadata": meta("tiny-sft-sft-progress"), "data": {"progress": "{}"}})
        status = {"attempt": 1, "stage": "sft", "startTime": obj["metadata"]["creationTimestamp"],
                  "attemptStartTime": obj["metadata"]["creationTimestamp"], "state": "Pending"}
        client.CustomObjectsApi(kube).patch_namespaced_custom_object_status(
            "dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"], "tiny-sft", {"status": status})
        operator = start_operator(control_plane, tmp_path, "after-crash")
        try:
            done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 90)
        finally:
            operator.stop()
    finally:
        dhad_operator.start()
    assert core.read_namespaced_service_account("tiny-sft-sft-trainer", namespace).metadata.owner_references[0].uid == done["metadata"]["uid"]
    rbac = client.RbacAuthorizationV1Api(kube)
    assert rbac.read_namespaced_role("tiny-sft-sft-trainer", namespace) and rbac.read_namespaced_role_binding("tiny-sft-sft-trainer", namespace)


def test_a_job_deleted_by_hand_gets_a_new_attempt_number_after_its_pods_are_gone(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft"))
    first = running_pods(kube, namespace, "tiny-sft", 1, 2)
    core = client.CoreV1Api(kube)
    for pod in first:  # the old pods take a while to stop: they must not be counted, nor overlap the next attempt
        core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"finalizers": ["dhad.test/hold"]}})
    try:
        client.BatchV1Api(kube).delete_namespaced_job("tiny-sft-sft-1", namespace, propagation_policy="Background")
        restarting = wait_for(lambda: (lambda o: o if (o.get("status") or {}).get("endedAttempt") == 1 else None)(
            get(kube, namespace, "SFTJob", "tiny-sft")), 30, "attempt 1 ended")
        assert restarting["status"]["state"] == "Restarting" and _condition(restarting, "Restarting")["reason"] == "JobDeleted"
        wait_for(lambda: all(p.metadata.deletion_timestamp for p in first_pods(kube, namespace, first)), 30, "old pods terminating")
        assert [j.metadata.name for j in jobs(kube, namespace, "tiny-sft")] == [], "a new attempt started while the old pods still run"
    finally:
        for pod in first:
            try:
                core.patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"finalizers": None}})
            except client.ApiException:
                pass  # already gone
    second = running_pods(kube, namespace, "tiny-sft", 2, 2, 60)
    assert {p.metadata.labels["dhad.dev/attempt"] for p in second} == {"2"}
    for pod in second:
        exit_pod(kube, namespace, pod, 0)
    done = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Succeeded", 60)
    assert done["status"]["attempt"] == 2 and done["status"]["disruptions"] == 1 and done["status"].get("restarts", 0) == 0


def first_pods(kube, namespace: str, originals: list) -> list:
    """The original pods as they are now (by name: a reused attempt number would bring new pods of the same labels)."""
    names = {p.metadata.name for p in originals}
    return [p for p in pods(kube, namespace, "tiny-sft") if p.metadata.name in names]
