"""Status bookkeeping: conditions (metav1.Condition) and the one-word state derived from them."""

from __future__ import annotations

from datetime import UTC, datetime

from dhad_api.status import State

LIFECYCLE = ("Queued", "Suspended", "Running", "Restarting", "Succeeded", "Failed")


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def set_condition(status: dict, type_: str, true: bool, reason: str, message: str, now: datetime,
                  generation: int | None = None) -> None:
    """Sets one condition; lastTransitionTime changes only when the status flips."""
    conditions = status.setdefault("conditions", [])
    value = "True" if true else "False"
    for condition in conditions:
        if condition["type"] == type_:
            if condition["status"] != value:
                condition["lastTransitionTime"] = rfc3339(now)
            condition.update({"status": value, "reason": reason, "message": message[:4000]})
            if generation is not None:
                condition["observedGeneration"] = generation
            return
    if not true and type_ != "Created":
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
