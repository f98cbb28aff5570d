"""Parts shared by every job kind's spec: where the model and data come from, how many GPUs, how to
distribute, checkpoint and restart, where outputs go, and what platform teams override on pods.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated

from pydantic import Field, StrictBool, StringConstraints

from dhad_api.base import DhadModel, Rule, RuledModel

# URI grammar, one piece per part so every URI field checks s3:// and hf:// alike (RE2 and pydantic's
# regex both lack lookahead, so "not . or .." is spelled out): a bucket is 3-63 lowercase DNS
# characters; a key is segments of non-space characters without "@" (no inline credentials), none of
# them "." or "..", and no empty segment except a trailing "/" (a prefix).
_BUCKET = r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"
_SEGMENT = r"([^./@\s][^/@\s]*|\.[^./@\s][^/@\s]*|\.\.[^/@\s]+)"
_S3 = rf"s3://{_BUCKET}(/{_SEGMENT})*/?"
_HF = r"hf://[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?(@[A-Za-z0-9._/-]+)?"
# A path in the container or on the local-mode machine (absolute or relative, globs allowed, spaces
# inside allowed: a clone may live under one), or file:// and an absolute path. No ":" anywhere, so a
# misspelt or unknown scheme (S3://, gs://, s3:/b) is not taken for a path.
_LOCAL = r"[^:\s]([^:]*[^:\s])?"
_FILE = r"file:///([^:]*[^:\s])?"
S3_URI = rf"^{_S3}$"
MODEL_URI = rf"^({_S3}|{_HF}|/[^\s]*)$"
DATA_URI = rf"^({_S3}|{_HF}|{_FILE}|{_LOCAL})$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi)?$"
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
# A Kubernetes qualified name: an optional DNS-subdomain prefix and "/", then a name (resource names,
# annotation keys); the same pattern is a CEL rule on maps, whose keys the CRD schema cannot constrain.
QUALIFIED_NAME = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
# Linux capabilities as Kubernetes writes them (IPC_LOCK), with or without the CAP_ prefix.
CAPABILITY = r"^(CAP_)?[A-Z][A-Z_]*[A-Z]$"

S3Uri = Annotated[str, StringConstraints(pattern=S3_URI, max_length=1024)]
ModelUri = Annotated[str, StringConstraints(pattern=MODEL_URI, max_length=1024)]
# A dataset, prompt set, corpus or benchmark folder: s3:// (prefixes and globs), hf://, file:// or a path.
DataUri = Annotated[str, StringConstraints(pattern=DATA_URI, min_length=1, max_length=1024)]
DnsLabel = Annotated[str, StringConstraints(pattern=DNS_LABEL, min_length=1, max_length=63)]
Quantity = Annotated[str, StringConstraints(pattern=QUANTITY, max_length=32)]
ShortText = Annotated[str, StringConstraints(max_length=253)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]
AnnotationValue = Annotated[str, StringConstraints(max_length=4096)]
QualifiedName = Annotated[str, StringConstraints(pattern=QUALIFIED_NAME, max_length=253)]

# Env names the operator sets for torchrun and the trainer; a user value would break the wiring.
RESERVED_ENV = (
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
    "NNODES", "NPROC_PER_NODE", "JOB_COMPLETION_INDEX",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION",
    "DHAD_STAGE", "DHAD_ATTEMPT", "DHAD_JOB_UID", "DHAD_JOB_FILE", "DHAD_NAMESPACE", "DHAD_PROGRESS_CONFIGMAP",
    "DHAD_JUDGE_API_KEY", "DHAD_TEACHER_API_KEY", "HF_TOKEN", "DHAD_WORK_DIR",
    "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN", "DHAD_HUB_TOKEN",
)
# Resources with a field of their own in Resources; `extra` may not set them a second time.
OWN_RESOURCES = ("cpu", "memory", "nvidia.com/gpu")
# Capabilities that amount to a privileged container: refused unless the platform allows privileged pods.
PRIVILEGED_CAPABILITIES = ("SYS_ADMIN", "CAP_SYS_ADMIN", "ALL")


class DType(StrEnum):
    """Weight dtype to load a model in; `auto` takes the checkpoint's own."""

    AUTO = "auto"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"
    FLOAT32 = "float32"


