"""The level-based reconcile: (job object, observed children, now) -> a Plan. Pure: no API calls.

Every decision is made from what is observed now plus what status recorded (attempt, endedAttempt,
nextAttemptAfter), so running it twice, or after an operator restart, converges to the same plan.
A Job is created before status records its attempt, so a Job of ours with a higher attempt than
status says means that status write was lost: it is taken as the current attempt, never made twice;
and a recorded attempt whose Job is gone was deleted by someone: its number is never used again.

Children count only when their controller ownerReference is this job's UID; a name this job needs
that another owner holds is a Failed condition (or Pending while the garbage collector removes a
deleted job's child), never adoption. The namespace's headless Service is no job's child: it is
ours by its label, made again by any job that finds it missing, and one without our label is a
Failed condition that names it. The plan's status is fitted to the CRD's schema, and
`requeue_after` is the next moment a timer (deadline, hang, unschedulable, backoff, TTL) is due.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from dhad_api.jobs import OUTPUT_STAGE, JobSpec, parse_spec, stage_pods, stages_for
from dhad_api.layout import model_uri, output_root, stage_uri
from dhad_api.naming import job_name
from dhad_api.plan import PlanVerdict, planned_condition
from dhad_api.queueing import kueue_labels
from dhad_api.reasons import Reason
from dhad_api.references import resolve_models
from dhad_api.status import State
from dhad_operator import observe
from dhad_operator.render import (
    KUEUE_QUEUE_LABEL,
    LABEL_ATTEMPT,
    LABEL_STAGE,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    Defaults,
    Owner,
    kueue,
    namespace_child_names,
    namespace_children,
    refused_pod_fields,
    static_child_names,
    static_children,
    training_job,
)
from dhad_operator.status import condition_true, enter, fit_status, rfc3339, set_condition, state_of

MAX_FAILED_NODES = 32


@dataclass(frozen=True)
class Foreign:
    """An object with a name this job needs, owned by someone else."""

    owner: str  # who owns it, for the message ("no owner" when orphaned)
    owner_gone: bool = False  # its owner was deleted (the garbage collector is about to remove it), or it is being deleted


@dataclass(frozen=True)
class Rejection:
    """The apiserver refused to create a child."""

    code: int
    message: str
    owner: str | None = None  # for a 409: who holds the name ("no owner" when orphaned)
    owner_ref: tuple[str, str] | None = None  # for a 409: the holder's controller (kind, uid)

    @property
    def permanent(self) -> bool:
        return self.code in (400, 422)  # the manifest itself is invalid: retrying cannot help


@dataclass
class Observed:
    """What exists now (slim objects, observe.slim): this job's own children and what names it needs."""

    jobs: list[dict] = field(default_factory=list)  # Jobs whose controller is this job
    pods: list[dict] = field(default_factory=list)  # pods whose controller is one of those Jobs
    progress: dict | None = None  # the checked progress report (observe.progress_report)
    references: dict[tuple[str, str], dict | None] = field(default_factory=dict)
    children: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) of our static children, not being deleted
    shared: set[tuple[str, str]] = field(default_factory=set)  # (kind, name) of the namespace's objects of ours (its Service)
    labelled_pods: list[dict] = field(default_factory=list)  # pods labelled for this job, any owner
    foreign: dict[tuple[str, str], Foreign] = field(default_factory=dict)
    rejected: dict[tuple[str, str], Rejection] = field(default_factory=dict)  # from the last try
    pod_errors: dict[str, str] = field(default_factory=dict)  # Job UID -> the Job controller's FailedCreate
    nodes: list[dict[str, str]] = field(default_factory=list)  # the labels of the cluster's GPU nodes (Planned)
    job_specs: Any = field(default_factory=dict)  # .get((kind, name)) -> the spec of a job in the namespace (fromJob)


@dataclass
class Plan:
    status: dict
    create: list[dict] = field(default_factory=list)
    delete_jobs: list[str] = field(default_factory=list)  # Foreground: a Job stays until its pods are gone
    delete_children: list[tuple[str, str]] = field(default_factory=list)  # (kind, name), Background (TTL)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    requeue_after: float | None = None  # seconds until the next timer is due
    restart_reason: str | None = None
    wake: datetime | None = None

    def due(self, moment: datetime | None) -> None:
        if moment is not None and (self.wake is None or moment < self.wake):
            self.wake = moment


