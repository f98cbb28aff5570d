"""The memory and time plan of a job: per-GPU bytes of every sub-stage before any pod exists.

Pure (no torch): the operator imports it to set the `Planned` condition and refuse a job that cannot fit,
`dhad plan` prints it, and the launcher's pre-flight reuses its checkpoint sizes. What it counts, per GPU:

- model states under the strategy, for P trainable and F frozen (LoRA base) parameters, N processes:
  ddp (mixed precision): fp32 weights 4P, fp32 gradients 4P, DDP's gradient buckets 4P (N > 1), AdamW
  moments 8P, the bf16 copies autocast caches 2(P+F); bf16-pure halves each; fp32 has no copies.
  ZeRO-1/2 (DeepSpeed's own breakdown, `estimate_zero2_model_states_mem_needs`): 16-bit weights 2P, and
  18P/N partitioned (16- and 32-bit gradients 6, fp32 master 4, moments 8); optimizer offload keeps 2P.
  ZeRO-3 (`estimate_zero3_model_states_mem_needs`): 18P/N (16-bit weights 2 + 16) plus the gathered
  working set, 4 bytes x the largest layer; offload moves the 16 (and the 2) to CPU memory.
  fsdp (FSDP2, mixed): fp32 sharded weights 4P/S, gradients 4P/S, moments 8P/S over the shard group S
  (every process, or a node's for hybrid), plus the unsharded working set: bf16 weights of the unit in
  use and the prefetched one, and the unit's bf16 gradients, 6 bytes x the largest unit.
- activations at the micro-batch and sequence length (Llama blocks: RMSNorm, RoPE, sdpa/flash, SwiGLU),
  by the tensors autograd saves per token and layer (see `saved_bytes_per_token`); with gradient
  checkpointing the saved layer inputs plus one layer recomputed; and the logits with their fp32 loss copies.
- the vLLM reservation (TRL's colocated engine takes `VLLM_MEMORY_FRACTION` of each GPU) and RLAIF's
  extra models: the frozen reference and the reward model beside the policy (none with policy LoRA: the
  adapters-off policy is the reference, and for ppo the adapters-off critic the reward model), ppo's
  critic trained beside the policy, a local judge beside the sampling policy in feedback, a local teacher
  in respond.
- a runtime reserve (CUDA context, NCCL buffers, allocator slack).

Tokens per optimizer step = micro-batch x accumulation x processes x sequence length; time per step =
tokens x (6 x parameters + 12 x layers x hidden x sequence) / (processes x GPU bf16 peak x MFU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from dhad_api.common import DType, JobKind, ModelSpec, Offload, Sharding, Strategy
from dhad_api.jobs import (
    EvalJobSpec,
    JobSpec,
    PretrainJobSpec,
    RLAIFJobSpec,
    SFTJobSpec,
    stage_pods,
    stages_for,
)
from dhad_api.reasons import Reason
from dhad_api.stages import PolicyAlgorithm
from dhad_api.training import Optimization, Precision

GiB = 1024**3
MiB = 1024**2
VLLM_MEMORY_FRACTION = 0.3  # TRL's vllm_gpu_memory_utilization default for colocated vLLM
PROMPT_TOKENS = 1024  # prompt budget assumed for sampling stages (feedback, policy rollouts, respond)
DEFAULT_MFU = 0.4
RUNTIME_RESERVE = 2 * GiB  # CUDA context, cuBLAS workspace, NCCL buffers
ALLOCATOR_SLACK = 0.05  # fragmentation of PyTorch's caching allocator, as a share of the rest
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"  # MiB, set by NVIDIA GPU feature discovery
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"


@dataclass(frozen=True)
class Architecture:
    """A Llama-style decoder: what memory and FLOPs depend on."""

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        h, kv = self.hidden_size, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.attention_bias else 0)
        return attention + 3 * h * self.intermediate_size + 2 * h

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def parameters(self) -> int:
        head = 0 if self.tie_embeddings else self.embedding_parameters
        return self.embedding_parameters + head + self.num_layers * self.layer_parameters + self.hidden_size

    @property
    def largest_layer(self) -> int:
        """The largest single module's own parameters (DeepSpeed's `largest_layer_params`)."""
        return max(self.embedding_parameters, self.hidden_size * self.intermediate_size)

    @property
    def largest_unit(self) -> int:
        """The largest FSDP unit: a decoder layer, the embedding, or the tail (norm + lm_head)."""
        return max(self.layer_parameters, self.embedding_parameters + self.hidden_size)

    def with_vocabulary(self, added: int) -> Architecture:
        return replace(self, vocab_size=self.vocab_size + added) if added else self

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> Architecture:
        """From a Hugging Face config.json (Llama, Mistral, Qwen2 and alike)."""
        heads = int(config["num_attention_heads"])
        return cls(name=name, vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
                   intermediate_size=int(config["intermediate_size"]), num_layers=int(config["num_hidden_layers"]),
                   num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
                   max_positions=int(config.get("max_position_embeddings") or 4096),
                   tie_embeddings=bool(config.get("tie_word_embeddings", False)),
                   attention_bias=bool(config.get("attention_bias", False)) or config.get("model_type") == "qwen2")


def _llama(name: str, v: int, h: int, i: int, layers: int, heads: int, kv: int, positions: int) -> Architecture:
    return Architecture(name, v, h, i, layers, heads, kv, positions)


# Architectures of the models the AceGPT recipe starts from, by Hugging Face id (lowercase, no revision).
KNOWN_ARCHITECTURES: dict[str, Architecture] = {
    "meta-llama/llama-2-7b-hf": _llama("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 4096),
    "meta-llama/llama-2-7b-chat-hf": _llama("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32, 4096),
    "meta-llama/llama-2-13b-hf": _llama("Llama-2-13B", 32000, 5120, 13824, 40, 40, 40, 4096),
    "meta-llama/llama-2-13b-chat-hf": _llama("Llama-2-13B", 32000, 5120, 13824, 40, 40, 40, 4096),
    "meta-llama/llama-2-70b-hf": _llama("Llama-2-70B", 32000, 8192, 28672, 80, 64, 8, 4096),
    "freedomintelligence/acegpt-7b": _llama("AceGPT-7B", 32000, 4096, 11008, 32, 32, 32, 4096),
    "freedomintelligence/acegpt-13b": _llama("AceGPT-13B", 32000, 5120, 13824, 40, 40, 40, 4096),
    "meta-llama/meta-llama-3-8b": _llama("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 8192),
    "meta-llama/llama-3.1-8b": _llama("Llama-3.1-8B", 128256, 4096, 14336, 32, 32, 8, 131072),
}


def known_architecture(uri: str | None) -> Architecture | None:
    if not uri or not uri.startswith("hf://"):
        return None
    return KNOWN_ARCHITECTURES.get(uri.removeprefix("hf://").split("@", 1)[0].lower())


@dataclass(frozen=True)
class Gpu:
    """One GPU: its memory and dense bf16 tensor peak (for the time estimate)."""

    name: str
    memory: int
    bf16_flops: float | None = None


# nvidia.com/gpu.product label values -> (memory MiB as nvidia.com/gpu.memory reports it, dense bf16 FLOP/s)
GPU_PRODUCTS: dict[str, tuple[int, float]] = {
    "NVIDIA-H100-80GB-HBM3": (81559, 989e12),
    "NVIDIA-H100-PCIe": (81559, 756e12),
    "NVIDIA-H100-NVL": (95830, 835e12),
    "NVIDIA-H200": (143771, 989e12),
    "NVIDIA-A100-SXM4-80GB": (81920, 312e12),
    "NVIDIA-A100-80GB-PCIe": (81920, 312e12),
    "NVIDIA-A100-SXM4-40GB": (40960, 312e12),
    "NVIDIA-L40S": (46068, 362e12),
    "NVIDIA-L4": (23034, 121e12),
}


def gpu_for_product(product: str | None) -> Gpu | None:
    if not product:
        return None
    for name, (mib, flops) in GPU_PRODUCTS.items():
        if product == name or product.startswith(name + "-") or product.replace(" ", "-") == name:
            return Gpu(name, mib * MiB, flops)
    return None


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}


def parse_quantity(text: str) -> int:
    """A Kubernetes memory quantity ("80Gi", "81559Mi", "80G") in bytes."""
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)(k|Ki|M|Mi|G|Gi|T|Ti|P|Pi)?", text.strip())
    if not m:
        raise ValueError(f"not a memory quantity: {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def gpu_from_labels(labels: dict[str, str]) -> Gpu | None:
    """A node's GPU from GPU feature discovery's labels (memory label first, product table second)."""
    product = gpu_for_product(labels.get(GPU_PRODUCT_LABEL))
    memory = labels.get(GPU_MEMORY_LABEL)
    if memory and memory.isdigit():
        return Gpu(labels.get(GPU_PRODUCT_LABEL) or "GPU", int(memory) * MiB, product.bf16_flops if product else None)
    return product


def job_gpu(spec: JobSpec, nodes: list[dict[str, str]] = ()) -> Gpu | None:
    """The GPU a job's pods get: plan.gpuMemory, else the smallest GPU among the nodes (label dicts) its
    nodeSelector matches, else the product its nodeSelector names."""
    selector = spec.pod_template.node_selector
    product = gpu_for_product(selector.get(GPU_PRODUCT_LABEL))
    if spec.plan.gpu_memory:
        return Gpu(product.name if product else "GPU", parse_quantity(spec.plan.gpu_memory), product.bf16_flops if product else None)
    matching = [gpu_from_labels(labels) for labels in nodes if all(labels.get(k) == v for k, v in selector.items())]
    matching = [g for g in matching if g is not None]
    if matching:
        return min(matching, key=lambda g: g.memory)
    return product


# ---------------------------------------------------------------------------------------------- memory


@dataclass
class StagePlan:
    """One sub-stage's per-GPU memory (bytes by component), throughput figures and notes."""

    stage: str
    strategy: str
    processes: int
    components: list[tuple[str, int]] = field(default_factory=list)
    cpu_per_node: int = 0
    tokens_per_step: int | None = None
    step_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.components)

    def add(self, name: str, value: float) -> None:
        if value:
            self.components.append((name, int(value)))