class JobKind(StrEnum):
    """The Dhad job kinds, as `kind` is written in a manifest."""

    PRETRAIN = "PretrainJob"
    SFT = "SFTJob"
    RLAIF = "RLAIFJob"
    EVAL = "EvalJob"


class JobReference(RuledModel):
    """Another Dhad job in the same namespace, whose output model is used once it has Succeeded."""

    kind: JobKind = Field(description="kind is the referenced job's kind: PretrainJob, SFTJob or RLAIFJob (an EvalJob has no output model). Required.")
    name: DnsLabel = Field(description="name is the referenced job's name in this namespace. Required.")

    rules = (
        Rule("self.kind != 'EvalJob'", "fromJob: an EvalJob has no output model; reference a PretrainJob, SFTJob or RLAIFJob",
             lambda r: r.kind != JobKind.EVAL, ".kind"),
    )


class Attention(StrEnum):
    """The attention kernel a model is loaded with."""

    AUTO = "auto"
    SDPA = "sdpa"
    EAGER = "eager"
    FLASH_ATTENTION_2 = "flash-attention-2"


class ModelSpec(RuledModel):
    """Where the starting weights and tokenizer come from."""

    uri: ModelUri | None = Field(
        None,
        description="uri is the model to start from: s3://bucket/prefix (a Hugging Face folder), hf://org/name"
        "[@revision], or an absolute path in the container. Exactly one of uri and fromJob must be set.",
    )
    from_job: JobReference | None = Field(
        None,
        description="fromJob names another Dhad job in this namespace whose outputModel this job starts from; "
        "the job waits in Pending until that job has Succeeded. Exactly one of uri and fromJob must be set.",
    )
    tokenizer: ModelUri | None = Field(
        None, description="tokenizer is where to load the tokenizer from. Empty means the model's own."
    )
    dtype: DType = Field(
        DType.AUTO,
        description="dtype is the dtype the weights are stored and served in. Training with mixed precision (bf16, fp16) "
        "keeps fp32 master weights whatever this is (precision bf16-pure trains in it). Default auto (the checkpoint's).",
    )
    attention: Attention = Field(
        Attention.AUTO,
        description="attention is the kernel: auto (flash-attention-2 on GPUs with 16-bit compute when flash-attn is "
        "installed, else sdpa), sdpa, eager or flash-attention-2 (needs GPUs and the image's gpu extra; checked "
        "before the job starts). Default auto.",
    )

    rules = (
        Rule("has(self.uri) != has(self.fromJob)", "model: set exactly one of uri and fromJob",
             lambda m: (m.uri is None) != (m.from_job is None)),
    )


class Resources(RuledModel):
    """The machines one attempt runs on: `nodes` pods, each with `gpusPerNode` GPUs."""

    nodes: int = Field(1, ge=1, le=512, description="nodes is the number of pods (one per node), 1 to 512. Default 1.")
    gpus_per_node: int = Field(
        8, ge=0, le=16,
        description="gpusPerNode is the number of nvidia.com/gpu per pod, 0 to 16; 0 runs on CPU with one "
        "process per pod. Default 8.",
    )
    cpu: Quantity | None = Field(None, description="cpu is the CPU request and limit per pod, a Kubernetes quantity. Empty means none.")
    memory: Quantity | None = Field(None, description="memory is the memory request and limit per pod, a Kubernetes quantity. Empty means none.")
    shared_memory: Quantity = Field(
        "16Gi", description="sharedMemory is the size of the memory-backed /dev/shm per pod. Default 16Gi."
    )
    extra: dict[QualifiedName, Quantity] = Field(
        default_factory=dict, max_length=16,
        description="extra are further resources per pod, requested and limited alike (for example rdma/ib: 1 for "
        "InfiniBand, ephemeral-storage: 200Gi); cpu, memory and nvidia.com/gpu have their own fields. Default none.",
    )

    rules = (
        Rule(f"!has(self.extra) || self.extra.all(k, !(k in {list(OWN_RESOURCES)}))",
             "resources.extra: cpu, memory and nvidia.com/gpu are set by their own fields (cpu, memory, gpusPerNode)",
             lambda r: not set(r.extra) & set(OWN_RESOURCES), ".extra"),
        Rule(f"!has(self.extra) || self.extra.all(k, k.matches('{QUALIFIED_NAME}'))",
             "resources.extra: names must be qualified names (prefix/name), for example rdma/ib",
             lambda r: all(re.match(QUALIFIED_NAME, k) for k in r.extra), ".extra"),
    )


