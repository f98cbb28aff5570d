"""The contract between the runtime and a stage module.

The runtime (launcher, distributed setup, model download, checkpoint store, progress) prepares a
`StageRun`; a stage module (`stages/<name>.py`) exposes `run(stage_run) -> StageResult` and never
touches S3 or torch.distributed setup itself. Every training stage builds its transformers/TRL
arguments from `training_arguments()`, so precision, schedule, checkpoint cadence and DeepSpeed are
mapped from the spec in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    use_cpu: bool = True

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


def training_arguments(run: StageRun, opt: Optimization, **overrides: Any) -> dict[str, Any]:
    """Keyword arguments for transformers.TrainingArguments (or a TRL config) from the spec."""
    precision = opt.precision
    if precision == Precision.AUTO:
        precision = Precision.FP32 if run.use_cpu else Precision.BF16
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
        "gradient_checkpointing": opt.gradient_checkpointing,
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
    if opt.schedule == Schedule.COSINE:
        kwargs["lr_scheduler_kwargs"] = {"min_lr_rate": opt.min_learning_rate_ratio}
    kwargs.update(overrides)
    return kwargs
