"""Status bookkeeping: conditions (metav1.Condition) and the one-word state derived from them."""

from __future__ import annotations

import copy
import math
import re
from datetime import UTC, datetime

from dhad_api.status import State

LIFECYCLE = ("Queued", "Suspended", "Running", "Restarting", "Succeeded", "Failed")


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(status: dict, type_: str, true: bool | str, reason: str, message: str, now: datetime,
                  generation: int | None = None) -> None:
    """Sets one condition; lastTransitionTime changes only when the status flips. `true` is a bool, or
    "True", "False" or "Unknown" as metav1.Condition spells it (a string is always recorded)."""
    conditions = status.setdefault("conditions", [])
    if isinstance(true, str):
        if true not in ("True", "False", "Unknown"):
            raise ValueError(f"condition status {true!r}: True, False or Unknown")
        value, record = true, True
    else:
        value, record = ("True" if true else "False"), true or type_ == "Created"
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != value:
                condition["lastTransitionTime"] = rfc3339(now)
            condition.update({"status": value, "reason": reason, "message": message[:4000]})
            if generation is not None:
                condition["observedGeneration"] = generation
            return
    if not record:
        return  # an absent condition already means False
    conditions.append({"type": type_, "status": value, "reason": reason, "message": message[:4000],
                       "lastTransitionTime": rfc3339(now), **({"observedGeneration": generation} if generation is not None else {})})


def condition_true(status: dict, type_: str) -> bool:
    return any(c["type"] == type_ and c["status"] == "True" for c in status.get("conditions") or [])


def enter(status: dict, state: State, reason: str, message: str, now: datetime, generation: int | None = None) -> None:
    """Makes `state` the job's lifecycle condition (the others False) and mirrors it in status.state."""
    for type_ in LIFECYCLE:
        if type_ == state.value:
            set_condition(status, type_, True, reason, message, now, generation)
        elif condition_true(status, type_):
            set_condition(status, type_, False, reason, message, now, generation)
    status["state"] = state.value


def state_of(status: dict) -> State:
    """The state the conditions say (status.state is only its mirror for printer columns)."""
    for type_ in ("Failed", "Succeeded", "Suspended", "Restarting", "Queued", "Running"):
        if condition_true(status, type_):
            return State(type_)
    return State.PENDING


# --- fitting status to the CRD's schema -------------------------------------------------------------

_DROP = object()


def _status_schema(kind: str) -> dict:
    from dhad_api.crd import model_schema
    from dhad_api.pipeline import PipelineStatus
    from dhad_api.status import JobStatus

    return model_schema({"job": JobStatus, "pipeline": PipelineStatus}[kind])


STATUS_SCHEMA = _status_schema("job")
PIPELINE_STATUS_SCHEMA = _status_schema("pipeline")


def fit_status(status: dict, schema: dict = STATUS_SCHEMA) -> tuple[dict, list[str]]:
    """The status as the apiserver will store it: unknown keys pruned, defaults applied, strings cut
    to maxLength, lists to maxItems, and values of the wrong type or out of bounds dropped (listed in
    the second value). So one bad value from a trainer can never make the write, and with it every
    later reconcile (suspend, deadline, TTL), fail; and a status equal to the stored one is not rewritten."""
    problems: list[str] = []
    fitted = _fit(status, schema, "status", problems)
    return ({} if fitted is _DROP else fitted), problems


def _fit(value, schema: dict, path: str, problems: list[str]):
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            problems.append(f"{path}: not an object")
            return _DROP
        properties, extra = schema.get("properties") or {}, schema.get("additionalProperties")
        out = {}
        for key, item in value.items():
            sub = properties.get(key) or (extra if isinstance(extra, dict) else None)
            if sub is None:
                continue  # the apiserver would prune it
            fitted = _fit(item, sub, f"{path}.{key}", problems)
            if fitted is not _DROP:
                out[key] = fitted
        for key, sub in properties.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        if "maxProperties" in schema and len(out) > schema["maxProperties"]:
            problems.append(f"{path}: more than {schema['maxProperties']} entries")
            out = dict(list(out.items())[: schema["maxProperties"]])
        if any(key not in out for key in schema.get("required") or []):
            problems.append(f"{path}: missing {', '.join(k for k in schema['required'] if k not in out)}")
            return _DROP
        return out
    if kind == "array":
        if not isinstance(value, list):
            problems.append(f"{path}: not a list")
            return _DROP
        items = [f for i, v in enumerate(value) if (f := _fit(v, schema.get("items") or {}, f"{path}[{i}]", problems)) is not _DROP]
        if "maxItems" in schema and len(items) > schema["maxItems"]:
            problems.append(f"{path}: more than {schema['maxItems']} items")
            items = items[: schema["maxItems"]]
        return items
    if kind == "string":
        if not isinstance(value, str):
            problems.append(f"{path}: not a string")
            return _DROP
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{path}: {value[:40]!r} is not one of {schema['enum']}")
            return _DROP
        value = value[: schema.get("maxLength", len(value))]
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{path}: {value[:40]!r} does not match {schema['pattern']}")
            return _DROP
        return value
    if kind in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or (kind == "integer" and not float(value).is_integer()):
            problems.append(f"{path}: {str(value)[:40]!r} is not a finite {kind}")
            return _DROP
        if ("minimum" in schema and value < schema["minimum"]) or ("maximum" in schema and value > schema["maximum"]):
            problems.append(f"{path}: {value} is out of bounds")
            return _DROP
        return int(value) if kind == "integer" else value
    if kind == "boolean" and not isinstance(value, bool):
        problems.append(f"{path}: not a boolean")
        return _DROP
    return value