class Strategy(StrEnum):
    """How the model is spread over processes."""

    DDP = "ddp"
    DEEPSPEED = "deepspeed"
    FSDP = "fsdp"


class Sharding(StrEnum):
    """How FSDP shards the model: over every process, or within each node (replicated across nodes)."""

    FULL = "full"
    HYBRID = "hybrid"


class FsdpSettings(DhadModel):
    """FSDP2 (torch fully_shard through accelerate) settings."""

    sharding: Sharding = Field(
        Sharding.FULL,
        description="sharding is full (parameters, gradients and optimizer states split over every process) or hybrid "
        "(split within a node, replicated across nodes: less inter-node traffic, more memory per GPU). Default full.",
    )


class Offload(StrEnum):
    """What DeepSpeed ZeRO offloads to CPU memory."""

    NONE = "none"
    OPTIMIZER = "optimizer"
    OPTIMIZER_AND_PARAMETERS = "optimizer-and-parameters"


class Distributed(RuledModel):
    """Data and model parallelism settings."""

    strategy: Strategy = Field(
        Strategy.DDP,
        description="strategy is ddp (every process holds the whole model), deepspeed (ZeRO) or fsdp (FSDP2). Default ddp.",
    )
    zero_stage: int | None = Field(
        None, ge=1, le=3,
        description="zeroStage is the DeepSpeed ZeRO stage, 1 to 3; only with strategy deepspeed. Empty means 2.",
    )
    offload: Offload = Field(
        Offload.NONE, description="offload is what ZeRO moves to CPU memory; only with strategy deepspeed. Default none."
    )
    fsdp: FsdpSettings | None = Field(
        None, description="fsdp tunes FSDP; only with strategy fsdp. Empty means full sharding."
    )

    rules = (
        Rule("!has(self.zeroStage) || self.strategy == 'deepspeed'", "distributed.zeroStage needs strategy deepspeed",
             lambda d: d.zero_stage is None or d.strategy == Strategy.DEEPSPEED, ".zeroStage"),
        Rule("self.offload == 'none' || self.strategy == 'deepspeed'", "distributed.offload needs strategy deepspeed",
             lambda d: d.offload == Offload.NONE or d.strategy == Strategy.DEEPSPEED, ".offload"),
        Rule("self.offload != 'optimizer-and-parameters' || (has(self.zeroStage) && self.zeroStage == 3)",
             "distributed.offload optimizer-and-parameters needs zeroStage 3",
             lambda d: d.offload != Offload.OPTIMIZER_AND_PARAMETERS or d.zero_stage == 3, ".offload"),
        Rule("!has(self.fsdp) || self.strategy == 'fsdp'", "distributed.fsdp needs strategy fsdp",
             lambda d: d.fsdp is None or d.strategy == Strategy.FSDP, ".fsdp"),
    )


class ResumePolicy(StrEnum):
    """Whether a new attempt resumes from the newest complete checkpoint."""

    AUTO = "auto"
    NEVER = "never"


class Checkpointing(DhadModel):
    """When to save checkpoints, how many to keep and where to resume from."""

    interval_steps: int = Field(200, ge=1, le=10_000_000, description="intervalSteps is how often to save, in optimizer steps. Default 200.")
    keep_last: int = Field(3, ge=1, le=1000, description="keepLast is how many complete checkpoints to keep, at least 1. Default 3.")
    resume: ResumePolicy = Field(
        ResumePolicy.AUTO,
        description="resume is auto (a restarted attempt continues from this job's newest complete checkpoint) "
        "or never. Default auto.",
    )
    resume_from: S3Uri | None = Field(
        None,
        description="resumeFrom is an explicit checkpoint (s3://.../checkpoints/step-000200) to start from, "
        "for example a failed job's, when re-applying it. Empty means this job's own checkpoints only.",
    )


