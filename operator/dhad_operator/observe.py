"""Reading the observed children: what of them the reconcile uses, why a pod failed, whether a Job
finished, what is stuck.

Pure functions over the dicts the API returns, so the classification (the part that decides between
"fail now", "restart and count it" and "restart, it was a disruption") is unit-tested.

`slim` is the projection the watch caches store: exactly the fields `decide()` and this module read.
Because the reconcile only ever sees slim objects, a watch event whose slim form did not change
cannot change the plan, which is what the event filters in handlers.py rely on.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime

from dhad_api.pipeline import ANNOTATION_RETRY, LABEL_PIPELINE, LABEL_PIPELINE_ROLE, LABEL_PIPELINE_STAGE
from dhad_api.pipeline import KIND as PIPELINE_KIND
from dhad_api.queueing import kueue_labels
from dhad_api.reasons import EXIT_REASONS, NO_RETRY, PROGRESS_KEY, ExitCode, Reason
from dhad_operator.render import MANAGED_BY_LABEL

DISRUPTION_POD_REASONS = {"Evicted", "Preempting", "NodeLost", "Shutdown", "NodeShutdown", "Terminated", "UnexpectedAdmissionError"}
WAITING_PROBLEMS = {
    "ImagePullBackOff": Reason.IMAGE_PULL, "ErrImagePull": Reason.IMAGE_PULL, "InvalidImageName": Reason.IMAGE_PULL,
    "CreateContainerConfigError": Reason.CONTAINER_CONFIG, "CreateContainerError": Reason.CONTAINER_CONFIG,
}


@dataclass(frozen=True)
class Failure:
    """Why one attempt ended badly."""

    reason: str
    message: str
    retry: bool  # False: fail the job now (bad config, missing data)
    disruption: bool  # True: does not use up restartPolicy.maxRestarts
    node: str | None = None


def _terminated(pod: dict) -> dict | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return state["terminated"]
    return None


def _termination_message(terminated: dict) -> tuple[str | None, str]:
    """The launcher writes {"reason","message"} JSON; anything else is shown as it is."""
    raw = (terminated.get("message") or "").strip()
    try:
        doc = json.loads(raw)
        if isinstance(doc, dict):
            return doc.get("reason"), str(doc.get("message", ""))[:1000]
    except ValueError:
        pass
    return None, raw[-1000:]


def pod_failure(pod: dict) -> Failure | None:
    """A Failed pod, classified from its status reason, conditions, exit code and termination message."""
    status = pod.get("status") or {}
    node = (pod.get("spec") or {}).get("nodeName")
    name = (pod.get("metadata") or {}).get("name")
    if status.get("phase") != "Failed":
        return None
    disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True" for c in status.get("conditions") or [])
    if status.get("reason") in DISRUPTION_POD_REASONS or disrupted:
        message = status.get("message") or f"pod {name} was disrupted ({status.get('reason') or 'DisruptionTarget'})"
        return Failure(status.get("reason") or Reason.PREEMPTED, message, retry=True, disruption=True, node=node)
    terminated = _terminated(pod) or {}
    code = terminated.get("exitCode")
    reason, message = _termination_message(terminated)
    if terminated.get("reason") == "OOMKilled":
        return Failure(Reason.OOM_KILLED, f"pod {name} on {node} ran out of memory", retry=True, disruption=False, node=node)
    try:
        exit_code = ExitCode(code)
    except ValueError:
        exit_code = None
    if exit_code is not None and exit_code != ExitCode.SUCCESS:
        return Failure(reason or EXIT_REASONS[exit_code], message or f"pod {name} exited {code}",
                       retry=exit_code not in NO_RETRY, disruption=exit_code == ExitCode.PREEMPTED, node=node)
    return Failure(reason or Reason.WORKER_FAILED, message or f"pod {name} on {node} exited {code}",
                   retry=True, disruption=False, node=node)


def attempt_failure(pods: list[dict]) -> Failure | None:
    """The gang's verdict: a permanent failure wins, then a counted one; a pure disruption last."""
    failures = [f for f in (pod_failure(p) for p in pods) if f]
    if not failures:
        return None
    failures.sort(key=lambda f: (f.retry, f.disruption))
    return failures[0]