def _attempt_of(obj: dict) -> int:
    try:
        return int((obj.get("metadata", {}).get("labels") or {}).get(LABEL_ATTEMPT, 0))
    except ValueError:
        return 0


def _stage_of(obj: dict) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(LABEL_STAGE)


def _deleting(obj: dict) -> bool:
    return bool(obj.get("metadata", {}).get("deletionTimestamp"))


def _terminal(pod: dict) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


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
        _finished(obj, observed, now, plan, generation)
        return _fitted(plan, now, generation)
    try:
        spec = parse_spec(owner.kind, obj["spec"])
    except ValidationError as error:
        _fail(plan, Reason.INVALID_SPEC, _field_errors(error), now, generation)
        return _fitted(plan, now, generation)
    refused = refused_pod_fields(spec, defaults)
    if refused:  # the platform switch the CRD cannot know
        _fail(plan, Reason.INVALID_SPEC, refused, now, generation)
        return _fitted(plan, now, generation)
    if not status.get("startTime") and _refused_by_plan(owner, spec, observed, plan, now, generation):
        return _fitted(plan, now, generation)
    _plan_attempts(owner, spec, observed, now, defaults, plan, generation)
    blocked = _blocked_creates(plan, observed)
    if blocked:  # decide again from the stored status: nothing this plan recorded about new children holds
        plan = Plan(status={**copy.deepcopy(obj.get("status") or {}), "observedGeneration": generation})
        _copy_progress(plan.status, observed.progress, plan.status.get("stage"), now, generation)
        reason, message, permanent = blocked
        if permanent:
            _fail(plan, reason, message, now, generation)
            _finished(obj, observed, now, plan, generation)  # a child made after the Job was refused: it stops too
        else:
            _pending(plan, reason, message, now, generation)
    return _fitted(plan, now, generation)


def _refused_by_plan(owner: Owner, spec: JobSpec, observed: Observed, plan: Plan, now: datetime, generation) -> bool:
    """The Planned condition, until the job starts: its per-GPU memory plan against the GPU its pods
    get (plan.gpuMemory, the matching nodes' labels, or the nodeSelector's product). A plan known not
    to fit fails the job before any child exists (unless plan.enforce is false); unknown is reported."""
    try:
        verdict = planned_condition(owner.kind, spec, nodes=observed.nodes, lookup=lambda kind, name: observed.job_specs.get((kind, name)))
    except ValueError as error:  # a referenced job's spec that does not validate: its own job reports it
        verdict = PlanVerdict("Unknown", Reason.PLAN_NOT_CHECKED, f"not planned: {str(error)[:500]}", False)
    set_condition(plan.status, "Planned", verdict.status, verdict.reason, verdict.message, now, generation)
    if verdict.refuse:
        _fail(plan, Reason.PLAN_EXCEEDS_GPU_MEMORY, verdict.message, now, generation)
    return verdict.refuse


def _plan_attempts(owner: Owner, spec: JobSpec, observed: Observed, now: datetime, defaults: Defaults, plan: Plan, generation) -> None:
    status = plan.status
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
            _pending(plan, reason, message, now, generation)  # woken when the referenced job changes
        return
    resolved["outputRoot"] = root
    if not started or not status.get("resolvedModel"):
        status["resolvedModel"] = resolved.get("modelUri")
    stages = stages_for(owner.kind, spec)
    stage = status.get("stage") or stages[0]
    status["stage"] = stage
    _copy_progress(status, observed.progress, stage, now, generation)
    ours = [j for j in observed.jobs if _stage_of(j) == stage]
    _adopt_unrecorded(owner, spec, stage, ours, plan, now, generation)
    attempt, ended = status.get("attempt", 0), status.get("endedAttempt", 0)
    current = next((j for j in ours if j["metadata"]["name"] == job_name(owner.name, stage, attempt) and attempt), None)

    start = observe.parse_time(status.get("startTime"))
    if spec.active_deadline_seconds and start:
        deadline = start + timedelta(seconds=spec.active_deadline_seconds)
        if now >= deadline:
            plan.delete_jobs = [j["metadata"]["name"] for j in ours if not observe.job_finished(j) and not _deleting(j)]
            _fail(plan, Reason.DEADLINE_EXCEEDED, f"activeDeadlineSeconds ({spec.active_deadline_seconds}) passed since {status['startTime']}", now, generation)
            return
        plan.due(deadline)
    if spec.suspend:
        if current is not None and not _deleting(current) and not observe.job_finished(current):
            plan.delete_jobs.append(current["metadata"]["name"])
        status["endedAttempt"] = attempt
        if state_of(status) != State.SUSPENDED:
            plan.events.append(("Normal", "Suspended", "spec.suspend is true: pods stopped, checkpoints kept"))
        enter(status, State.SUSPENDED, Reason.SUSPENDED, "spec.suspend is true; set it to false to resume from the newest checkpoint", now, generation)
        return
    _missing_children(owner, spec, resolved, observed, plan, defaults)
    if current is None and ended < attempt:
        _job_vanished(owner, stage, plan, now, generation)
    elif current is not None and ended < attempt:
        pods = [p for p in observed.pods if observe.controller_uid(p) == current["metadata"].get("uid")]
        _observe_attempt(owner, spec, stages, stage, current, pods, observed, plan, now, root, generation)
        if status.get("stage") == stage or state_of(status) in (State.SUCCEEDED, State.FAILED):
            return
        stage, ours = status["stage"], []  # the next sub-stage starts at once
    _next_attempt(owner, spec, stage, ours, plan, now, defaults, observed, generation)