class PlanSettings(DhadModel):
    """The memory plan the operator checks before any pod exists (`dhad plan` prints the same)."""

    enforce: bool = Field(
        True,
        description="enforce refuses the job (Planned False, Failed) when its planned per-GPU memory exceeds the GPU's; "
        "false only reports the plan in the Planned condition. Default true.",
    )
    gpu_memory: Quantity | None = Field(
        None,
        description="gpuMemory is one GPU's memory, for example 80Gi. Empty means the nvidia.com/gpu.memory (MiB) or "
        "nvidia.com/gpu.product label of the nodes podTemplate.nodeSelector picks; unknown means not checked.",
    )


class SecretKeySelector(DhadModel):
    """A key of a Secret in the job's namespace."""

    name: DnsLabel = Field(description="name is the Secret's name. Required.")
    key: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253)] = Field(
        description="key is the key within the Secret. Required."
    )


class StorageSecret(DhadModel):
    """A Secret holding S3 credentials; its values reach only the trainer pods."""

    name: DnsLabel = Field(description="name is the Secret's name in the job's namespace. Required.")
    access_key_id_key: ShortText = Field("AWS_ACCESS_KEY_ID", description="accessKeyIdKey is the Secret key of the access key id. Default AWS_ACCESS_KEY_ID.")
    secret_access_key_key: ShortText = Field(
        "AWS_SECRET_ACCESS_KEY", description="secretAccessKeyKey is the Secret key of the secret key. Default AWS_SECRET_ACCESS_KEY."
    )


class Storage(DhadModel):
    """Where checkpoints, the final model and reports are written (any S3 API: MinIO, AWS, GCS)."""

    endpoint: Annotated[str, StringConstraints(pattern=r"^https?://[^/@\s]+/?$", max_length=253)] | None = Field(
        None, description="endpoint is the S3 API URL, http(s)://host[:port]. Empty means AWS S3 (the SDK default)."
    )
    bucket: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")] = Field(
        description="bucket is the bucket outputs are written to; it must exist. Required."
    )
    prefix: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]*$", max_length=512)] = Field(
        "dhad", description="prefix is the key prefix under the bucket; outputs go to <prefix>/<namespace>/<name>-<uid>/. Default dhad."
    )
    region: ShortText = Field("us-east-1", description="region is the S3 region. Default us-east-1.")
    secret_ref: StorageSecret | None = Field(
        None,
        description="secretRef names the Secret with the S3 credentials. Empty means the SDK's default "
        "credential chain (cloud workload identity). Credentials are never written in the spec.",
    )


class RestartPolicy(DhadModel):
    """How failed attempts are retried: the whole gang restarts and resumes from a checkpoint."""

    max_restarts: int = Field(3, ge=0, le=100, description="maxRestarts is how many failed attempts are retried; disruptions (preemption, eviction, node drain) do not count. Default 3.")
    backoff_seconds: int = Field(10, ge=0, le=3600, description="backoffSeconds is the wait before the first restart, doubled after each failure. Default 10.")
    max_backoff_seconds: int = Field(600, ge=0, le=86400, description="maxBackoffSeconds caps the wait between attempts. Default 600.")
    no_progress_attempts: int = Field(
        3, ge=1, le=100,
        description="noProgressAttempts ends the job as Failed/NoProgress after this many attempts in a row "
        "without a new checkpoint. Default 3.",
    )
    hang_timeout_seconds: int = Field(
        1800, ge=0, le=604800,
        description="hangTimeoutSeconds restarts an attempt that reported no progress for this long; 0 disables it. Default 1800.",
    )
    unschedulable_timeout_seconds: int = Field(
        600, ge=0, le=604800,
        description="unschedulableTimeoutSeconds marks the job Unschedulable (a condition, not a failure) when "
        "pods stay unschedulable this long; 0 disables it. Default 600.",
    )
    avoid_failed_nodes: bool = Field(
        False, description="avoidFailedNodes keeps the next attempt off the node where a pod failed. Default false."
    )