def waiting_problem(pods: list[dict]) -> tuple[str, str] | None:
    """ImagePullBackOff / CreateContainerConfigError and friends, with the kubelet's message."""
    for pod in pods:
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (status.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in WAITING_PROBLEMS:
                name = pod["metadata"]["name"]
                return WAITING_PROBLEMS[waiting["reason"]], f"pod {name}: {waiting['reason']}: {waiting.get('message', '')}"[:1000]
    return None


def unschedulable_since(pods: list[dict]) -> tuple[datetime, str] | None:
    """The earliest time a pod of the attempt was marked Unschedulable, and the scheduler's message."""
    found = []
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                found.append((parse_time(c.get("lastTransitionTime")), c.get("message", "")))
    found = [f for f in found if f[0]]
    return min(found) if found else None


def job_finished(job: dict) -> str | None:
    """'Complete' or 'Failed' once the Job controller decided, else None."""
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Complete", "Failed") and c.get("status") == "True":
            return c["type"]
    return None


def parse_time(value) -> datetime | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


# --- the projection the caches keep -----------------------------------------------------------------

LABEL_PREFIX = "dhad.dev/"
PROGRESS_FIELDS = {"step": int, "totalSteps": int, "epoch": float, "loss": float, "tokensPerSecond": float,
                   "etaSeconds": int, "updatedAt": str, "stage": str, "lastCheckpoint": str, "report": str}
TEXT_LIMIT = 1024  # the CRD's bound for URIs; longer strings from the trainer are truncated
MAX_SCORES = 32


def controller_uid(obj: dict) -> str | None:
    """The UID of the object's controller ownerReference (the only owner that counts)."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


def _meta(obj: dict) -> dict:
    meta = obj.get("metadata") or {}
    out = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "deletionTimestamp", "creationTimestamp") if meta.get(k)}
    labels = {k: v for k, v in (meta.get("labels") or {}).items() if k.startswith(LABEL_PREFIX) or k == MANAGED_BY_LABEL}
    if labels:
        out["labels"] = labels
    owners = [{k: r.get(k) for k in ("apiVersion", "kind", "name", "uid", "controller")}
              for r in meta.get("ownerReferences") or [] if r.get("controller")]
    if owners:
        out["ownerReferences"] = owners
    return out


def _slim_pod(pod: dict) -> dict:
    status = pod.get("status") or {}
    keep = {k: status[k] for k in ("phase", "reason", "message") if status.get(k)}
    conditions = [{k: c.get(k) for k in ("type", "status", "reason", "message", "lastTransitionTime") if c.get(k)}
                  for c in status.get("conditions") or []
                  if (c.get("type") == "DisruptionTarget" and c.get("status") == "True")
                  or (c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable")]
    if conditions:
        keep["conditions"] = conditions
    containers = []
    for c in status.get("containerStatuses") or []:
        state = c.get("state") or {}
        if "terminated" in state:
            t = state["terminated"]
            containers.append({"name": c.get("name"), "state": {"terminated": {k: t.get(k) for k in ("exitCode", "reason", "message") if k in t}}})
        elif (state.get("waiting") or {}).get("reason") in WAITING_PROBLEMS:
            w = state["waiting"]
            containers.append({"name": c.get("name"), "state": {"waiting": {"reason": w["reason"], "message": w.get("message", "")}}})
    if containers:
        keep["containerStatuses"] = containers
    node = (pod.get("spec") or {}).get("nodeName")
    return {"spec": {"nodeName": node} if node else {}, "status": keep}


def _slim_job(job: dict) -> dict:
    conditions = [{k: c.get(k) for k in ("type", "status", "reason", "message") if c.get(k)}
                  for c in (job.get("status") or {}).get("conditions") or []
                  if c.get("type") in ("Complete", "Failed") and c.get("status") == "True"]
    return {"spec": {"suspend": bool((job.get("spec") or {}).get("suspend"))}, "status": {"conditions": conditions}}


def _slim_config_map(cm: dict) -> dict:
    data = cm.get("data") or {}
    return {"progress": progress_report(data[PROGRESS_KEY])} if PROGRESS_KEY in data else {}


def _slim_event(event: dict) -> dict:
    involved = event.get("involvedObject") or {}
    return {"involvedObject": {k: involved.get(k) for k in ("kind", "name", "uid")},
            "reason": event.get("reason"), "message": (event.get("message") or "")[:2000]}


PIPELINE_LABELS = (LABEL_PIPELINE, LABEL_PIPELINE_STAGE, LABEL_PIPELINE_ROLE)


def _slim_job_object(obj: dict) -> dict:
    """A Dhad job: what decide() reads (annotations and managedFields are not); for a pipeline's stage
    job also its pipeline labels and controller reference (the pipeline's reconcile finds it by both)."""
    meta = obj.get("metadata") or {}
    out = {k: obj[k] for k in ("apiVersion", "kind", "spec", "status") if k in obj}
    out["metadata"] = {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion", "generation",
                                              "deletionTimestamp", "creationTimestamp") if k in meta}
    labels = meta.get("labels") or {}
    kept = {**kueue_labels(labels), **{k: labels[k] for k in PIPELINE_LABELS if k in labels}}  # kueue's: onto each batch Job
    if kept:
        out["metadata"]["labels"] = kept
    owners = [{k: r.get(k) for k in ("apiVersion", "kind", "name", "uid", "controller")}
              for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("kind") == PIPELINE_KIND]
    if owners:
        out["metadata"]["ownerReferences"] = owners
    return out


def _slim_pipeline(obj: dict) -> dict:
    """A Pipeline: what the pipeline reconcile reads, the dhad.dev/retry request included."""
    out = _slim_job_object(obj)
    out["metadata"].pop("labels", None)
    retry = ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_RETRY)
    if retry is not None:
        out["metadata"]["annotations"] = {ANNOTATION_RETRY: retry}
    return out