@dataclass
class JobPlan:
    kind: str
    architecture: Architecture
    gpu: Gpu | None
    stages: list[StagePlan]
    mfu: float

    @property
    def peak(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.peak.total <= self.gpu.memory


def _precision(opt: Optimization, gpus: int) -> Precision:
    if opt.precision == Precision.AUTO:
        return Precision.BF16 if gpus else Precision.FP32
    return opt.precision


def _bytes(dtype: DType, default: int = 2) -> int:
    return {DType.FLOAT32: 4, DType.BFLOAT16: 2, DType.FLOAT16: 2}.get(dtype, default)


def lora_parameters(arch: Architecture, r: int, targets: list[str]) -> int:
    """Trainable parameters of LoRA adapters of rank r on the named Llama projections."""
    h, i, kv = arch.hidden_size, arch.intermediate_size, arch.kv_dim
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return arch.num_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def saved_bytes_per_token(arch: Architecture, residual: int, compute: int, eager: bool = False, seq: int = 0) -> int:
    """Bytes autograd keeps per token for one decoder layer's backward (counted tensor by tensor on a tiny
    Llama with saved-tensor hooks, tests/unit/test_plan.py, and written out here):

    RMSNorm (two per layer) keeps its fp32 input (it upcasts) and the fp32 normalised x when the residual
    stream is fp32, or its 16-bit cast when it is 16-bit, plus its output for the linear layers that read
    it: once in fp32 or 16-bit runs, but once per linear under autocast (q, k, v and gate, up each keep
    their own bf16 cast). sdpa/flash keep q, k, v, the output and the log-sum-exp (o_proj reads the output
    in place); eager attention also keeps the softmax (heads x seq per token). SwiGLU keeps gate, SiLU(gate),
    up and their product: 4 x intermediate. RoPE keeps only cos/sin (constants).
    """
    h, kv, i = arch.hidden_size, arch.kv_dim, arch.intermediate_size
    autocast = residual == 4 and compute == 2

    def norm(linears: int) -> int:
        kept = 4 * h + residual * h  # fp32 input, normalised x (fp32, or its 16-bit cast)
        return kept + (linears * compute * h if autocast else residual * h)

    attention = compute * (2 * h + 2 * kv) + 4 * arch.num_heads + (compute * arch.num_heads * seq if eager else 0)
    return norm(3) + norm(2) + attention + 4 * compute * i


def stream_bytes(precision: Precision, strategy: Strategy) -> tuple[int, int]:
    """(residual stream, compute) bytes: fp32 master weights under autocast (ddp) keep the residual stream
    in fp32; DeepSpeed, FSDP2 (MixedPrecisionPolicy casts parameters, not activations) and bf16-pure run
    the blocks in 16 bits; fp32 is fp32 throughout."""
    if precision == Precision.FP32:
        return 4, 4
    if strategy == Strategy.DDP and precision in (Precision.BF16, Precision.FP16):
        return 4, 2
    return 2, 2


def activation_components(plan: StagePlan, arch: Architecture, micro: int, seq: int, precision: Precision,
                          strategy: Strategy, checkpointing: bool, eager: bool = False, batch_factor: int = 1) -> None:
    """Activations and logits of one micro-batch (batch_factor 2 for chosen+rejected pairs)."""
    tokens = micro * seq * batch_factor
    residual, compute = stream_bytes(precision, strategy)
    layer = saved_bytes_per_token(arch, residual, compute, eager, seq)
    if checkpointing:
        plan.add("activations (checkpointed layer inputs)", tokens * residual * arch.hidden_size * arch.num_layers)
        plan.add("activations (one layer recomputed)", tokens * layer)
    else:
        plan.add("activations", tokens * layer * arch.num_layers)
    # around the loss: the logits, their fp32 copy and log-softmax (then its gradient), and the final norm
    plan.add("logits and loss (fp32 copies)", tokens * (arch.vocab_size * (compute + 8) + 4 * arch.hidden_size + 2 * residual * arch.hidden_size))


def state_components(plan: StagePlan, arch: Architecture, trainable: int, frozen: int, precision: Precision,
                     strategy: Strategy, zero_stage: int, offload: Offload, world: int, shard_group: int,
                     procs_per_node: int) -> None:
    """Weights, gradients and optimizer states per GPU under the strategy (see the module docstring)."""
    p, f = trainable, frozen
    if strategy == Strategy.DEEPSPEED:
        full16 = 2 if precision != Precision.FP32 else 4
        if zero_stage == 3:
            if offload == Offload.OPTIMIZER_AND_PARAMETERS:
                plan.add("gathered parameters (largest layer)", 4 * arch.largest_layer)
                plan.cpu_per_node = int((p + f) * 18 / max(1, world // procs_per_node) * 1.5)
                return
            plan.add("16-bit weights (partitioned)", 2 * (p + f) / world)
            plan.add("gathered parameters (largest layer)", 4 * arch.largest_layer)
            if offload == Offload.OPTIMIZER:
                plan.cpu_per_node = int(p * 16 / max(1, world // procs_per_node) * 1.5)
                return
            plan.add("gradients, fp32 master weights, optimizer states (partitioned)", 16 * p / world)
            return
        plan.add("16-bit weights", full16 * (p + f))
        if offload == Offload.OPTIMIZER:
            plan.cpu_per_node = int(p * max(4 * world, 16) * 1.5)
            return
        plan.add("gradients (partitioned, 16- and 32-bit)", 6 * p / world)
        plan.add("fp32 master weights (partitioned)", 4 * p / world)
        plan.add("optimizer states (partitioned)", 8 * p / world)
        return
    w = 2 if precision == Precision.BF16_PURE else 4
    if strategy == Strategy.FSDP:
        s = shard_group
        plan.add("weights (sharded)", w * (p + f) / s)
        plan.add("gradients (sharded)", w * p / s)
        plan.add("optimizer states (sharded)", 2 * w * p / s)
        gathered = 2 if precision != Precision.FP32 else 4
        plan.add("gathered units (in use + prefetched, gradients)", 3 * gathered * arch.largest_unit)
        return
    plan.add("weights", w * (p + f))
    plan.add("gradients", w * p)
    if world > 1:
        plan.add("DDP gradient buckets", w * p)
    plan.add("optimizer states", 2 * w * p)
    if precision in (Precision.BF16, Precision.FP16):
        plan.add("16-bit weight copies (autocast cache)", 2 * (p + f))


def inference_components(plan: StagePlan, name: str, arch: Architecture, dtype_bytes: int, batch: int, tokens: int,
                         sharded_over: int = 1) -> None:
    plan.add(f"{name} weights", dtype_bytes * arch.parameters / sharded_over)
    if batch:
        plan.add(f"{name} KV cache", batch * tokens * 2 * arch.num_layers * arch.kv_dim * dtype_bytes)


def _time(plan: StagePlan, arch: Architecture, opt: Optimization, world: int, seq: int, gpu: Gpu | None, mfu: float) -> None:
    plan.tokens_per_step = opt.micro_batch_size * opt.gradient_accumulation_steps * world * seq
    if gpu is not None and gpu.bf16_flops:
        flops = plan.tokens_per_step * (6 * arch.parameters + 12 * arch.num_layers * arch.hidden_size * seq)
        plan.step_seconds = flops / (world * gpu.bf16_flops * mfu)


def training_plan(stage: str, spec: JobSpec, arch: Architecture, opt: Optimization, seq: int, gpu: Gpu | None,
                  mfu: float, *, trainable: int | None = None, batch_factor: int = 1, label: str | None = None) -> StagePlan:
    pods = stage_pods(None, spec, stage)
    world = pods.pods * pods.procs_per_pod
    d = spec.distributed
    precision = _precision(opt, pods.gpus_per_pod)
    strategy_label = {Strategy.DDP: "ddp", Strategy.FSDP: f"fsdp ({(d.fsdp.sharding if d.fsdp else Sharding.FULL).value})",
                      Strategy.DEEPSPEED: f"ZeRO-{d.zero_stage or 2}" + ("" if d.offload == Offload.NONE else f" offload {d.offload.value}")}[d.strategy]
    plan = StagePlan(stage=label or stage, strategy=f"{strategy_label}, {precision.value}", processes=world)
    total = arch.parameters
    trainable = total if trainable is None else trainable
    hybrid = d.strategy == Strategy.FSDP and d.fsdp is not None and d.fsdp.sharding == Sharding.HYBRID and pods.pods > 1
    shard_group = pods.procs_per_pod if hybrid else world
    state_components(plan, arch, trainable, total - trainable, precision, d.strategy, d.zero_stage or 2, d.offload,
                     world, shard_group, pods.procs_per_pod)
    eager = spec.model.attention.value == "eager"
    activation_components(plan, arch, opt.micro_batch_size, seq, precision, d.strategy, opt.gradient_checkpointing,
                          eager, batch_factor)
    _time(plan, arch, opt, world, seq, gpu, mfu)
    return plan


def _finish(plan: StagePlan) -> StagePlan:
    plan.add("runtime reserve (CUDA context, NCCL, allocator slack)", RUNTIME_RESERVE + ALLOCATOR_SLACK * plan.total)
    return plan


def _sharded_extra(spec: JobSpec, world: int) -> int:
    """Frozen extra models are partitioned like the policy under ZeRO-3 and FSDP (TRL prepares them so)."""
    d = spec.distributed
    return world if (d.strategy == Strategy.FSDP or (d.strategy == Strategy.DEEPSPEED and d.zero_stage == 3)) else 1


def plan_job(kind: JobKind | str, spec: JobSpec, arch: Architecture, gpu: Gpu | None = None, mfu: float = DEFAULT_MFU,
             others: dict[str, Architecture | None] | None = None) -> JobPlan:
    """Every sub-stage's plan; `others` holds the architectures of the judge and teacher models, by role."""
    kind = JobKind(kind)
    others = others or {}
    load = _bytes(spec.model.dtype)
    plans: list[StagePlan] = []
    for stage in stages_for(kind, spec):
        pods = stage_pods(kind, spec, stage)
        world = pods.pods * pods.procs_per_pod
        if not pods.gpus_per_pod and stage == "prepare":
            continue  # data preparation runs on CPU workers and loads no model
        if isinstance(spec, PretrainJobSpec):
            seq = spec.data.packing.sequence_length
            plans.append(training_plan(stage, spec, arch.with_vocabulary(spec.vocabulary.new_tokens), spec.training, seq, gpu, mfu))
        elif isinstance(spec, SFTJobSpec) and stage == "sft":
            t = spec.training
            trainable = lora_parameters(arch, t.lora.r, t.lora.target_modules) if t.lora else None
            plans.append(training_plan(stage, spec, arch, t, t.sequence_length, gpu, mfu, trainable=trainable))
        elif isinstance(spec, SFTJobSpec) and stage == "respond":
            plan = StagePlan(stage, "one process", 1)
            teacher = spec.respond.teacher
            if teacher.model is not None:
                t_arch = others.get("teacher") or arch
                g = spec.respond.generation
                if teacher.use_vllm and gpu is not None:
                    plan.add("vLLM engine (weights + KV cache)", 0.9 * gpu.memory)
                else:
                    inference_components(plan, "teacher", t_arch, _bytes(teacher.model.dtype), 8 * spec.respond.responses_per_prompt,
                                         PROMPT_TOKENS + g.max_new_tokens)
            else:
                plan.notes.append("endpoint teacher: no GPU")
            plans.append(plan)
        elif isinstance(spec, RLAIFJobSpec) and stage == "feedback":
            plan = StagePlan(stage, "sampling, one model per process", world)
            inference_components(plan, "policy", arch, load, 8 * spec.feedback.samples_per_prompt,
                                 PROMPT_TOKENS + spec.feedback.generation.max_new_tokens)
            judge = spec.feedback.judge.model
            if judge is not None:
                inference_components(plan, "judge", others.get("judge") or arch, _bytes(judge.dtype), 8,
                                     PROMPT_TOKENS + spec.feedback.judge.max_new_tokens)
            plans.append(plan)
        elif isinstance(spec, RLAIFJobSpec) and stage == "reward":
            rs = spec.reward
            reward_arch = replace(arch, tie_embeddings=True)  # the score head replaces lm_head
            plans.append(training_plan(stage, spec, reward_arch, rs.training, rs.sequence_length, gpu, mfu, batch_factor=2))
        elif isinstance(spec, RLAIFJobSpec) and stage == "policy":
            pol = spec.policy
            seq = PROMPT_TOKENS + pol.generation.max_new_tokens
            ppo = pol.algorithm == PolicyAlgorithm.PPO
            # DPO's pairs and PPO's critic (a second model on the same mini-batch) double the activations
            batch = 2 if pol.algorithm == PolicyAlgorithm.DPO or ppo else 1
            trainable = lora_parameters(arch, pol.lora.r, pol.lora.target_modules) if pol.lora else None
            plan = training_plan(stage, spec, arch, pol.training, seq, gpu, mfu, batch_factor=batch,
                                 trainable=trainable, label=f"policy ({pol.algorithm.value})")
            split = _sharded_extra(spec, world)
            reward_arch = replace(arch, tie_embeddings=True)
            if ppo:  # the critic, initialised from the reward model, trains beside the policy in one engine
                critic = StagePlan("critic", plan.strategy, world)
                state_components(critic, reward_arch, trainable or reward_arch.parameters,
                                 reward_arch.parameters - trainable if trainable else 0, _precision(pol.training, pods.gpus_per_pod),
                                 spec.distributed.strategy, spec.distributed.zero_stage or 2, spec.distributed.offload,
                                 world, world, pods.procs_per_pod)
                for name, value in critic.components:
                    plan.add(f"critic {name}", value)
            # With LoRA the reference is the policy with its adapters off (and ppo's reward model the critic's)
            if (pol.kl_coefficient > 0 or pol.algorithm == PolicyAlgorithm.DPO) and not pol.lora:
                inference_components(plan, "reference model", arch, load, 0, 0, split)
            if pol.algorithm != PolicyAlgorithm.DPO and not (ppo and pol.lora):
                inference_components(plan, "reward model", reward_arch, load, 0, 0, split)
            if pol.use_vllm:
                if gpu is not None:
                    plan.add(f"vLLM colocated engine ({VLLM_MEMORY_FRACTION:.0%} of the GPU)", VLLM_MEMORY_FRACTION * gpu.memory)
                    if 2 * arch.parameters > VLLM_MEMORY_FRACTION * gpu.memory:
                        plan.notes.append("vLLM's share cannot hold the policy's bf16 weights")
                        plan.add("vLLM shortfall (weights beyond its share)", 2 * arch.parameters - VLLM_MEMORY_FRACTION * gpu.memory)
                else:
                    plan.notes.append(f"vLLM takes {VLLM_MEMORY_FRACTION:.0%} of each GPU (GPU memory unknown)")
            else:
                plan.add("rollout KV cache", pol.training.micro_batch_size * seq * 2 * arch.num_layers * arch.kv_dim * load)
            plans.append(plan)
        elif isinstance(spec, EvalJobSpec):
            plan = StagePlan(stage, "inference, one process", world)
            inference_components(plan, "model", arch, load, spec.evaluation.batch_size, arch.max_positions)
            judge = spec.evaluation.judge.model if spec.evaluation.judge else None
            if judge is not None:
                inference_components(plan, "judge", others.get("judge") or arch, _bytes(judge.dtype), spec.evaluation.batch_size,
                                     arch.max_positions)
            plans.append(plan)
    return JobPlan(kind.value, arch, gpu, [_finish(p) for p in plans], mfu)


# ------------------------------------------------------------------------------- architecture lookup


def architecture_for(model: ModelSpec, lookup=None, depth: int = 0) -> Architecture | None:
    """A model reference's architecture: a known hf:// id, or through fromJob (`lookup(kind, name)` returns
    the referenced job's spec dict or None) the model it started from, with a pre-training's added tokens."""
    if model.uri:
        return known_architecture(model.uri)
    if model.from_job is None or lookup is None or depth > 8:
        return None
    from dhad_api.jobs import parse_spec

    doc = lookup(model.from_job.kind.value, model.from_job.name)
    if not doc:
        return None
    spec = parse_spec(model.from_job.kind, doc)
    arch = architecture_for(spec.model, lookup, depth + 1)
    if arch is not None and isinstance(spec, PretrainJobSpec):
        arch = arch.with_vocabulary(spec.vocabulary.new_tokens)
    return arch


def checkpoint_bytes_per_node(arch: Architecture, spec: JobSpec, opt: Optimization, nodes: int) -> int:
    """The most one node writes for one checkpoint: weights (as saved) and optimizer states."""
    p = arch.parameters
    gpus = spec.resources.gpus_per_node
    precision = _precision(opt, gpus)
    d = spec.distributed
    if d.strategy == Strategy.DEEPSPEED:  # 16-bit weights (model + ZeRO model states) + fp32 master and moments
        return int(2 * p + 14 * p / nodes)
    weights = 2 if precision == Precision.BF16_PURE else 4
    if d.strategy == Strategy.FSDP:
        return int(3 * weights * p / nodes)
    return 3 * weights * p  # ddp: node 0 writes the whole model and optimizer


# ----------------------------------------------------------------------------------- the condition


@dataclass(frozen=True)
class PlanVerdict:
    """What the operator sets as the `Planned` condition, and whether it refuses the job."""

    status: str  # "True" (fits), "False" (does not fit), "Unknown" (not checked)
    reason: str
    message: str
    refuse: bool
    plan: JobPlan | None = None


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def planned_condition(kind: JobKind | str, spec: JobSpec, nodes: list[dict[str, str]] = (), lookup=None,
                      mfu: float = DEFAULT_MFU, architecture: Architecture | None = None) -> PlanVerdict:
    """The Planned condition for a job: `nodes` are the label dicts of the cluster's GPU nodes, `lookup(kind,
    name)` returns a referenced job's spec dict (for fromJob). Refuses (spec.plan.enforce) only a plan known
    to exceed the GPU; an unknown architecture or GPU is reported, not refused. `architecture` overrides the
    model's (`dhad plan --model-config`)."""
    if spec.resources.gpus_per_node == 0:
        return PlanVerdict("Unknown", Reason.PLAN_NOT_CHECKED, "CPU job (resources.gpusPerNode 0): no GPU memory to plan", False)
    arch = architecture or architecture_for(spec.model, lookup)
    if arch is None:
        return PlanVerdict("Unknown", Reason.PLAN_NOT_CHECKED,
                           "model architecture unknown (not a known hf:// id, nor a fromJob chain to one): memory not planned", False)
    gpu = job_gpu(spec, list(nodes))
    plan = plan_job(kind, spec, arch, gpu, mfu, others=_other_architectures(spec, lookup))
    peak = plan.peak
    parts = ", ".join(f"{name} {gib(b)}" for name, b in sorted(peak.components, key=lambda c: -c[1])[:4])
    summary = f"{arch.name}: sub-stage {peak.stage} ({peak.strategy}) needs {gib(peak.total)} per GPU ({parts})"
    if gpu is None:
        return PlanVerdict("Unknown", Reason.PLAN_NOT_CHECKED,
                           f"{summary}; GPU memory unknown (set plan.gpuMemory or a {GPU_PRODUCT_LABEL} nodeSelector)", False, plan)
    if peak.total <= gpu.memory:
        return PlanVerdict("True", Reason.PLAN_FITS, f"{summary} of {gib(gpu.memory)} ({gpu.name})", False, plan)
    return PlanVerdict("False", Reason.PLAN_EXCEEDS_GPU_MEMORY,
                       f"{summary}, more than the {gib(gpu.memory)} of one {gpu.name}: use more GPUs, ZeRO-3 or fsdp, "
                       "gradientCheckpointing or a smaller microBatchSize; plan.enforce false runs it anyway",
                       spec.plan.enforce, plan)


def _other_architectures(spec: JobSpec, lookup) -> dict[str, Architecture | None]:
    from dhad_api.references import model_specs

    return {role: architecture_for(m, lookup) for role, m in model_specs(spec).items() if role in ("judge", "teacher")}
