"""Reasons and exit codes shared by the trainer (which produces them) and the operator (which acts).

torchrun exits 1 for any worker failure, so the trainer's launcher maps what its workers wrote to
one of these codes and writes a JSON termination message; the operator classifies a failed pod by
them: bad config fails the job at once, a disruption does not use up restartPolicy.maxRestarts,
anything else is a restartable failure.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ExitCode(IntEnum):
    """The launcher's exit codes (sysexits-style where one fits)."""

    SUCCESS = 0
    WORKER_FAILED = 70  # a worker raised or crashed: restart the gang, resume from a checkpoint
    BAD_CONFIG = 78  # the spec or something it references is invalid: do not retry
    DATA_ERROR = 65  # a dataset is missing, empty or unreadable: do not retry
    STORAGE_UNAVAILABLE = 75  # the object store could not be reached: retry
    PREEMPTED = 143  # SIGTERM (eviction, preemption, drain, suspend): a disruption, not a failure


NO_RETRY = frozenset({ExitCode.BAD_CONFIG, ExitCode.DATA_ERROR})


class Reason(StrEnum):
    """Condition reasons (CamelCase), also the `reason` of termination messages."""

    CREATED = "Created"
    WAITING_FOR_MODEL = "WaitingForModel"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    RUNNING = "Running"
    STAGE_SUCCEEDED = "StageSucceeded"
    SUCCEEDED = "Succeeded"
    BAD_CONFIG = "BadConfig"
    DATA_ERROR = "DataError"
    WORKER_FAILED = "WorkerFailed"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    PREEMPTED = "Preempted"
    EVICTED = "Evicted"
    NODE_LOST = "NodeLost"
    OOM_KILLED = "OOMKilled"
    HUNG = "Hung"
    BACKOFF = "BackoffLimitExceeded"
    NO_PROGRESS = "NoProgress"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    IMAGE_PULL = "ImagePullBackOff"
    CONTAINER_CONFIG = "CreateContainerConfigError"
    UNSCHEDULABLE = "Unschedulable"
    INVALID_SPEC = "InvalidSpec"
    REFERENCE_FAILED = "ReferencedJobFailed"
    NAME_COLLISION = "NameCollision"  # a child's name is taken by an object this job does not own
    WAITING_FOR_GC = "WaitingForGarbageCollection"  # ... by a child of a deleted job, still being collected
    CHILD_REJECTED = "ChildRejected"  # the apiserver refused a child (422/400): the spec cannot work
    CHILD_NOT_CREATED = "ChildNotCreated"  # a child could not be created for now (quota, permissions)
    PODS_REJECTED = "PodsRejected"  # admission refuses the attempt's pods (Pod Security): the spec cannot work
    PODS_NOT_CREATED = "PodsNotCreated"  # the Job controller cannot create pods for now (quota)
    JOB_DELETED = "JobDeleted"  # the attempt's Job was deleted by someone else: a disruption
    INVALID_REPORT = "InvalidProgressReport"  # the trainer reported values that status cannot hold
    TTL_EXPIRED = "TTLExpired"
    PLAN_FITS = "PlanFits"  # Planned condition: the per-GPU plan fits the GPU
    PLAN_EXCEEDS_GPU_MEMORY = "PlanExceedsGPUMemory"
    PLAN_NOT_CHECKED = "PlanNotChecked"  # architecture or GPU memory unknown


EXIT_REASONS = {
    ExitCode.WORKER_FAILED: Reason.WORKER_FAILED,
    ExitCode.BAD_CONFIG: Reason.BAD_CONFIG,
    ExitCode.DATA_ERROR: Reason.DATA_ERROR,
    ExitCode.STORAGE_UNAVAILABLE: Reason.STORAGE_UNAVAILABLE,
    ExitCode.PREEMPTED: Reason.PREEMPTED,
}

# The progress channel: rank 0 merge-patches this key of the per-job progress ConfigMap, which only
# the job's own ServiceAccount may patch; the operator copies it into status.progress.
PROGRESS_KEY = "progress"
PROGRESS_CONFIGMAP_ENV = "DHAD_PROGRESS_CONFIGMAP"
NAMESPACE_ENV = "DHAD_NAMESPACE"
TERMINATION_LOG_ENV = "DHAD_TERMINATION_LOG"