def _copy_progress(status: dict, progress: dict | None, stage: str | None, now: datetime, generation) -> None:
    if not progress:
        return
    if progress.get("invalid"):
        message = "the trainer's progress report had values status cannot hold (dropped): " + "; ".join(progress["invalid"])
        set_condition(status, Reason.INVALID_REPORT, True, Reason.INVALID_REPORT, message, now, generation)
    elif condition_true(status, Reason.INVALID_REPORT):
        set_condition(status, Reason.INVALID_REPORT, False, "Valid", "", now, generation)
    if progress.get("stage", stage) != stage:
        return
    fields = ("step", "totalSteps", "epoch", "loss", "tokensPerSecond", "etaSeconds", "updatedAt")
    report = {k: progress[k] for k in fields if progress.get(k) is not None}
    if report.get("totalSteps"):
        report["percent"] = max(0, min(100, int(100 * report.get("step", 0) / report["totalSteps"])))
    figures = progress.get("figures")
    if isinstance(figures, dict):  # numbers only, at most 16, short names: what the CRD admits
        numbers = {str(k)[:64]: float(v) for k, v in figures.items()
                   if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            report["figures"] = dict(list(numbers.items())[:16])  # the trainer sends them most important first
    if report:
        status["progress"] = report
    for key in ("lastCheckpoint", "report"):
        if progress.get(key):
            status[key] = progress[key]
    if isinstance(progress.get("scores"), dict):
        status["scores"] = dict(progress["scores"])


def _adopt_unrecorded(owner, spec, stage, ours, plan, now, generation) -> None:
    """Our Job of a newer attempt than status records: the write after its creation was lost."""
    status = plan.status
    newest = max(ours, key=_attempt_of, default=None)
    if newest is None or _attempt_of(newest) <= status.get("attempt", 0):
        return
    created = observe.parse_time(newest["metadata"].get("creationTimestamp")) or now
    _record_attempt(owner, spec, stage, _attempt_of(newest), plan, created, now, generation)


def _job_vanished(owner, stage, plan, now, generation) -> None:
    """The current attempt's Job was deleted by someone else: that attempt is over (a disruption)."""
    status = plan.status
    attempt = status["attempt"]
    status["endedAttempt"] = attempt
    status["disruptions"] = status.get("disruptions", 0) + 1
    status["nextAttemptAfter"] = rfc3339(now)
    message = f"Job {job_name(owner.name, stage, attempt)} of attempt {attempt} was deleted; attempt {attempt + 1} starts when its pods are gone"
    plan.events.append(("Warning", Reason.JOB_DELETED, message))
    enter(status, State.RESTARTING, Reason.JOB_DELETED, message, now, generation)
    plan.restart_reason = Reason.JOB_DELETED


def _missing_children(owner, spec, resolved, observed, plan, defaults) -> None:
    """Every static child that is not there (never made, or deleted) is made again, on every reconcile,
    and so is the namespace's Service."""
    plan.create += [c for c in namespace_children(owner.namespace) if (c["kind"], c["metadata"]["name"]) not in observed.shared]
    missing = [(kind, name) for kind, name in static_child_names(owner, spec) if (kind, name) not in observed.children]
    if missing:
        plan.create += [c for c in static_children(owner, spec, resolved, defaults) if (c["kind"], c["metadata"]["name"]) in missing]


def _observe_attempt(owner, spec, stages, stage, current, pods, observed, plan, now, root, generation) -> None:
    status = plan.status
    attempt = status["attempt"]
    shape = stage_pods(owner.kind, spec, stage)
    finished = observe.job_finished(current)
    if finished == "Complete":
        _stage_done(owner, spec, stages, stage, plan, now, root, generation)
        return
    # a gang ends with its first failed pod; independent pods are retried by the Job, per index
    failure = observe.attempt_failure(pods) if shape.gang or finished == "Failed" else None
    if failure is None and finished == "Failed":
        failure = observe.Failure(Reason.WORKER_FAILED, f"Job {current['metadata']['name']} failed", True, False)
    if failure is None:
        failure = _hung(spec, status, now, plan)
    if failure is None and (refused := observed.pod_errors.get(current["metadata"].get("uid"))) and len(pods) < shape.pods:
        if _pods_refused_for_good(refused):
            failure = observe.Failure(Reason.PODS_REJECTED, f"the attempt's pods were refused: {refused}", False, False)
        else:
            _pending(plan, Reason.PODS_NOT_CREATED, f"Job {current['metadata']['name']} cannot create its pods yet: {refused}", now, generation)
            return
    if failure is not None:
        _attempt_failed(spec, current, failure, plan, now, generation)
        return
    if (current.get("spec") or {}).get("suspend"):
        enter(status, State.QUEUED, Reason.QUEUED, _queued(owner, spec, current["metadata"]["name"]), now, generation)
        return
    if not condition_true(status, "Created"):  # a problem creating pods went away
        set_condition(status, "Created", True, Reason.CREATED, f"created Job {current['metadata']['name']}", now, generation)
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
    elif unschedulable and timeout:
        plan.due(unschedulable[0] + timedelta(seconds=timeout))
    elif unschedulable is None:
        set_condition(status, "Unschedulable", False, "Scheduled", "", now, generation)
    running = [p for p in pods if (p.get("status") or {}).get("phase") == "Running"]
    if len(running) == shape.pods or (running and not shape.gang):
        if state_of(status) != State.RUNNING:
            plan.events.append(("Normal", "Running", f"attempt {attempt} of stage {stage}: {len(running)} pods running"))
        enter(status, State.RUNNING, Reason.RUNNING, f"stage {stage}, attempt {attempt}: {len(running)} pods running", now, generation)
        _stage_entry(status, stage)["state"] = State.RUNNING.value
        _hung(spec, status, now, plan)  # the hang timer starts with Running


def _pods_refused_for_good(message: str) -> bool:
    """Admission that will refuse every retry of the same pod (Pod Security, an invalid pod) versus
    what can pass later (quota, a ServiceAccount not there yet)."""
    text = message.lower()
    if "exceeded quota" in text or "not found" in text:
        return False
    return "violates podsecurity" in text or "is invalid" in text or "forbidden: [" in text


def _hung(spec: JobSpec, status: dict, now: datetime, plan: Plan) -> observe.Failure | None:
    timeout = spec.restart_policy.hang_timeout_seconds
    if not timeout or state_of(status) != State.RUNNING:
        return None
    # The progress ConfigMap outlives attempts: a report older than this attempt says nothing about it.
    times = [observe.parse_time((status.get("progress") or {}).get("updatedAt")), observe.parse_time(status.get("attemptStartTime"))]
    last = max((t for t in times if t), default=None)
    if last and now >= last + timedelta(seconds=timeout):
        return observe.Failure(Reason.HUNG, f"no progress reported since {rfc3339(last)} (hangTimeoutSeconds {timeout})", True, False)
    if last:
        plan.due(last + timedelta(seconds=timeout))
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
        status["failedNodes"] = [*status["failedNodes"], failure.node][-MAX_FAILED_NODES:]
    if status.get("restarts", 0) > policy.max_restarts:
        _fail(plan, Reason.BACKOFF, f"restartPolicy.maxRestarts ({policy.max_restarts}) used up; last failure: {failure.reason}: {failure.message}", now, generation)
        return
    if status["attemptsWithoutProgress"] >= policy.no_progress_attempts:
        _fail(plan, Reason.NO_PROGRESS, f"{status['attemptsWithoutProgress']} attempts in a row ended without a new checkpoint; last failure: {failure.message}", now, generation)
        return
    exponent = max(status.get("restarts", 0) - 1, 0)
    backoff = 0 if failure.disruption else min(policy.backoff_seconds * 2**exponent, policy.max_backoff_seconds)
    status["nextAttemptAfter"] = rfc3339(now + timedelta(seconds=backoff))
    plan.due(now + timedelta(seconds=backoff))
    kind = "disruption (not counted)" if failure.disruption else f"restart {status['restarts']}/{policy.max_restarts}"
    message = f"attempt {attempt} ended: {failure.reason}: {failure.message}; {kind}, next attempt after {backoff} s"
    plan.events.append(("Warning", str(failure.reason), message))
    enter(status, State.RESTARTING, failure.reason, message, now, generation)


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
        plan.due(now + timedelta(seconds=spec.ttl_seconds_after_finished))


def _next_attempt(owner, spec, stage, ours, plan, now, defaults, observed, generation) -> None:
    status = plan.status
    attempt = status.get("attempt", 0)
    # anything being deleted, or an earlier attempt that did not complete, still holds pods
    lingering = [j for j in ours if _deleting(j) or (_attempt_of(j) <= attempt and observe.job_finished(j) != "Complete")]
    if lingering:
        plan.delete_jobs += [j["metadata"]["name"] for j in lingering if not _deleting(j)]
        return  # the next attempt starts when the old Jobs are gone (their deletion wakes this job)
    if any(not _terminal(p) for p in observed.labelled_pods):
        return  # ... and when no pod of an older attempt still runs (hostnames, GPUs, checkpoints)
    after = observe.parse_time(status.get("nextAttemptAfter"))
    if after and now < after:
        plan.due(after)
        return
    attempt += 1
    plan.create.append(training_job(owner, spec, stage, attempt, defaults, status.get("failedNodes") or []))
    _record_attempt(owner, spec, stage, attempt, plan, now, now, generation)
    plan.events.append(("Normal", "AttemptCreated", f"stage {stage}: created attempt {attempt} ({stage_pods(owner.kind, spec, stage).pods} pods)"))


def _record_attempt(owner, spec, stage, attempt, plan, started: datetime, now: datetime, generation) -> None:
    status = plan.status
    status.update(attempt=attempt, attemptStartTime=rfc3339(started), checkpointAtAttemptStart=status.get("lastCheckpoint"))
    if status["checkpointAtAttemptStart"] is None:
        status.pop("checkpointAtAttemptStart")
    status.setdefault("startTime", rfc3339(started))
    status.pop("nextAttemptAfter", None)
    entry = _stage_entry(status, stage)
    entry.update(attempt=attempt, state=State.PENDING.value)
    entry.setdefault("startTime", rfc3339(started))
    set_condition(status, "Created", True, Reason.CREATED, f"created Job {job_name(owner.name, stage, attempt)}", now, generation)
    if KUEUE_QUEUE_LABEL in kueue(owner, spec):
        enter(status, State.QUEUED, Reason.QUEUED, _queued(owner, spec, job_name(owner.name, stage, attempt)), now, generation)
    elif state_of(status) not in (State.RESTARTING,):
        enter(status, State.PENDING, Reason.CREATED, f"stage {stage}: attempt {attempt} created, waiting for pods", now, generation)


def _queued(owner: Owner, spec: JobSpec, job: str) -> str:
    """One message for a queued attempt, so the reconcile after its creation writes nothing new."""
    return f"waiting for Kueue to admit Job {job} (queue {kueue(owner, spec).get(KUEUE_QUEUE_LABEL)})"


def _blocked_creates(plan: Plan, observed: Observed) -> tuple[str, str, bool] | None:
    """(reason, message, permanent) when a child this plan creates cannot be made."""
    for manifest in plan.create:
        key = (manifest["kind"], manifest["metadata"]["name"])
        if key in observed.foreign:
            other = observed.foreign[key]
            if key in namespace_child_names() and other.owner_gone:
                return (Reason.WAITING_FOR_GC, f"{key[0]} {key[1]}, not the operator's, is being deleted; waiting for it to go", False)
            if key in namespace_child_names():
                return (Reason.NAME_COLLISION, f"{key[0]} {key[1]} already exists in namespace {manifest['metadata']['namespace']} "
                        f"without the label {MANAGED_BY_LABEL}={MANAGED_BY} (owner: {other.owner}); every Dhad job's pods use it "
                        "as their subdomain and the operator never adopts it: delete or rename that object", True)
            if other.owner_gone:
                return (Reason.WAITING_FOR_GC, f"{key[0]} {key[1]} still belongs to {other.owner}, which was deleted; "
                        "waiting for the garbage collector to remove it", False)
            return (Reason.NAME_COLLISION, f"{key[0]} {key[1]} already exists and belongs to {other.owner}; a job never adopts "
                    "another's children: delete that object, or apply this job under another name", True)
        if key in observed.rejected:
            rejection = observed.rejected[key]
            if rejection.permanent:
                return Reason.CHILD_REJECTED, f"the apiserver rejected {key[0]} {key[1]}: {rejection.message}", True
            return Reason.CHILD_NOT_CREATED, f"{key[0]} {key[1]} could not be created ({rejection.code}): {rejection.message}", False
    return None


def _pending(plan: Plan, reason: str, message: str, now: datetime, generation) -> None:
    """Waiting for something outside the job; an event when the reason or message is new."""
    status = plan.status
    before = next((c for c in status.get("conditions") or [] if c["type"] == "Created"), None)
    if before is None or (before.get("reason"), before.get("message")) != (reason, message[:4000]):
        if reason not in (Reason.WAITING_FOR_MODEL, Reason.REFERENCE_FAILED):
            plan.events.append(("Warning", str(reason), message))
    enter(status, State.PENDING, reason, message, now, generation)
    set_condition(status, "Created", False, reason, message, now, generation)


def _fail(plan: Plan, reason: str, message: str, now: datetime, generation) -> None:
    plan.status["completionTime"] = rfc3339(now)
    plan.status.pop("nextAttemptAfter", None)
    plan.events.append(("Warning", str(reason), message))
    enter(plan.status, State.FAILED, reason, message, now, generation)


def _finished(obj: dict, observed: Observed, now: datetime, plan: Plan, generation) -> None:
    """After Succeeded/Failed: no Job keeps running; the TTL removes the children, never the object."""
    plan.delete_jobs = [j["metadata"]["name"] for j in observed.jobs if not observe.job_finished(j) and not _deleting(j)]
    ttl = (obj.get("spec") or {}).get("ttlSecondsAfterFinished")
    done = observe.parse_time(plan.status.get("completionTime"))
    if ttl is None or done is None:
        return
    due = done + timedelta(seconds=ttl)
    if now < due:
        plan.due(due)
        return
    plan.delete_children = [("Job", j["metadata"]["name"]) for j in observed.jobs if not _deleting(j)] + sorted(observed.children)
    plan.delete_jobs = []
    if not condition_true(plan.status, "ChildrenDeleted"):
        plan.events.append(("Normal", Reason.TTL_EXPIRED, f"ttlSecondsAfterFinished ({ttl}) passed: children deleted, the job object stays"))
        set_condition(plan.status, "ChildrenDeleted", True, Reason.TTL_EXPIRED, f"ttlSecondsAfterFinished ({ttl}) passed", now, generation)


def _fitted(plan: Plan, now: datetime, generation) -> Plan:
    """The status cut to the CRD's schema (values it cannot hold are dropped and said so), and the
    seconds until the next timer."""
    plan.status, problems = fit_status(plan.status)
    if problems:
        set_condition(plan.status, Reason.INVALID_REPORT, True, Reason.INVALID_REPORT,
                      "status values dropped: " + "; ".join(problems[:8]), now, generation)
        plan.status, _ = fit_status(plan.status)
    if plan.wake is not None:
        plan.requeue_after = max((plan.wake - now).total_seconds(), 0.0)
    return plan


def progress_of(config_map: dict | None) -> dict | None:
    """The checked progress report of a progress ConfigMap (raw, or as the cache keeps it)."""
    if not config_map:
        return None
    if "progress" in config_map and "data" not in config_map:
        return config_map["progress"]
    return observe.progress_report((config_map.get("data") or {}).get("progress") or "{}")