class SecretEnvSource(DhadModel):
    """An env value taken from a Secret key."""

    secret_key_ref: SecretKeySelector = Field(description="secretKeyRef selects the Secret key. Required.")


class EnvVar(RuledModel):
    """An environment variable for the trainer container."""

    name: Annotated[str, StringConstraints(pattern=ENV_NAME, max_length=128)] = Field(
        description="name is the variable name; names the operator sets (MASTER_ADDR, RANK, WORLD_SIZE, NNODES, AWS_* credentials and endpoint, DHAD_STAGE, DHAD_ATTEMPT, DHAD_*_API_KEY, ...) are reserved. Required."
    )
    value: Annotated[str, StringConstraints(max_length=4096)] | None = Field(None, description="value is the literal value. Exactly one of value and valueFrom.")
    value_from: SecretEnvSource | None = Field(None, description="valueFrom takes the value from a Secret key. Exactly one of value and valueFrom.")

    rules = (
        Rule(f"!(self.name in {list(RESERVED_ENV)})", "env: this name is reserved (set by the operator)",
             lambda e: e.name not in RESERVED_ENV, ".name"),
        Rule("has(self.value) != has(self.valueFrom)", "env: set exactly one of value and valueFrom",
             lambda e: (e.value is None) != (e.value_from is None)),
        Rule("!has(self.value) || !self.name.matches('(?i)(secret|password|token|api_?key)')",
             "env: a credential-like name must use valueFrom.secretKeyRef, never an inline value",
             lambda e: e.value is None or not _looks_secret(e.name), ".value"),
    )


def _looks_secret(name: str) -> bool:
    return re.search(r"(?i)(secret|password|token|api_?key)", name) is not None


class Toleration(DhadModel):
    """A Kubernetes toleration, so pods may land on tainted GPU nodes."""

    key: ShortText | None = Field(None, description="key is the taint key; empty with operator Exists matches every taint.")
    operator: Annotated[str, StringConstraints(pattern=r"^(Exists|Equal)$")] = Field("Equal", description="operator is Exists or Equal. Default Equal.")
    value: LabelValue | None = Field(None, description="value is the taint value for operator Equal.")
    effect: Annotated[str, StringConstraints(pattern=r"^(NoSchedule|PreferNoSchedule|NoExecute)?$")] | None = Field(
        None, description="effect is NoSchedule, PreferNoSchedule or NoExecute; empty matches all."
    )
    toleration_seconds: int | None = Field(None, ge=0, description="tolerationSeconds bounds how long a NoExecute taint is tolerated. Empty means forever.")


class LocalObjectReference(DhadModel):
    """An object in the job's namespace, by name."""

    name: DnsLabel = Field(description="name is the object's name in the job's namespace. Required.")


class WorkVolumeType(StrEnum):
    """What backs the trainer's scratch folder."""

    EMPTY_DIR = "emptyDir"
    EPHEMERAL = "ephemeral"
    PERSISTENT_VOLUME_CLAIM = "persistentVolumeClaim"


