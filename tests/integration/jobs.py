"""Helpers for operator tests: apply Dhad jobs, read them, drive kwok pods to an exit code."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml
from kubernetes import client

from dhad_api.jobs import KINDS
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parents[2]
PLURAL = {i.kind.value: i.plural for i in KINDS.values()}
EXIT = "dhad.test/kwok-exit"
FINISH = {"annotations": {EXIT: "0", "dhad.test/kwok-delay": "1s"}}  # podTemplate: every pod exits 0 after 1 s


def tiny(name: str, **spec_changes) -> dict:
    """A tiny example made runnable on kwok: a direct model URI, 2 nodes x 8 GPUs, fast backoff."""
    doc = yaml.safe_load((REPO / "examples" / "tiny" / f"{name}.yaml").read_text())
    doc["spec"]["model"] = {"uri": "s3://dhad-demo/models/tiny-base"}
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 8}
    doc["spec"]["restartPolicy"] = {"backoffSeconds": 1, "maxBackoffSeconds": 2}
    for key, value in spec_changes.items():
        doc["spec"][key] = value
    return doc


def apply(kube, namespace: str, doc: dict, name: str | None = None) -> dict:
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name or doc["metadata"]["name"], "namespace": namespace}
    return client.CustomObjectsApi(kube).create_namespaced_custom_object(
        "dhad.dev", "v1alpha1", namespace, PLURAL[doc["kind"]], doc, field_validation="Strict")


def get(kube, namespace: str, kind: str, name: str) -> dict:
    return client.CustomObjectsApi(kube).get_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL[kind], name)


def patch_spec(kube, namespace: str, kind: str, name: str, spec: dict) -> None:
    client.CustomObjectsApi(kube).patch_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL[kind], name, {"spec": spec})


def wait_state(kube, namespace: str, kind: str, name: str, state: str, timeout: float = 60) -> dict:
    def reached():
        obj = get(kube, namespace, kind, name)
        return obj if (obj.get("status") or {}).get("state") == state else None

    try:
        return wait_for(reached, timeout, f"{kind}/{name} {state}")
    except AssertionError:
        raise AssertionError(f"{kind}/{name} not {state}; status: {get(kube, namespace, kind, name).get('status')}") from None


def pods(kube, namespace: str, job: str, attempt: int | None = None, phase: str | None = None) -> list:
    selector = f"dhad.dev/job={job}" + (f",dhad.dev/attempt={attempt}" if attempt else "")
    items = client.CoreV1Api(kube).list_namespaced_pod(namespace, label_selector=selector).items
    return [p for p in items if phase is None or p.status.phase == phase]


def running_pods(kube, namespace: str, job: str, attempt: int, count: int, timeout: float = 60) -> list:
    return wait_for(lambda: (lambda ps: ps if len(ps) == count else None)(pods(kube, namespace, job, attempt, "Running")),
                    timeout, f"{count} running pods of {job} attempt {attempt}")


def exit_pod(kube, namespace: str, pod, code: int, message: str = "") -> None:
    """kwok's dhad-pod-exit Stage terminates the pod with this code and termination message."""
    client.CoreV1Api(kube).patch_namespaced_pod(pod.metadata.name, namespace, {"metadata": {"annotations": {
        EXIT: str(code), "dhad.test/kwok-message": message}}})


def jobs(kube, namespace: str, job: str) -> list:
    return client.BatchV1Api(kube).list_namespaced_job(namespace, label_selector=f"dhad.dev/job={job}").items
