"""The contract between the runtime and a stage module.

The runtime (launcher, distributed setup, model download, checkpoint store, progress) prepares a
`StageRun`; a stage module (`stages/<name>.py`) exposes `run(stage_run) -> StageResult` and never
touches S3 or torch.distributed setup itself. Every training stage builds its transformers/TRL
arguments from `training_arguments()`, so precision, schedule, checkpoint cadence, DeepSpeed and FSDP
are mapped from the spec in one place, and loads its trainable model in `weights_dtype()`.

Precision: bf16/fp16 are mixed precision everywhere. Under ddp and fsdp the trainable weights are loaded
in fp32 (they are the master weights: HF autocasts the compute, FSDP2's MixedPrecisionPolicy gathers them
in bf16), so AdamW updates fp32 weights with fp32 moments whatever `model.dtype` says; DeepSpeed keeps its
own fp32 master partition, so its models load in `model.dtype`. bf16-pure loads and trains in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dhad_api.common import Strategy
from dhad_api.jobs import JobSpec
from dhad_api.training import Optimization, Precision, Schedule
from dhad_trainer.runtime import tracking


@dataclass
class StageRun:
    """Everything a stage needs, already resolved to local paths."""

    spec: JobSpec
    stage: str
    model_dir: Path
    work_dir: Path
    output_dir: Path
    inputs: dict[str, Path] = field(default_factory=dict)
    data_store: Any = None
    resume_from: Path | None = None
    callbacks: list[Any] = field(default_factory=list)
    deepspeed: dict | None = None
    fsdp: dict | None = None  # runtime.fsdp_config.build(): TrainingArguments' fsdp, fsdp_config, parallelism_config
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    use_cpu: bool = True
    root: str = ""  # the job's output root (s3:// or a folder): where earlier sub-stages left pointers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def trainer_dir(self) -> Path:
        """HF Trainer's output_dir: checkpoint-N folders appear here and the runtime publishes them."""
        return self.work_dir / "trainer"


@dataclass
class StageResult:
    """What a stage reports back: metrics (printed, stored in the run summary) and its final model."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None


SCHEDULERS = {Schedule.COSINE: "cosine_with_min_lr", Schedule.LINEAR: "linear", Schedule.CONSTANT: "constant_with_warmup"}


def effective_precision(run: StageRun, opt: Optimization) -> Precision:
    """`auto` resolved: bf16 (mixed) on GPUs, fp32 on CPU."""
    if opt.precision == Precision.AUTO:
        return Precision.FP32 if run.use_cpu else Precision.BF16
    return opt.precision


def weights_dtype(run: StageRun, opt: Optimization):
    """The dtype a stage loads its trainable model in (see the module docstring): fp32 master weights for
    mixed precision and fp32 under ddp/fsdp, `model.dtype` under DeepSpeed mixed precision, bf16 for bf16-pure."""
    import torch

    precision = effective_precision(run, opt)
    if precision == Precision.BF16_PURE:
        return torch.bfloat16
    if precision in (Precision.BF16, Precision.FP16) and run.spec.distributed.strategy == Strategy.DEEPSPEED:
        name = run.spec.model.dtype.value
        return "auto" if name == "auto" else getattr(torch, name)
    return torch.float32


def stage_optimization(run: StageRun) -> Optimization | None:
    """The Optimization that trains in `run.stage` (None for stages that only run models)."""
    spec = run.spec
    return {"pretrain": getattr(spec, "training", None), "sft": getattr(spec, "training", None),
            "reward": getattr(getattr(spec, "reward", None), "training", None),
            "policy": getattr(getattr(spec, "policy", None), "training", None)}.get(run.stage)


def training_arguments(run: StageRun, opt: Optimization, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for transformers.TrainingArguments (or a TRL config) from the spec."""
    precision = effective_precision(run, opt)
    kwargs: dict[str, Any] = {
        "output_dir": str(run.trainer_dir),
        "learning_rate": opt.learning_rate,
        "lr_scheduler_type": SCHEDULERS[opt.schedule],
        "warmup_steps": opt.warmup_steps,
        "weight_decay": opt.weight_decay,
        "adam_beta1": opt.adam_beta1,
        "adam_beta2": opt.adam_beta2,
        "max_grad_norm": opt.max_grad_norm if opt.max_grad_norm > 0 else 0.0,
        "per_device_train_batch_size": opt.micro_batch_size,
        "gradient_accumulation_steps": opt.gradient_accumulation_steps,
        "max_steps": opt.max_steps or -1,
        "num_train_epochs": opt.epochs or 1.0,
        "bf16": precision == Precision.BF16,
        "fp16": precision == Precision.FP16,
        "seed": opt.seed,
        "data_seed": opt.seed,
        # torch's own fused AdamW (no DeepSpeed op to compile); DeepSpeed takes it as a client optimizer
        # unless the config offloads the optimizer (then DeepSpeed's CPU Adam, see deepspeed_config.py).
        "optim": "adamw_torch_fused",
        # FSDP checkpoints activations itself (fsdp_config), without the extra all-gather HF's own would add.
        "gradient_checkpointing": opt.gradient_checkpointing and run.fsdp is None,
        "logging_steps": opt.log_every_steps,
        "save_strategy": "steps",
        "save_steps": run.spec.checkpoint.interval_steps,
        "save_total_limit": 2,  # local disk only; the object store keeps checkpoint.keepLast
        **tracking.trainer_arguments(run),  # report_to (TensorBoard, MLflow, W&B) on rank 0, run_name
        "use_cpu": run.use_cpu,
        # Only under torchrun: accelerate expects a process group once a backend is named.
        "ddp_backend": ("gloo" if run.use_cpu else "nccl") if run.world_size > 1 else None,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "deepspeed": run.deepspeed,
    }
    if run.fsdp is not None:
        kwargs.update(run.fsdp)
        kwargs["fsdp_config"] = {**run.fsdp["fsdp_config"], "activation_checkpointing": opt.gradient_checkpointing}
    if opt.schedule == Schedule.COSINE:
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": opt.min_learning_rate_ratio}
    kwargs.update(overrides)
    return kwargs


def save_model(trainer, output_dir) -> None:
    """`trainer.save_model`, but whole HF safetensors under FSDP too. FSDP checkpoints are sharded
    (SHARDED_STATE_DICT), for which HF's save_model writes nothing, so every rank joins one gather of
    the full state dict and rank 0 writes it (copied into plain tensors: over gloo the gathered tensors
    are collective wrappers that safetensors cannot address)."""
    if getattr(trainer.accelerator.state, "fsdp_plugin", None) is None:
        trainer.save_model(str(output_dir))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainer.args.should_save:
        state = {name: tensor.detach().clone() for name, tensor in state.items()}
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.save_pretrained(str(output_dir), state_dict=state, safe_serialization=True)
        if trainer.processing_class is not None:  # as HF's own save_model does
            trainer.processing_class.save_pretrained(str(output_dir))
