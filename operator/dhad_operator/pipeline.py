"""The Pipeline reconcile: (pipeline object, its child jobs, the step cache, now) -> a PipelinePlan. Pure.

The decisions are dhad_api.pipeline.walk's (shared with local mode): which child jobs should exist, each
stage's status, the outcome. This module turns them into Kubernetes terms: child job manifests owned by
the pipeline (ownerReference controller true, matched by UID), the step cache's ConfigMaps, deletes of
children the walk no longer wants (a changed stage's old job and everything after it), suspend patches,
conditions and events. Children are ordinary Dhad jobs, reconciled by the job reconcile; their status
(state, outputModel, scores) is all the pipeline reads, so the operator never needs S3 credentials.

The step cache is one ConfigMap per key, `dhad-cache-<key>` labelled `dhad.dev/cache`, in the pipeline's
namespace and owned by no one: deleting a pipeline keeps it (as S3 keeps the outputs), and another
pipeline in the namespace with the same stage reuses it. `kubectl delete cm -l dhad.dev/cache` empties it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import ValidationError

from dhad_api.jobs import API_VERSION
from dhad_api.pipeline import (
    ANNOTATION_CACHE_KEY,
    ANNOTATION_RETRY,
    KIND,
    LABEL_CACHE,
    LABEL_PIPELINE,
    LABEL_PIPELINE_ROLE,
    LABEL_PIPELINE_STAGE,
    CacheEntry,
    ChildReport,
    cache_config_map_name,
    parse_pipeline,
    walk,
)
from dhad_api.reasons import Reason
from dhad_api.status import State
from dhad_operator.render import Defaults
from dhad_operator.status import PIPELINE_STATUS_SCHEMA, enter, fit_status, rfc3339, state_of

FINISHED = (State.SUCCEEDED.value, State.FAILED.value)


@dataclass
class PipelineObserved:
    """What exists now: the Dhad jobs whose controller is this pipeline (any kind), and the cache entries;
    after a refused create, who holds the name (taken) or what the apiserver said (rejected)."""

    children: list[dict] = field(default_factory=list)
    cache: list[dict] = field(default_factory=list)  # ConfigMaps labelled dhad.dev/cache in the namespace
    taken: dict[str, str] = field(default_factory=dict)  # child name -> its owner, not this pipeline
    rejected: dict[str, str] = field(default_factory=dict)  # child name -> the apiserver's refusal


@dataclass
class PipelinePlan:
    status: dict
    create: list[dict] = field(default_factory=list)  # child jobs, then cache ConfigMaps
    delete: list[tuple[str, str]] = field(default_factory=list)  # (kind, name) of children no longer wanted
    suspend: list[tuple[str, str, bool]] = field(default_factory=list)  # (kind, name, spec.suspend) patches
    events: list[tuple[str, str, str]] = field(default_factory=list)
    remove_retry_annotation: bool = False
    requeue_after: float | None = None


def owner_reference(obj: dict) -> dict:
    meta = obj["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def owned_by(child: dict, uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") == uid for r in child["metadata"].get("ownerReferences") or [])


def child_manifest(obj: dict, step, suspend: bool) -> dict:
    meta = obj["metadata"]
    return {
        "apiVersion": API_VERSION, "kind": step.kind.value,
        "metadata": {"name": step.name, "namespace": meta["namespace"],
                     "labels": {LABEL_PIPELINE: meta["name"], LABEL_PIPELINE_STAGE: step.stage, LABEL_PIPELINE_ROLE: step.role},
                     "annotations": {ANNOTATION_CACHE_KEY: step.key}, "ownerReferences": [owner_reference(obj)]},
        "spec": {**step.spec, "suspend": suspend},
    }


def cache_config_map(namespace: str, entry: CacheEntry) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": cache_config_map_name(entry.key), "namespace": namespace,
                         "labels": {LABEL_CACHE: "v1", LABEL_PIPELINE: entry.pipeline, LABEL_PIPELINE_STAGE: entry.stage}},
            "data": {"entry": json.dumps(entry.to_dict(), ensure_ascii=False, sort_keys=True)}}


def cache_entries(config_maps: list[dict]) -> dict[str, CacheEntry]:
    """Entries by key; a ConfigMap that does not parse, or whose name is not its key's, is ignored."""
    found = {}
    for cm in config_maps:
        try:
            entry = CacheEntry.from_dict(json.loads((cm.get("data") or {}).get("entry") or "{}"))
        except ValueError:
            continue
        if entry is not None and cm["metadata"]["name"] == cache_config_map_name(entry.key):
            found[entry.key] = entry
    return found