def _slim_step_cache(cm: dict) -> dict:
    """A step-cache ConfigMap (labelled dhad.dev/cache): its one entry."""
    return {"data": {"entry": (cm.get("data") or {}).get("entry") or ""}}


STEP_CACHE = "StepCache"  # the cache's name for ConfigMaps labelled dhad.dev/cache (their own informer)
SLIMMERS = {"Pod": _slim_pod, "Job": _slim_job, "ConfigMap": _slim_config_map, "Event": _slim_event, STEP_CACHE: _slim_step_cache}


def _slim_node(node: dict) -> dict:
    """A node: its name and every label (a job's nodeSelector may name any of them)."""
    meta = node.get("metadata") or {}
    return {"kind": "Node", "metadata": {k: meta[k] for k in ("name", "uid", "resourceVersion", "labels") if meta.get(k)}}


def slim(kind: str, obj: dict, job_kinds: frozenset[str] = frozenset()) -> dict:
    """The cached form of an API object of `kind` (see the module docstring)."""
    if kind in job_kinds:
        return _slim_job_object(obj)
    if kind == PIPELINE_KIND:
        return _slim_pipeline(obj)
    if kind == "Node":
        return _slim_node(obj)
    body = SLIMMERS.get(kind, lambda _: {})(obj)
    return {"kind": kind, "metadata": _meta(obj), **body}


def same(old: dict | None, new: dict | None) -> bool:
    """Equal apart from resourceVersion: an event between them cannot change the plan."""
    if old is None or new is None:
        return old is new
    return _without_version(old) == _without_version(new)


def _without_version(obj: dict) -> dict:
    return {**obj, "metadata": {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}}


def progress_report(raw) -> dict | None:
    """The trainer's progress JSON, checked: known fields of the right type and bounds, finite numbers,
    scores only when numeric; what was dropped is listed under "invalid" for a condition."""
    try:
        doc = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {"invalid": ["progress: not JSON"]}
    if not isinstance(doc, dict) or not doc:
        return None
    report, invalid = {}, []
    for key, value in doc.items():
        if key == "scores":
            continue
        want = PROGRESS_FIELDS.get(key)
        if want is None or value is None:
            continue
        checked = _checked(value, want)
        if checked is None:
            invalid.append(f"{key}: {str(value)[:40]!r} is not a valid {want.__name__}")
        else:
            report[key] = checked
    scores = doc.get("scores")
    if isinstance(scores, dict):
        good = {}
        for name, value in scores.items():
            number = _checked(value, float)
            if number is None or len(str(name)) > 64:
                invalid.append(f"scores.{str(name)[:64]}: {str(value)[:40]!r} is not a number")
            elif len(good) < MAX_SCORES:
                good[str(name)] = number
        report["scores"] = good
    elif scores is not None:
        invalid.append("scores: not a mapping of suite to number")
    if invalid:
        report["invalid"] = invalid[:8]
    return report or None


def _checked(value, want: type):
    if want is str:
        return value[:TEXT_LIMIT] if isinstance(value, str) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    if want is int:
        return int(value) if value >= 0 and float(value).is_integer() else None
    return float(value)
