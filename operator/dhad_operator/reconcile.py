"""The level-based reconcile: (job object, observed children, now) -> a Plan. Pure: no API calls.

Every decision is made from what is observed now plus what status recorded (attempt, endedAttempt,
nextAttemptAfter), so running it twice, or after an operator restart, converges to the same plan;
Job names are deterministic, so a repeated create is an AlreadyExists, never a second Job.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import ValidationError

from dhad_api.jobs import OUTPUT_STAGE, JobSpec, parse_spec, stage_pods, stages_for
from dhad_api.layout import model_uri, output_root, stage_uri
from dhad_api.naming import job_name
from dhad_api.queueing import kueue_labels
from dhad_api.reasons import Reason
from dhad_api.references import resolve_models
from dhad_api.status import State
from dhad_operator import observe
from dhad_operator.render import (
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_STAGE,
    Defaults,
    Owner,
    kueue,
    static_children,
    training_job,
)
from dhad_operator.status import enter, rfc3339, set_condition, state_of


@dataclass
class Observed:
    """What exists now: this job's Jobs and Pods, its progress report, and referenced jobs."""

    jobs: list[dict] = field(default_factory=list)
    pods: list[dict] = field(default_factory=list)
    progress: dict | None = None
    references: dict[tuple[str, str], dict | None] = field(default_factory=dict)
    children_exist: bool = False


@dataclass
class Plan:
    status: dict
    create: list[dict] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)
    delete_children: bool = False
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None
    restart_reason: str | None = None


def _attempt_of(obj: dict) -> int:
    return int((obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT, 0))


def _stage_of(obj: dict) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_STAGE)


def _deleting(obj: dict) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def _field_errors(error: ValidationError) -> str:
    parts = []
    for e in error.errors():
        path = ".".join(str(p) for p in e["loc"])
        parts.append(f"spec.{path}: {e['msg']}" if path else e["msg"])
    return "; ".join(parts)[:2000]