class WorkVolume(RuledModel):
    """The trainer's scratch space (downloaded base model, checkpoints before upload, stage outputs):
    a volume mounted at /var/lib/dhad/work, which DHAD_WORK_DIR names, never the container's writable layer."""

    type: WorkVolumeType = Field(
        WorkVolumeType.EMPTY_DIR,
        description="type is emptyDir (node-local, deleted with the pod), ephemeral (a generic ephemeral volume: a "
        "PersistentVolumeClaim per pod from storageClassName, deleted with the pod) or persistentVolumeClaim (an "
        "existing claim named by claimName, ReadWriteMany when nodes > 1; each pod uses the folder "
        "<job>-<kind code>/<node index> in it, so a restarted attempt finds what the last one downloaded). Default emptyDir.",
    )
    size: Quantity = Field(
        "100Gi", description="size is the emptyDir's sizeLimit or the ephemeral claim's storage request (unused for persistentVolumeClaim). Default 100Gi."
    )
    storage_class_name: DnsLabel | None = Field(
        None, description="storageClassName is the StorageClass of an ephemeral volume; only with type ephemeral. Empty means the cluster's default class."
    )
    claim_name: DnsLabel | None = Field(
        None, description="claimName is the existing PersistentVolumeClaim; required with type persistentVolumeClaim, and only then."
    )

    rules = (
        Rule("has(self.claimName) == (self.type == 'persistentVolumeClaim')",
             "workVolume: claimName is set exactly when type is persistentVolumeClaim",
             lambda w: (w.claim_name is not None) == (w.type == WorkVolumeType.PERSISTENT_VOLUME_CLAIM), ".claimName"),
        Rule("!has(self.storageClassName) || self.type == 'ephemeral'", "workVolume: storageClassName needs type ephemeral",
             lambda w: w.storage_class_name is None or w.type == WorkVolumeType.EPHEMERAL, ".storageClassName"),
    )


class Capabilities(DhadModel):
    """Linux capabilities added to the trainer container; every other one stays dropped."""

    add: list[Annotated[str, StringConstraints(pattern=CAPABILITY, max_length=64)]] = Field(
        default_factory=list, max_length=16,
        description="add lists capabilities to add, for example IPC_LOCK for RDMA memory registration; SYS_ADMIN and ALL "
        "count as privileged. Default none.",
    )


class SecurityContext(DhadModel):
    """Fields merged onto the restricted defaults (runAsNonRoot, no privilege escalation, all capabilities
    dropped, RuntimeDefault seccomp), which no field here can turn off."""

    capabilities: Capabilities | None = Field(None, description="capabilities adds Linux capabilities to the trainer container. Empty means none.")
    run_as_user: int | None = Field(None, ge=1, le=2147483647, description="runAsUser is the trainer's uid, never 0 (runAsNonRoot stays true). Empty means the image's user.")
    run_as_group: int | None = Field(None, ge=0, le=2147483647, description="runAsGroup is the trainer's primary gid. Empty means the image's group.")
    fs_group: int | None = Field(None, ge=0, le=2147483647, description="fsGroup is the pod's fsGroup, so volumes such as a work volume claim are writable. Empty means none.")
    read_only_root_filesystem: StrictBool | None = Field(
        None, description="readOnlyRootFilesystem makes the image read-only; /tmp and the work volume stay writable. Empty means false."
    )
    privileged: StrictBool | None = Field(
        None, description="privileged runs the container privileged; refused unless the operator's platform switch "
        "(Helm value trainer.allowPrivileged) allows it. Empty means false.",
    )

    def is_privileged(self) -> bool:
        added = {c.upper() for c in (self.capabilities.add if self.capabilities else [])}
        return bool(self.privileged) or bool(added & set(PRIVILEGED_CAPABILITIES))


