"""The four job kinds: their specs (shared parts + typed stage settings) and the kind registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field, StringConstraints

from dhad_api.base import DhadModel, Rule, RuledModel
from dhad_api.common import (
    Checkpointing,
    Distributed,
    EnvVar,
    JobKind,
    ModelSpec,
    PlanSettings,
    PodOverrides,
    Resources,
    RestartPolicy,
    SecretKeySelector,
    Storage,
)
from dhad_api.data_prep import DataPrepSpec
from dhad_api.outputs import Output, Tracking
from dhad_api.stages import (
    Evaluation,
    Feedback,
    PolicyAlgorithm,
    PolicyStage,
    PretrainTraining,
    Respond,
    RewardStage,
    SFTDataset,
    SFTTraining,
    Vocabulary,
)

GROUP = "dhad.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
IMAGE = r"^[a-z0-9][a-z0-9._/:@-]*$"


class JobSpec(RuledModel):
    """The parts of every job spec."""

    model: ModelSpec = Field(description="model is where the starting weights and tokenizer come from. Required.")
    resources: Resources = Field(default_factory=Resources, description="resources is nodes x GPUs per attempt. Default 1 node x 8 GPUs.")
    distributed: Distributed = Field(default_factory=Distributed, description="distributed is the parallelism strategy. Default ddp.")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing, description="checkpoint is when to save and how to resume. Default every 200 steps, keep 3.")
    storage: Storage = Field(description="storage is where checkpoints, the model and reports go. Required.")
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy, description="restartPolicy bounds gang restarts. Default 3 restarts, 10 s backoff doubling.")
    suspend: bool = Field(False, description="suspend stops the running pods and keeps checkpoints; false again resumes. The only field that may change after creation. Default false.")
    queue_name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63)] | None = Field(
        None, description="queueName is an alias of the job label kueue.x-k8s.io/queue-name (the documented way, which wins when both are set): the Kueue LocalQueue the sub-stages' Jobs are queued in, created suspended. Empty means the label, else no queueing."
    )
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=31_536_000,
        description="ttlSecondsAfterFinished deletes the children (pods, Jobs, ConfigMaps, ServiceAccount, RBAC) this long after the job finished; the job object stays, so GitOps does not recreate it. Empty means never.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=31_536_000,
        description="activeDeadlineSeconds fails the job this long after its first attempt started, counted over all attempts. Empty means no deadline.",
    )
    image: Annotated[str, StringConstraints(pattern=IMAGE, max_length=512)] | None = Field(None, description="image is the trainer image. Empty means the operator's default.")
    env: list[EnvVar] = Field(default_factory=list, max_length=64, description="env is extra environment for the trainer. Default none.")
    pod_template: PodOverrides = Field(default_factory=PodOverrides, description="podTemplate holds pod overrides for platform teams. Default none.")
    tracking: Tracking = Field(default_factory=Tracking, description="tracking adds MLflow or Weights & Biases to the TensorBoard event files every training sub-stage writes under the job's S3 root. Default TensorBoard only.")
    output: Output = Field(default_factory=Output, description="output sets the final model card's license and an optional Hugging Face Hub push. Default no push.")
    hf_token_secret_ref: SecretKeySelector | None = Field(
        None,
        description="hfTokenSecretRef is the Secret key holding a Hugging Face token, for gated or private hf:// models and "
        "datasets (the pods get it as HF_TOKEN; access is checked before the first sub-stage). Empty means anonymous.",
    )
    plan: PlanSettings = Field(
        default_factory=PlanSettings,
        description="plan is the per-GPU memory check made before any pod exists. Default enforced, GPU memory from node labels.",
    )

    rules = (
        Rule("self.env.all(x, self.env.exists_one(y, y.name == x.name))", "env: names must be unique",
             lambda s: len({e.name for e in s.env}) == len(s.env), ".env"),
    )


class PretrainJobSpec(JobSpec):
    """Continued pre-training on Arabic text (AceGPT step 1): a prepare sub-stage, then training."""

    data: DataPrepSpec = Field(description="data is the corpus and how to clean, dedup, decontaminate, pack and mix it; the prepare sub-stage does this once per distinct input and tokenizer, and training reads the result. Required.")
    prepare_only: bool = Field(False, description="prepareOnly runs only the prepare sub-stage: the prepared shards and stats land in S3, where later jobs with the same inputs, tokenizer and data settings reuse them, and no model is trained. Default false.")
    vocabulary: Vocabulary = Field(default_factory=Vocabulary, description="vocabulary optionally adds Arabic tokens first. Default none added.")
    training: PretrainTraining = Field(default_factory=lambda: PretrainTraining(learning_rate=1e-4), description="training is the optimisation. Default learningRate 1e-4.")

    rules = JobSpec.rules + (
        Rule("self.vocabulary.warmupSteps == 0 || self.distributed.strategy == 'ddp'",
             "vocabulary.warmupSteps needs distributed.strategy ddp (the embeddings-only phase is a separate DDP run)",
             lambda s: s.vocabulary.warmup_steps == 0 or s.distributed.strategy.value == "ddp", ".vocabulary.warmupSteps"),
        Rule("self.vocabulary.warmupSteps == 0 || self.vocabulary.newTokens > 0",
             "vocabulary.warmupSteps needs vocabulary.newTokens (it warms up the new embedding rows)",
             lambda s: s.vocabulary.warmup_steps == 0 or s.vocabulary.new_tokens > 0, ".vocabulary.warmupSteps"),
    )


class SFTJobSpec(JobSpec):
    """Supervised fine-tuning on native Arabic instructions (AceGPT step 2)."""

    data: list[SFTDataset] = Field(
        default_factory=list, max_length=32,
        description="data lists the instruction datasets, mixed by weight; the respond sub-stage's output is added to them. Required unless respond is set.",
    )
    respond: Respond | None = Field(None, description="respond first has a teacher answer native Arabic prompts (its own sub-stage) and trains on the result. Empty means train on data only.")
    training: SFTTraining = Field(default_factory=SFTTraining, description="training is the SFT settings. Default SFTTraining's defaults.")


    rules = JobSpec.rules + (
        Rule("size(self.data) > 0 || has(self.respond)", "data: list at least one dataset, or set respond",
             lambda s: bool(s.data) or s.respond is not None, ".data"),
    )


class RLAIFJobSpec(JobSpec):
    """Reinforcement learning from AI feedback (AceGPT step 3): feedback -> reward -> policy."""

    feedback: Feedback = Field(description="feedback samples responses and has the judge compare them. Required.")
    reward: RewardStage = Field(default_factory=RewardStage, description="reward trains the reward model on the judged pairs. Default RewardStage's defaults.")
    policy: PolicyStage = Field(default_factory=PolicyStage, description="policy optimises the model against the reward model. Default grpo.")

    rules = JobSpec.rules + (
        Rule("self.policy.algorithm == 'dpo' || self.policy.algorithm == 'ppo' || (self.policy.training.microBatchSize * self.policy.training.gradientAccumulationSteps"
             " * self.resources.nodes * (self.resources.gpusPerNode > 0 ? self.resources.gpusPerNode : 1))"
             " % self.policy.generationsPerPrompt == 0",
             "policy: the generation batch (microBatchSize x gradientAccumulationSteps x processes) must be divisible by generationsPerPrompt",
             lambda s: s.policy.algorithm in (PolicyAlgorithm.DPO, PolicyAlgorithm.PPO) or (
                 s.policy.training.micro_batch_size * s.policy.training.gradient_accumulation_steps
                 * s.resources.nodes * max(s.resources.gpus_per_node, 1)) % s.policy.generations_per_prompt == 0,
             ".policy.generationsPerPrompt"),
    )


class EvalJobSpec(JobSpec):
    """Evaluation on the Arabic benchmarks."""

    evaluation: Evaluation = Field(description="evaluation picks suites and scoring. Required.")

    rules = JobSpec.rules + (
        Rule("!has(self.output) || !has(self.output.hub)", "output.hub: an EvalJob has no model to push; its scores go into the evaluated model's card beside the report",
             lambda s: s.output.hub is None, ".output.hub"),
    )


class ObjectMeta(DhadModel):
    """The metadata fields the trainer reads (the rest is the apiserver's)."""

    model_config = DhadModel.model_config | {"extra": "ignore"}
    name: str = ""
    namespace: str = "default"
    uid: str = ""


@dataclass(frozen=True)
class KindInfo:
    kind: JobKind
    plural: str
    short_names: tuple[str, ...]
    spec: type[JobSpec]
    code: str  # short code in child names: <name>-<code>
    stages: tuple[str, ...]  # sub-stages, each its own Job, in order


KINDS: dict[JobKind, KindInfo] = {
    JobKind.PRETRAIN: KindInfo(JobKind.PRETRAIN, "pretrainjobs", ("ptj",), PretrainJobSpec, "pt", ("prepare", "pretrain")),
    JobKind.SFT: KindInfo(JobKind.SFT, "sftjobs", ("sftj",), SFTJobSpec, "sft", ("respond", "sft")),
    JobKind.RLAIF: KindInfo(JobKind.RLAIF, "rlaifjobs", ("rlj",), RLAIFJobSpec, "rl", ("feedback", "reward", "policy")),
    JobKind.EVAL: KindInfo(JobKind.EVAL, "evaljobs", ("evj",), EvalJobSpec, "ev", ("eval",)),
}


class Resolved(DhadModel):
    """What the operator resolved before starting the job (fromJob references, output location)."""

    model_uri: str | None = Field(None, description="modelUri is spec.model.uri, or the referenced job's outputModel.")
    judge_model_uri: str | None = Field(None, description="judgeModelUri is the judge's model after fromJob.")
    reward_model_uri: str | None = Field(None, description="rewardModelUri is policy.rewardModel after fromJob.")
    teacher_model_uri: str | None = Field(None, description="teacherModelUri is respond.teacher.model after fromJob.")
    compare_model_uris: dict[str, str] = Field(default_factory=dict, description="compareModelUris are evaluation.compare's models after fromJob, by name.")
    output_root: str | None = Field(None, description="outputRoot is s3://bucket/prefix/namespace/name-uid.")


class Job(DhadModel):
    """A whole job object as the trainer receives it in /etc/dhad/job.json (the operator's ConfigMap)."""

    model_config = DhadModel.model_config | {"extra": "ignore"}
    api_version: str = API_VERSION
    kind: JobKind
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: dict
    resolved: Resolved = Field(default_factory=Resolved)

    def typed_spec(self) -> JobSpec:
        return KINDS[self.kind].spec.model_validate(self.spec)


def stages_for(kind: JobKind | str, spec: JobSpec) -> list[str]:
    """The sub-stages this job runs, in order (SFT's respond only when spec.respond is set)."""
    stages = list(KINDS[JobKind(kind)].stages)
    if isinstance(spec, SFTJobSpec) and spec.respond is None:
        stages.remove("respond")
    if isinstance(spec, PretrainJobSpec) and spec.prepare_only:
        stages.remove("pretrain")
    return stages


@dataclass(frozen=True)
class StagePods:
    """What one sub-stage's Indexed Job asks for: the renderer, the launcher and local mode all read it."""

    pods: int           # pods in the sub-stage's Indexed Job
    procs_per_pod: int  # torchrun --nproc-per-node (GPUs per pod, 1 on CPU)
    gpus_per_pod: int   # nvidia.com/gpu requested per pod
    gang: bool          # True: one failed pod ends the attempt; False: a failed index is retried alone


def stage_pods(kind, spec, stage: str) -> StagePods:
    """The training gang (resources.nodes x gpusPerNode) for every sub-stage but two: SFT's respond, which only
    rank 0 runs (one pod with one process, one GPU for a local teacher, none for an endpoint teacher), and
    PretrainJob's prepare, `data.workers` CPU pods each retried alone (their shares are independent)."""
    gpus = spec.resources.gpus_per_node
    if stage == "prepare" and isinstance(spec, PretrainJobSpec):
        return StagePods(pods=spec.data.workers, procs_per_pod=1, gpus_per_pod=0, gang=False)
    if stage == "respond" and isinstance(spec, SFTJobSpec) and spec.respond is not None:
        teacher = spec.respond.teacher
        if teacher.endpoint is not None:
            return StagePods(pods=1, procs_per_pod=1, gpus_per_pod=0, gang=True)
        return StagePods(pods=1, procs_per_pod=1, gpus_per_pod=min(gpus, 1), gang=True)
    return StagePods(pods=spec.resources.nodes, procs_per_pod=max(gpus, 1), gpus_per_pod=gpus, gang=True)


OUTPUT_STAGE = {"pretrain": "pretrain", "sft": "sft", "policy": "policy"}  # sub-stages that write the job's model


def parse_spec(kind: JobKind | str, spec: dict) -> JobSpec:
    """Validates a spec dict (camelCase, as stored by the apiserver) into the kind's typed model."""
    return KINDS[JobKind(kind)].spec.model_validate(spec)


__all__ = ["DhadModel", "JobSpec", "PretrainJobSpec", "SFTJobSpec", "RLAIFJobSpec", "EvalJobSpec", "KINDS", "parse_spec"]
