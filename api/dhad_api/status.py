"""Status of every job kind: a state for people, conditions with reasons for machines, progress."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from dhad_api.base import DhadModel

Message = Annotated[str, StringConstraints(max_length=4096)]
Timestamp = Annotated[str, StringConstraints(max_length=64)]


class State(StrEnum):
    """The one-word summary shown by `kubectl get dhad`, derived from the conditions."""

    PENDING = "Pending"
    QUEUED = "Queued"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class Condition(DhadModel):
    """A metav1.Condition."""

    type: Annotated[str, StringConstraints(max_length=64)] = Field(description="type is the condition type: Created, Queued, Suspended, Running, Restarting, Succeeded, Failed, Unschedulable, Planned (the memory plan: True fits, False exceeds the GPU, Unknown not checked).")
    status: Annotated[str, StringConstraints(pattern=r"^(True|False|Unknown)$")] = Field(description="status is True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=128)] = Field("", description="reason is a CamelCase machine-readable cause (constants in dhad_api.reasons).")
    message: Message = Field("", description="message says what happened, for people.")
    last_transition_time: Timestamp | None = Field(None, description="lastTransitionTime is when status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="observedGeneration is the spec generation this condition was set for.")


class Progress(DhadModel):
    """Training progress as rank 0 reports it."""

    step: int = Field(0, ge=0, description="step is the last completed optimizer step.")
    total_steps: int | None = Field(None, ge=0, description="totalSteps is the planned number of steps, when known.")
    epoch: float | None = Field(None, ge=0, description="epoch is the fractional epoch.")
    loss: float | None = Field(None, description="loss is the latest training loss.")
    percent: int | None = Field(None, ge=0, le=100, description="percent is step/totalSteps as a whole percentage, for kubectl.")
    tokens_per_second: float | None = Field(None, ge=0, description="tokensPerSecond is the recent training throughput over all processes.")
    eta_seconds: int | None = Field(None, ge=0, description="etaSeconds estimates the time left.")
    figures: dict[Annotated[str, StringConstraints(max_length=64)], float] | None = Field(
        None, max_length=16,
        description="figures are the sub-stage's own latest numbers: for policy rewardMean, rewardStd, kl (per response token), "
        "responseLength and klCoefficient; for feedback judgements, verdicts, forcedVerdicts, unparseable, refused, judgeErrors, "
        "agreementRate and trainPairs.",
    )
    updated_at: Timestamp | None = Field(None, description="updatedAt is when this progress was reported (RFC 3339).")


class StageStatus(DhadModel):
    """One sub-stage (RLAIF feedback/reward/policy, SFT respond/train) of a job."""

    name: Annotated[str, StringConstraints(max_length=32)] = Field(description="name is the sub-stage.")
    state: State = Field(State.PENDING, description="state is the sub-stage's state.")
    attempt: int = Field(0, ge=0, description="attempt is the sub-stage's current attempt number.")
    start_time: Timestamp | None = Field(None, description="startTime is when the sub-stage's first attempt started.")
    completion_time: Timestamp | None = Field(None, description="completionTime is when it finished.")
    output: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="output is the URI of what the sub-stage wrote.")
    message: Message | None = Field(None, description="message explains the state.")


class JobStatus(DhadModel):
    """Status written by the operator; the spec is never written by it."""

    state: State = Field(State.PENDING, description="state is the one-word summary of the conditions.")
    conditions: list[Condition] = Field(default_factory=list, max_length=16, description="conditions are the detailed state with reasons.")
    observed_generation: int | None = Field(None, ge=0, description="observedGeneration is the spec generation last reconciled.")
    attempt: int = Field(0, ge=0, description="attempt is the number of the current (or last) attempt of the current stage, from 1.")
    restarts: int = Field(0, ge=0, description="restarts counts failed attempts that used up restartPolicy.maxRestarts.")
    disruptions: int = Field(0, ge=0, description="disruptions counts attempts ended by preemption, eviction or node loss (not counted as restarts).")
    attempts_without_progress: int = Field(0, ge=0, description="attemptsWithoutProgress counts consecutive attempts that ended without a new checkpoint.")
    ended_attempt: int = Field(0, ge=0, description="endedAttempt is the last attempt whose end was accounted (restarts, backoff); equal to attempt while waiting to restart.")
    checkpoint_at_attempt_start: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="checkpointAtAttemptStart is lastCheckpoint when the current attempt started, to tell attempts that made progress.")
    next_attempt_after: Timestamp | None = Field(None, description="nextAttemptAfter is when the next attempt may start (backoff), RFC 3339.")
    start_time: Timestamp | None = Field(None, description="startTime is when the first attempt was created.")
    attempt_start_time: Timestamp | None = Field(None, description="attemptStartTime is when the current attempt was created.")
    completion_time: Timestamp | None = Field(None, description="completionTime is when the job Succeeded or Failed.")
    stage: Annotated[str, StringConstraints(max_length=32)] | None = Field(None, description="stage is the sub-stage running now.")
    stages: list[StageStatus] = Field(default_factory=list, max_length=8, description="stages are the sub-stages' states, in order.")
    progress: Progress | None = Field(None, description="progress is the latest training progress.")
    last_checkpoint: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="lastCheckpoint is the URI of the newest complete checkpoint.")
    output_model: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="outputModel is the URI of the final model, set on success.")
    resolved_model: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="resolvedModel is the model URI the job started from (after fromJob).")
    scores: dict[Annotated[str, StringConstraints(max_length=64)], float] = Field(default_factory=dict, max_length=32, description="scores are the headline evaluation scores by suite (EvalJob).")
    report: Annotated[str, StringConstraints(max_length=1024)] | None = Field(None, description="report is the URI of the evaluation report (EvalJob).")
    failed_nodes: list[Annotated[str, StringConstraints(max_length=253)]] = Field(default_factory=list, max_length=32, description="failedNodes are nodes where pods failed, avoided when restartPolicy.avoidFailedNodes.")
