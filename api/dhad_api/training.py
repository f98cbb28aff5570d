"""Optimisation settings every training stage shares (pre-training, SFT, reward model, policy)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from dhad_api.base import Rule, RuledModel


class Schedule(StrEnum):
    """Learning-rate schedule after warmup."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"


class Precision(StrEnum):
    """Training precision; `auto` is bf16 on GPUs and fp32 on CPU. bf16 and fp16 are mixed precision: 16-bit
    compute, fp32 master weights, gradients and optimizer states. bf16-pure keeps weights and optimizer states
    in bf16 (half the memory, updates below bf16's resolution are lost; ddp and fsdp only)."""

    AUTO = "auto"
    BF16 = "bf16"
    BF16_PURE = "bf16-pure"
    FP16 = "fp16"
    FP32 = "fp32"


class Optimization(RuledModel):
    """Optimizer, schedule and batch settings (AdamW)."""

    learning_rate: float = Field(2e-5, gt=0, le=1, description="learningRate is the peak AdamW learning rate, > 0. Default 2e-5.")
    min_learning_rate_ratio: float = Field(
        0.1, ge=0, le=1, description="minLearningRateRatio is the cosine floor as a share of learningRate. Default 0.1."
    )
    schedule: Schedule = Field(Schedule.COSINE, description="schedule is cosine, linear or constant after warmup. Default cosine.")
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="warmupSteps is the linear warmup length in optimizer steps. Default 0.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="weightDecay is AdamW's decoupled weight decay. Default 0.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="adamBeta1 is AdamW's beta1. Default 0.9.")
    adam_beta2: float = Field(0.95, ge=0, lt=1, description="adamBeta2 is AdamW's beta2. Default 0.95.")
    max_grad_norm: float = Field(1.0, ge=0, le=1000, description="maxGradNorm clips the global gradient norm; 0 disables clipping. Default 1.0.")
    micro_batch_size: int = Field(1, ge=1, le=4096, description="microBatchSize is sequences per process per forward pass. Default 1.")
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=4096, description="gradientAccumulationSteps is micro-batches per optimizer step. Default 1."
    )
    max_steps: int | None = Field(
        None, ge=1, le=100_000_000,
        description="maxSteps is the number of optimizer steps. Exactly one of maxSteps and epochs (or, for "
        "pre-training, maxTokens) is set; empty with no epochs means 1 epoch.",
    )
    epochs: float | None = Field(None, gt=0, le=1000, description="epochs is passes over the data; may be fractional. Empty means see maxSteps.")
    precision: Precision = Field(
        Precision.AUTO,
        description="precision is auto (bf16 on GPUs, fp32 on CPU), bf16 or fp16 (mixed: 16-bit compute, fp32 master "
        "weights and optimizer states), bf16-pure (weights and optimizer states in bf16; ddp and fsdp only) or fp32. Default auto.",
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, description="seed seeds model init, data order and dropout. Default 42.")
    gradient_checkpointing: bool = Field(False, description="gradientCheckpointing trades compute for activation memory. Default false.")
    log_every_steps: int = Field(10, ge=1, le=100_000, description="logEverySteps is how often loss, tokens/s and learning rate are logged and reported. Default 10.")

    rules = (
        Rule("!(has(self.maxSteps) && has(self.epochs))", "optimization: set at most one of maxSteps and epochs",
             lambda o: o.max_steps is None or o.epochs is None),
    )