class PodOverrides(RuledModel):
    """What platform teams set on every trainer pod. Affinity, volumes and volume mounts are Kubernetes
    types passed through as written and validated by the apiserver when the Job is made.
    """

    labels: dict[Annotated[str, StringConstraints(max_length=253)], LabelValue] = Field(
        default_factory=dict, max_length=64, description="labels are added to every pod. Default none."
    )
    annotations: dict[Annotated[str, StringConstraints(max_length=253)], AnnotationValue] = Field(
        default_factory=dict, max_length=64, description="annotations are added to every pod. Default none."
    )
    node_selector: dict[Annotated[str, StringConstraints(max_length=253)], LabelValue] = Field(
        default_factory=dict, max_length=32, description="nodeSelector constrains pods to matching nodes. Default none."
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="tolerations let pods onto tainted nodes. Default none.")
    affinity: dict | None = Field(None, description="affinity is a Kubernetes Affinity, passed through. Empty means none.")
    volumes: list[dict] = Field(
        default_factory=list, max_length=32,
        description="volumes are extra Kubernetes Volumes, passed through; hostPath volumes are refused unless the "
        "operator's platform switch (Helm value trainer.allowPrivileged) allows them. Default none.",
    )
    volume_mounts: list[dict] = Field(default_factory=list, max_length=32, description="volumeMounts mount extra volumes into the trainer container. Default none.")
    security_context: SecurityContext | None = Field(
        None, description="securityContext fields are merged onto the restricted defaults, never replacing them "
        "(for RDMA/InfiniBand: capabilities.add [IPC_LOCK]). Empty means the restricted defaults alone.",
    )
    host_network: StrictBool = Field(
        False, description="hostNetwork puts pods in the node's network namespace (some RDMA setups); refused unless "
        "the operator's platform switch (Helm value trainer.allowPrivileged) allows it. Default false.",
    )
    host_ipc: StrictBool = Field(
        False, alias="hostIPC", description="hostIPC puts pods in the node's IPC namespace; refused unless the operator's platform switch "
        "(Helm value trainer.allowPrivileged) allows it. Default false.",
    )
    image_pull_secrets: list[LocalObjectReference] = Field(
        default_factory=list, max_length=16, description="imagePullSecrets name Secrets in the job's namespace for pulling the trainer image. Default none."
    )
    service_account_name: DnsLabel | None = Field(
        None, description="serviceAccountName runs the trainer pods as this existing ServiceAccount (for example one "
        "bound to a cloud role); the operator binds the job's progress Role to it and makes no ServiceAccount of its "
        "own. Empty means a per-job ServiceAccount <job>-<kind code>-trainer.",
    )
    service_account_annotations: dict[QualifiedName, AnnotationValue] = Field(
        default_factory=dict, max_length=16,
        description="serviceAccountAnnotations are set on the per-job ServiceAccount, over the operator's defaults "
        "(Helm value trainer.serviceAccount.annotations), for workload identity: eks.amazonaws.com/role-arn (IRSA) or "
        "iam.gke.io/gcp-service-account (GKE). Not with serviceAccountName. Default none.",
    )
    work_volume: WorkVolume = Field(
        default_factory=WorkVolume, description="workVolume backs the trainer's scratch folder (DHAD_WORK_DIR). Default an emptyDir of 100Gi."
    )
    scheduler_name: ShortText | None = Field(None, description="schedulerName picks a scheduler (for example a gang scheduler). Empty means the default.")
    priority_class_name: ShortText | None = Field(None, description="priorityClassName sets pod priority for preemption. Empty means none.")

    rules = (
        Rule("!has(self.serviceAccountName) || !has(self.serviceAccountAnnotations) || size(self.serviceAccountAnnotations) == 0",
             "podTemplate: serviceAccountAnnotations apply to the per-job ServiceAccount; not with serviceAccountName",
             lambda p: p.service_account_name is None or not p.service_account_annotations, ".serviceAccountAnnotations"),
        Rule(f"!has(self.serviceAccountAnnotations) || self.serviceAccountAnnotations.all(k, k.matches('{QUALIFIED_NAME}'))",
             "podTemplate: serviceAccountAnnotations keys must be qualified names (prefix/name)",
             lambda p: all(re.match(QUALIFIED_NAME, k) for k in p.service_account_annotations), ".serviceAccountAnnotations"),
        Rule("!has(self.imagePullSecrets) || self.imagePullSecrets.all(x, self.imagePullSecrets.exists_one(y, y.name == x.name))",
             "podTemplate: imagePullSecrets names must be unique",
             lambda p: len({s.name for s in p.image_pull_secrets}) == len(p.image_pull_secrets), ".imagePullSecrets"),
    )

    def refused(self, allow_privileged: bool) -> list[str]:
        """Fields that need the platform's permission (privileged, host namespaces, hostPath), by path."""
        if allow_privileged:
            return []
        found = []
        if self.security_context and self.security_context.is_privileged():
            found.append("spec.podTemplate.securityContext (privileged or SYS_ADMIN)")
        for name, on in (("hostNetwork", self.host_network), ("hostIPC", self.host_ipc)):
            if on:
                found.append(f"spec.podTemplate.{name}")
        found += [f"spec.podTemplate.volumes[{i}].hostPath" for i, v in enumerate(self.volumes) if "hostPath" in v]
        return found
