"""The DeepSpeed config a job's `distributed` spec asks for, as HF Trainer wants it.

Batch size, accumulation, clipping, optimizer hyper-parameters and precision are "auto", so HF
Trainer fills them from the same TrainingArguments every stage builds with `training_arguments()`
and they can never disagree. No scheduler section: HF's scheduler (warmup + cosine to a floor) is the
same one DDP runs use.

Optimizer: without offload there is no optimizer section, so HF builds torch's fused AdamW
(`optim=adamw_torch_fused` in `training_arguments()`) and DeepSpeed runs it as a client optimizer on its
fp32 master partitions: no DeepSpeed op is compiled at run time (its own FusedAdam is built with nvcc on
first use, and the trainer image is a CUDA runtime base without nvcc). With optimizer offload the section
asks for AdamW, which DeepSpeed maps to its CPU Adam: C++ built with g++ (-march=native, so on the node that
runs it) at first use, which the launcher's pre-flight checks it can build. With ZeRO-3, `stage3_gather_16bit_weights_on_model_save` makes `save_model`
write whole weights, not empty placeholders.

The config must exist before the model is loaded: TrainingArguments(deepspeed=...) registers it, and
`from_pretrained` then builds ZeRO-3 models partitioned (zero.Init) instead of whole on every rank.
"""

from __future__ import annotations

from dhad_api.common import Distributed, Offload, Strategy

AUTO = "auto"


def build(distributed: Distributed, use_cpu: bool) -> dict | None:
    """The DeepSpeed config dict for `distributed`, or None for ddp/fsdp."""
    if distributed.strategy != Strategy.DEEPSPEED:
        return None
    stage = distributed.zero_stage or 2
    zero: dict = {
        "stage": stage,
        "overlap_comm": not use_cpu,
        "contiguous_gradients": True,
        "reduce_bucket_size": AUTO,
    }
    if stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,
            "stage3_prefetch_bucket_size": AUTO,
            "stage3_param_persistence_threshold": AUTO,
        })
    offload = distributed.offload in (Offload.OPTIMIZER, Offload.OPTIMIZER_AND_PARAMETERS)
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": not use_cpu}
    if distributed.offload == Offload.OPTIMIZER_AND_PARAMETERS:
        zero["offload_param"] = {"device": "cpu", "pin_memory": not use_cpu}
    config = {
        "train_micro_batch_size_per_gpu": AUTO,
        "gradient_accumulation_steps": AUTO,
        "train_batch_size": AUTO,
        "gradient_clipping": AUTO,
        "bf16": {"enabled": AUTO},
        "fp16": {"enabled": AUTO},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW as DeepSpeed's client optimizer
        "steps_per_print": 10**9,  # HF logs progress; DeepSpeed's own prints would only repeat it
        "wall_clock_breakdown": False,
    }
    if offload:
        config["optimizer"] = {"type": "AdamW", "params": {"lr": AUTO, "betas": AUTO, "eps": AUTO, "weight_decay": AUTO}}
    return config


def needed_ops(distributed: Distributed) -> list[str]:
    """DeepSpeed ops `build(distributed)` makes DeepSpeed load (built at first use unless prebuilt)."""
    if distributed.strategy != Strategy.DEEPSPEED:
        return []
    return ["cpu_adam"] if distributed.offload != Offload.NONE else []


def resolve(config: dict, micro_batch: int, accumulation: int, world_size: int, *, max_grad_norm: float = 1.0,
            bf16: bool = False, fp16: bool = False) -> dict:
    """A copy with the batch and precision "auto"s filled, for code that uses DeepSpeed without HF
    Trainer (bench scripts, `zero.Init` outside a Trainer). Same arithmetic as HF's."""
    out = {**config}
    out["train_micro_batch_size_per_gpu"] = micro_batch
    out["gradient_accumulation_steps"] = accumulation
    out["train_batch_size"] = micro_batch * accumulation * world_size
    out["gradient_clipping"] = max_grad_norm
    out["bf16"] = {"enabled": bf16}
    out["fp16"] = {"enabled": fp16}
    return out