def _stage_message(walked) -> str:
    entry = next((s for s in walked.stages if s["name"] == (walked.current or "").split("/")[0]), None)
    if entry is None:
        return "starting"
    if (walked.current or "").endswith("/gate"):
        gate = entry.get("gate") or {}
        return f"stage {entry['name']}: gate EvalJob {gate.get('job')} {gate.get('state', 'Pending')}"
    return f"stage {entry['name']}: {entry['kind']} {entry.get('job')} {entry.get('state', 'Pending')}"


def _events(old: list[dict], new: list[dict]) -> list[tuple[str, str, str]]:
    """One event per stage or gate transition (not per reconcile)."""
    before = {s["name"]: s for s in old}
    events = []
    for entry in new:
        prev = before.get(entry["name"], {})
        if entry.get("state") != prev.get("state") or entry.get("job") != prev.get("job"):
            if entry.get("cached") and entry.get("state") == State.SUCCEEDED.value:
                events.append(("Normal", "StageCached", f"stage {entry['name']}: reused {entry.get('job')} ({entry.get('cachedFrom')}), output {entry.get('outputModel') or 'scores'}"))
            elif entry.get("state") == State.SUCCEEDED.value:
                events.append(("Normal", "StageSucceeded", f"stage {entry['name']}: {entry['kind']} {entry.get('job')} succeeded"))
            elif entry.get("state") == State.FAILED.value:
                events.append(("Warning", "StageFailed", f"stage {entry['name']}: {entry.get('message') or 'failed'}"))
        gate, prev_gate = entry.get("gate") or {}, prev.get("gate") or {}
        if gate.get("state") != prev_gate.get("state") and gate.get("state") in FINISHED:
            passed = gate["state"] == State.SUCCEEDED.value
            events.append(("Normal" if passed else "Warning", "GatePassed" if passed else "GateFailed",
                           f"gate of stage {entry['name']}: {gate.get('message')}"))
    return events


