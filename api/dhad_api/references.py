"""`model.fromJob` and friends: which other jobs a job waits for, and the model URIs they produced.

Shared by the operator (which reads the referenced objects from the API) and local mode.
"""

from __future__ import annotations

from dhad_api.common import ModelSpec
from dhad_api.jobs import JobSpec, RLAIFJobSpec, SFTJobSpec
from dhad_api.reasons import Reason

RESOLVED_KEYS = {"model": "modelUri", "judge": "judgeModelUri", "reward": "rewardModelUri", "teacher": "teacherModelUri"}
COMPARE = "compare:"  # role prefix of an EvalJob's evaluation.compare models; resolved under compareModelUris


def model_specs(spec: JobSpec) -> dict[str, ModelSpec]:
    """Every model reference in a spec, by role."""
    found = {"model": spec.model}
    if isinstance(spec, RLAIFJobSpec):
        if spec.feedback.judge.model:
            found["judge"] = spec.feedback.judge.model
        if spec.policy.reward_model:
            found["reward"] = spec.policy.reward_model
    if isinstance(spec, SFTJobSpec) and spec.respond and spec.respond.teacher.model:
        found["teacher"] = spec.respond.teacher.model
    evaluation = getattr(spec, "evaluation", None)
    if evaluation is not None and evaluation.judge and evaluation.judge.model:
        found["judge"] = evaluation.judge.model
    for compared in getattr(evaluation, "compare", None) or ():
        found[COMPARE + compared.name] = compared.model
    return found


def _put(resolved: dict, role: str, uri: str) -> None:
    if role.startswith(COMPARE):
        resolved.setdefault("compareModelUris", {})[role.removeprefix(COMPARE)] = uri
    else:
        resolved[RESOLVED_KEYS[role]] = uri


def references(spec: JobSpec) -> set[tuple[str, str]]:
    return {(m.from_job.kind.value, m.from_job.name) for m in model_specs(spec).values() if m.from_job}


def resolve_models(spec: JobSpec, observed: dict[tuple[str, str], dict | None]):
    """(resolved URIs, None) when every reference has Succeeded, else ({}, (reason, message, permanent))."""
    resolved: dict[str, str] = {}
    for role, model in model_specs(spec).items():
        if model.uri:
            _put(resolved, role, model.uri)
            continue
        ref = model.from_job
        target = observed.get((ref.kind.value, ref.name))
        status = (target or {}).get("status") or {}
        what = f"{ref.kind.value} {ref.name}"
        if target is None:
            return {}, (Reason.WAITING_FOR_MODEL, f"waiting for {what} ({role}): it does not exist yet", False)
        if status.get("state") == "Failed":
            return {}, (Reason.REFERENCE_FAILED, f"{what} ({role}) failed; this job waits until a job of that name succeeds", False)
        if status.get("state") != "Succeeded" or not status.get("outputModel"):
            return {}, (Reason.WAITING_FOR_MODEL, f"waiting for {what} ({role}) to succeed (now {status.get('state', 'Pending')})", False)
        _put(resolved, role, status["outputModel"])
    return resolved, None
