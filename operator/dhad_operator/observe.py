"""Reading the observed children: why a pod failed, whether a Job finished, what is stuck.

Pure functions over the Job and Pod dicts the API returns, so the classification (the part that
decides between "fail now", "restart and count it" and "restart, it was a disruption") is unit-tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime

from dhad_api.reasons import EXIT_REASONS, NO_RETRY, ExitCode, Reason

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