def decide(obj: dict, observed: Observed, now: datetime, defaults: Defaults) -> Plan:
    meta = obj["metadata"]
    owner = Owner(obj["kind"], meta["name"], meta["namespace"], meta["uid"],
                  tuple(sorted(kueue_labels(meta.get("labels")).items())))
    status = copy.deepcopy(obj.get("status") or {})
    generation = meta.get("generation")
    status["observedGeneration"] = generation
    plan = Plan(status=status)
    state = state_of(status)

    if state in (State.SUCCEEDED, State.FAILED):
        _finished(obj, observed, now, plan)
        return plan
    try:
        spec = parse_spec(owner.kind, obj["spec"])
    except ValidationError as error:
        _fail(plan, Reason.INVALID_SPEC, _field_errors(error), now, generation)
        return plan
    root = output_root(spec.storage, owner.namespace, owner.name, owner.uid)
    resolved, waiting = resolve_models(spec, observed.references)
    started = bool(status.get("startTime"))
    if waiting and started:
        # References gate only the start: the spec ConfigMap already holds what was resolved then.
        resolved, waiting = {"modelUri": status.get("resolvedModel")}, None
    if waiting:
        reason, message, permanent = waiting
        if permanent:
            _fail(plan, reason, message, now, generation)
        else:
            enter(status, State.PENDING, reason, message, now, generation)
            set_condition(status, "Created", False, reason, message, now, generation)
            plan.requeue_after = 15
        return plan
    resolved["outputRoot"] = root
    if not started or not status.get("resolvedModel"):
        status["resolvedModel"] = resolved.get("modelUri")
    stages = stages_for(owner.kind, spec)
    stage = status.get("stage") or stages[0]
    status["stage"] = stage
    _copy_progress(status, observed.progress, stage)
    attempt, ended = status.get("attempt", 0), status.get("endedAttempt", 0)
    ours = [j for j in observed.jobs if _stage_of(j) == stage]
    current = next((j for j in ours if j["metadata"]["name"] == job_name(owner.name, stage, attempt) and attempt), None)

    start = observe.parse_time(status.get("startTime"))
    if spec.active_deadline_seconds and start and now >= start + timedelta(seconds=spec.active_deadline_seconds):
        plan.delete_jobs = [j["metadata"]["name"] for j in ours if not observe.job_finished(j) and not _deleting(j)]
        _fail(plan, Reason.DEADLINE_EXCEEDED, f"activeDeadlineSeconds ({spec.active_deadline_seconds}) passed since {status['startTime']}", now, generation)
        return plan
    if spec.suspend:
        if current is not None and not _deleting(current) and not observe.job_finished(current):
            plan.delete_jobs.append(current["metadata"]["name"])
        status["endedAttempt"] = attempt
        if state != State.SUSPENDED:
            plan.events.append(("Normal", "Suspended", "spec.suspend is true: pods stopped, checkpoints kept"))
        enter(status, State.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; set it to false to resume from the newest checkpoint", now, generation)
        return plan
    if current is None and ended < attempt:
        status["attempt"] = attempt - 1  # its Job was never created (or was removed by hand): make it again
    elif current is not None and ended < attempt:
        pods = [p for p in observed.pods if _stage_of(p) == stage and _attempt_of(p) == attempt]
        _observe_attempt(owner, spec, stages, stage, current, pods, plan, now, defaults, root, generation)
        if status.get("stage") == stage or state_of(status) in (State.SUCCEEDED, State.FAILED):
            return plan
        stage, attempt, ours = status["stage"], 0, []  # the next sub-stage starts at once
    _next_attempt(owner, spec, stage, ours, plan, now, defaults, resolved, observed, generation)
    return plan


def _copy_progress(status: dict, progress: dict | None, stage: str) -> None:
    if not progress or progress.get("stage", stage) != stage:
        return
    fields = ("step", "totalSteps", "epoch", "loss", "tokensPerSecond", "etaSeconds", "updatedAt")
    report = {k: progress[k] for k in fields if progress.get(k) is not None}
    if report.get("totalSteps"):
        report["percent"] = min(100, int(100 * report.get("step", 0) / report["totalSteps"]))
    figures = progress.get("figures")
    if isinstance(figures, dict):  # numbers only, at most 16, short names: what the CRD admits
        numbers = {str(k)[:64]: float(v) for k, v in figures.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            report["figures"] = dict(list(numbers.items())[:16])  # the trainer sends them most important first
    if report:
        status["progress"] = report
    if progress.get("lastCheckpoint"):
        status["lastCheckpoint"] = progress["lastCheckpoint"]
    if isinstance(progress.get("scores"), dict):
        status["scores"] = {str(k): float(v) for k, v in progress["scores"].items()}
    if progress.get("report"):
        status["report"] = progress["report"]


def _observe_attempt(owner, spec, stages, stage, current, pods, plan, now, defaults, root, generation) -> None:
    status = plan.status
    attempt = status["attempt"]
    finished = observe.job_finished(current)
    if finished == "Complete":
        _stage_done(owner, spec, stages, stage, plan, now, root, generation)
        return
    shape = stage_pods(owner.kind, spec, stage)
    # a gang ends with its first failed pod; independent pods are retried by the Job, per index
    failure = observe.attempt_failure(pods) if shape.gang or finished == "Failed" else None
    if failure is None and finished == "Failed":
        failure = observe.Failure(Reason.WORKER_FAILED, f"Job {current['metadata']['name']} failed", True, False)
    if failure is None:
        failure = _hung(spec, status, now)
    if failure is not None:
        _attempt_failed(spec, current, failure, plan, now, generation)
        return
    if (current.get("spec") or {}).get("suspend"):
        enter(status, State.QUEUED, Reason.QUEUED, f"waiting for Kueue to admit Job {current['metadata']['name']} (queue {kueue(owner, spec).get(KUEUE_QUEUE_LABEL)})", now, generation)
        return
    problem = observe.waiting_problem(pods)
    for type_ in sorted(set(observe.WAITING_PROBLEMS.values())):  # a problem that went away is cleared
        if problem and problem[0] == type_:
            set_condition(status, type_, True, type_, problem[1], now, generation)
        else:
            set_condition(status, type_, False, "Resolved", "", now, generation)
    unschedulable = observe.unschedulable_since(pods)
    timeout = spec.restart_policy.unschedulable_timeout_seconds
    if unschedulable and timeout and now >= unschedulable[0] + timedelta(seconds=timeout):
        set_condition(status, "Unschedulable", True, Reason.UNSCHEDULABLE, unschedulable[1] or "pods are unschedulable", now, generation)
    elif unschedulable is None:
        set_condition(status, "Unschedulable", False, "Scheduled", "", now, generation)
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if len(running) == shape.pods or (running and not shape.gang):
        if state_of(status) != State.RUNNING:
            plan.events.append(("Normal", "Running", f"attempt {attempt} of stage {stage}: all {len(running)} pods running"))
        enter(status, State.RUNNING, Reason.RUNNING, f"stage {stage}, attempt {attempt}: {len(running)} pods running", now, generation)
        _stage_entry(status, stage)["state"] = State.RUNNING.value
    plan.requeue_after = 30


def _hung(spec: JobSpec, status: dict, now: datetime) -> observe.Failure | None:
    timeout = spec.restart_policy.hang_timeout_seconds
    if not timeout or state_of(status) != State.RUNNING:
        return None
    # The progress ConfigMap outlives attempts: a report older than this attempt says nothing about it.
    times = [observe.parse_time((status.get("progress") or {}).get("updatedAt")), observe.parse_time(status.get("attemptStartTime"))]
    last = max((t for t in times if t), default=None)
    if last and now >= last + timedelta(seconds=timeout):
        return observe.Failure(Reason.HUNG, f"no progress reported since {rfc3339(last)} (hangTimeoutSeconds {timeout})", True, False)
    return None


def _attempt_failed(spec: JobSpec, current: dict, failure: observe.Failure, plan: Plan, now: datetime, generation) -> None:
    status = plan.status
    attempt = status["attempt"]
    status["endedAttempt"] = attempt
    if not _deleting(current):
        plan.delete_jobs.append(current["metadata"]["name"])
    stage_entry = _stage_entry(status, status["stage"])
    if not failure.retry:
        stage_entry.update(state=State.FAILED.value, message=failure.message)
        _fail(plan, failure.reason, failure.message, now, generation)
        return
    policy = spec.restart_policy
    plan.restart_reason = failure.reason
    if failure.disruption:
        status["disruptions"] = status.get("disruptions", 0) + 1
    else:
        status["restarts"] = status.get("restarts", 0) + 1
    progressed = status.get("lastCheckpoint") != status.get("checkpointAtAttemptStart")
    status["attemptsWithoutProgress"] = 0 if progressed else status.get("attemptsWithoutProgress", 0) + 1
    if failure.node and policy.avoid_failed_nodes and failure.node not in status.setdefault("failedNodes", []):
        status["failedNodes"].append(failure.node)
    if status.get("restarts", 0) > policy.max_restarts:
        _fail(plan, Reason.BACKOFF, f"restartPolicy.maxRestarts ({policy.max_restarts}) used up; last failure: {failure.reason}: {failure.message}", now, generation)
        return
    if status["attemptsWithoutProgress"] >= policy.no_progress_attempts:
        _fail(plan, Reason.NO_PROGRESS, f"{status['attemptsWithoutProgress']} attempts in a row ended without a new checkpoint; last failure: {failure.message}", now, generation)
        return
    exponent = max(status.get("restarts", 0) - 1, 0)
    backoff = 0 if failure.disruption else min(policy.backoff_seconds * 2**exponent, policy.max_backoff_seconds)
    status["nextAttemptAfter"] = rfc3339(now + timedelta(seconds=backoff))
    kind = "disruption (not counted)" if failure.disruption else f"restart {status['restarts']}/{policy.max_restarts}"
    message = f"attempt {attempt} ended: {failure.reason}: {failure.message}; {kind}, next attempt after {backoff} s"
    plan.events.append(("Warning", str(failure.reason), message))
    enter(status, State.RESTARTING, failure.reason, message, now, generation)
    plan.requeue_after = max(backoff, 1)


def _stage_entry(status: dict, stage: str) -> dict:
    for entry in status.setdefault("stages", []):
        if entry["name"] == stage:
            return entry
    entry = {"name": stage, "state": State.PENDING.value, "attempt": 0}
    status["stages"].append(entry)
    return entry


def _stage_done(owner, spec, stages, stage, plan, now, root, generation) -> None:
    status = plan.status
    entry = _stage_entry(status, stage)
    entry.update(state=State.SUCCEEDED.value, completionTime=rfc3339(now), output=stage_uri(root, stage))
    plan.events.append(("Normal", Reason.STAGE_SUCCEEDED, f"stage {stage} succeeded"))
    index = stages.index(stage)
    if index + 1 < len(stages):
        status.update(stage=stages[index + 1], attempt=0, endedAttempt=0, attemptsWithoutProgress=0)
        status.pop("nextAttemptAfter", None)
        status.pop("progress", None)
        return
    if stage in OUTPUT_STAGE:
        status["outputModel"] = model_uri(root, OUTPUT_STAGE[stage])
    status["completionTime"] = rfc3339(now)
    plan.events.append(("Normal", Reason.SUCCEEDED, f"{owner.kind} succeeded" + (f"; model at {status['outputModel']}" if status.get("outputModel") else "")))
    enter(status, State.SUCCEEDED, Reason.SUCCEEDED, "all stages succeeded", now, generation)
    if spec.ttl_seconds_after_finished is not None:
        plan.requeue_after = spec.ttl_seconds_after_finished


def _next_attempt(owner, spec, stage, ours, plan, now, defaults, resolved, observed, generation) -> None:
    status = plan.status
    attempt = status.get("attempt", 0)
    # anything being deleted, or an earlier attempt that did not complete, still holds pods
    lingering = [j for j in ours if _deleting(j) or (_attempt_of(j) <= attempt and observe.job_finished(j) != "Complete")]
    if lingering:
        plan.delete_jobs += [j["metadata"]["name"] for j in lingering if not _deleting(j)]
        plan.requeue_after = 2
        return  # the next attempt starts only when the old pods are gone
    after = observe.parse_time(status.get("nextAttemptAfter"))
    if after and now < after:
        plan.requeue_after = (after - now).total_seconds()
        return
    attempt += 1
    plan.create += static_children(owner, spec, resolved) if not observed.children_exist else []
    plan.create.append(training_job(owner, spec, stage, attempt, defaults, status.get("failedNodes") or []))
    status.update(attempt=attempt, attemptStartTime=rfc3339(now), checkpointAtAttemptStart=status.get("lastCheckpoint"))
    status.setdefault("startTime", rfc3339(now))
    status.pop("nextAttemptAfter", None)
    entry = _stage_entry(status, stage)
    entry.update(attempt=attempt, state=State.PENDING.value)
    entry.setdefault("startTime", rfc3339(now))
    set_condition(status, "Created", True, Reason.CREATED, f"created Job {job_name(owner.name, stage, attempt)}", now, generation)
    plan.events.append(("Normal", "AttemptCreated", f"stage {stage}: created attempt {attempt} ({stage_pods(owner.kind, spec, stage).pods} pods)"))
    if KUEUE_QUEUE_LABEL in kueue(owner, spec):
        enter(status, State.QUEUED, Reason.QUEUED, f"Job {job_name(owner.name, stage, attempt)} waits in queue {kueue(owner, spec)[KUEUE_QUEUE_LABEL]}", now, generation)
    elif state_of(status) not in (State.RESTARTING,):
        enter(status, State.PENDING, Reason.CREATED, f"stage {stage}: attempt {attempt} created, waiting for pods", now, generation)
    plan.requeue_after = 30


def _fail(plan: Plan, reason: str, message: str, now: datetime, generation) -> None:
    plan.status["completionTime"] = rfc3339(now)
    plan.status.pop("nextAttemptAfter", None)
    plan.events.append(("Warning", str(reason), message))
    enter(plan.status, State.FAILED, reason, message, now, generation)


def _finished(obj: dict, observed: Observed, now: datetime, plan: Plan) -> None:
    """After Succeeded/Failed: no Job keeps running; the TTL removes the children, never the object."""
    plan.delete_jobs = [j["metadata"]["name"] for j in observed.jobs if not observe.job_finished(j) and not _deleting(j)]
    ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
    done = observe.parse_time(plan.status.get("completionTime"))
    if ttl is None or done is None:
        return
    due = done + timedelta(seconds=ttl)
    if now >= due:
        if observed.jobs or observed.pods or observed.children_exist:
            plan.delete_children = True
            plan.events.append(("Normal", "TTLExpired", f"ttlSecondsAfterFinished ({ttl}) passed: children deleted, the job object stays"))
    else:
        plan.requeue_after = (due - now).total_seconds()


def progress_of(config_map: dict | None) -> dict | None:
    if not config_map:
        return None
    try:
        value = json.loads((config_map.get("data") or {}).get("progress") or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) and value else None
