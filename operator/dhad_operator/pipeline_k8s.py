"""The Kubernetes calls of the Pipeline reconcile: read a pipeline, its child jobs and the step cache; carry
out a PipelinePlan.

Kept beside k8s.py rather than in it while the operator's client is being rewritten (the `ops` branch):
the same verbs, on the same `Kube` (its clients, request counter and event writer), so folding it into
k8s.py later is a move. Creates are idempotent (AlreadyExists is success: child names are deterministic).
"""

from __future__ import annotations

from datetime import datetime

from kubernetes.client.rest import ApiException

from dhad_api.jobs import GROUP, VERSION
from dhad_api.pipeline import ANNOTATION_RETRY, LABEL_CACHE, LABEL_PIPELINE, PLURAL
from dhad_operator.k8s import PLURALS, Kube
from dhad_operator.pipeline import PipelineObserved, PipelinePlan, decide
from dhad_operator.render import Defaults
from dhad_operator.status import now_utc


def _absent_ok(call, *args, **kwargs) -> None:
    """A call whose object is already gone (delete, patch) or already there (create) has done its job."""
    try:
        call(*args, **kwargs)
    except ApiException as error:
        if error.status not in (404, 409):
            raise


def get_pipeline(kube: Kube, namespace: str, name: str) -> dict | None:
    kube.on_request("get")
    try:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


def observe_pipeline(kube: Kube, obj: dict) -> PipelineObserved:
    """Every Dhad job labelled with the pipeline's name (decide() keeps those it controls, by UID), and the
    namespace's step cache."""
    meta = obj["metadata"]
    namespace, selector = meta["namespace"], f"{LABEL_PIPELINE}={meta['name']}"
    children = []
    for kind, plural in PLURALS.items():
        kube.on_request("list")
        for item in kube.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, label_selector=selector)["items"]:
            item.setdefault("kind", kind)
            children.append(item)
    kube.on_request("list")
    cache = [kube._dict(cm) for cm in kube.core.list_namespaced_config_map(namespace, label_selector=LABEL_CACHE).items]
    return PipelineObserved(children=children, cache=cache)


def execute_pipeline(kube: Kube, obj: dict, plan: PipelinePlan, now: datetime) -> None:
    """Status first (retry records survive a crash), then deletes, suspend patches, creates, the retry
    annotation, events. The status is a merge patch, so keys the plan dropped are sent as null."""
    meta = obj["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    old = obj.get("status") or {}
    if plan.status != old:
        patch = {**{k: None for k in old if k not in plan.status}, **plan.status}
        kube.on_request("patch")
        kube.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": patch})
    for kind, child in plan.delete:
        kube.on_request("delete")
        _absent_ok(kube.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURALS[kind], child,
                   propagation_policy="Background")
    for kind, child, suspend in plan.suspend:
        kube.on_request("patch")
        _absent_ok(kube.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURALS[kind], child,
                   {"spec": {"suspend": suspend}})
    for manifest in plan.create:
        kube.on_request("create")
        if manifest["kind"] == "ConfigMap":
            _absent_ok(kube.core.create_namespaced_config_map, namespace, manifest)
        else:
            _absent_ok(kube.custom.create_namespaced_custom_object, GROUP, VERSION, namespace, PLURALS[manifest["kind"]], manifest)
    if plan.remove_retry_annotation:
        kube.on_request("patch")
        _absent_ok(kube.custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name,
                   {"metadata": {"annotations": {ANNOTATION_RETRY: None}}})
    for type_, reason, message in plan.events:
        kube.event(obj, type_, reason, message, now)


def reconcile_pipeline(kube: Kube, namespace: str, name: str, defaults: Defaults) -> float | None:
    """Observe, decide, execute; returns when to look again (None: finished, only events wake it)."""
    obj = get_pipeline(kube, namespace, name)
    if obj is None or obj["metadata"].get("deletionTimestamp"):
        return None  # the garbage collector deletes its jobs; S3 and the step cache keep their outputs
    now = now_utc()
    plan = decide(obj, observe_pipeline(kube, obj), now, defaults)
    execute_pipeline(kube, obj, plan, now)
    if plan.status.get("state") in ("Succeeded", "Failed"):
        return plan.requeue_after
    return plan.requeue_after or float("inf")  # the controller caps it at its resync period