def decide(obj: dict, observed: PipelineObserved, now: datetime, defaults: Defaults) -> PipelinePlan:
    meta = obj["metadata"]
    name, namespace, generation = meta["name"], meta["namespace"], meta.get("generation")
    old = obj.get("status") or {}
    status = copy.deepcopy(old)
    status["observedGeneration"] = generation
    plan = PipelinePlan(status=status)
    if meta.get("deletionTimestamp"):
        return plan  # the garbage collector deletes the children (their outputs in S3 stay)
    retry = (meta.get("annotations") or {}).get(ANNOTATION_RETRY)
    plan.remove_retry_annotation = retry is not None
    try:
        spec = parse_pipeline(obj["spec"])
    except ValidationError as error:
        message = "; ".join(f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors())[:2000]
        _finish(plan, State.FAILED, Reason.INVALID_SPEC, message, now, generation, old)
        plan.status, _ = fit_status(plan.status, PIPELINE_STATUS_SCHEMA)
        return plan

    ours = [c for c in observed.children if owned_by(c, meta["uid"])]
    foreign = {c["metadata"]["name"]: "another owner" for c in observed.children if not owned_by(c, meta["uid"])}
    foreign.update(observed.taken)
    deleting = {c["metadata"]["name"] for c in ours if c["metadata"].get("deletionTimestamp")}
    live = {c["metadata"]["name"]: c for c in ours if c["metadata"]["name"] not in deleting}
    reports = {n: ChildReport.of(c) for n, c in live.items()}
    cache = cache_entries(observed.cache)
    walked = walk(name, spec, reports, cache, defaults.trainer_image, retries=old.get("retries"), retry=retry,
                  image=defaults.trainer_image)
    if retry is not None and walked.retried is None:
        plan.events.append(("Warning", "RetryIgnored", f"{ANNOTATION_RETRY}={retry}: no failed job of that stage to retry"))
    elif walked.retried:
        plan.events.append(("Normal", "Retry", f"stage {walked.retried}: a new job resumes from the failed one's newest checkpoint"))

    wanted = {s.name for s in walked.steps}
    for step in walked.steps:
        child = live.get(step.name)
        if child is None:
            if step.name in deleting:
                plan.requeue_after = 2  # the same name is still going away
            elif step.name in foreign:  # never adopted: someone else's job holds the name
                plan.events.append(("Warning", "NameTaken", f"stage {step.stage}: {step.kind.value} {step.name} exists and "
                                    f"is not this pipeline's (its owner: {foreign[step.name]}); delete it or rename the pipeline"))
                plan.requeue_after = 30
            elif step.name in observed.rejected:
                plan.events.append(("Warning", "StageRejected", f"stage {step.stage}: the apiserver refused {step.kind.value} "
                                    f"{step.name}: {observed.rejected[step.name]}"[:1024]))
                plan.requeue_after = 30
            elif not spec.suspend:
                plan.create.append(child_manifest(obj, step, False))
                plan.events.append(("Normal", "StageStarted", f"stage {step.stage}: created {step.kind.value} {step.name}"
                                    + ("" if step.role == "stage" else f" ({step.role})")))
        elif reports[step.name].state not in FINISHED and reports[step.name].suspended != spec.suspend:
            plan.suspend.append((child["kind"], step.name, spec.suspend))
    plan.delete = [(c["kind"], n) for n, c in live.items() if n not in wanted]
    plan.create += [cache_config_map(namespace, e) for e in walked.cache_writes]

    done = sum(1 for s in walked.stages if s.get("state") == State.SUCCEEDED.value
               and (s.get("gate") or {}).get("state", State.SUCCEEDED.value) == State.SUCCEEDED.value)
    status.update(stages=walked.stages, retries=walked.retries, progress=f"{done}/{len(spec.stages)}")
    if walked.current:
        status["stage"] = walked.current
    else:
        status.pop("stage", None)
    if walked.steps and not status.get("startTime"):
        status["startTime"] = rfc3339(now)
    plan.events += _events(old.get("stages") or [], walked.stages)
    if walked.outcome == State.SUCCEEDED:
        status["outputModel"] = walked.output_model
        _finish(plan, State.SUCCEEDED, Reason.SUCCEEDED, "every stage and gate succeeded"
                + (f"; model at {walked.output_model}" if walked.output_model else ""), now, generation, old)
    elif walked.outcome == State.FAILED:
        status.pop("outputModel", None)  # a failed gate promotes nothing, not even an earlier generation's model
        _finish(plan, State.FAILED, walked.reason, walked.message, now, generation, old)
    else:
        status.pop("outputModel", None)
        status.pop("completionTime", None)
        if spec.suspend:
            enter(status, State.SUSPENDED, Reason.SUSPENDED, f"spec.suspend is true: {_stage_message(walked)} "
                  "is suspended (pods stopped, checkpoints kept) and no stage starts; false again resumes", now, generation)
        else:
            enter(status, State.RUNNING, Reason.RUNNING, _stage_message(walked), now, generation)
    for key in [k for k, v in status.items() if v in (None, [], {})]:
        del status[key]
    plan.status, _ = fit_status(status, PIPELINE_STATUS_SCHEMA)  # as stored: an unchanged status is not written again
    return plan


def _finish(plan: PipelinePlan, state: State, reason: str, message: str, now: datetime, generation, old: dict) -> None:
    status = plan.status
    if state_of(old) != state or not status.get("completionTime"):
        status["completionTime"] = rfc3339(now)
        plan.events.append(("Normal" if state == State.SUCCEEDED else "Warning", str(reason), message[:1024]))
    enter(status, state, reason, message, now, generation)
