"""FSDP2 (torch `fully_shard`) as a job's `distributed.strategy: fsdp` asks for it, through HF Trainer and
accelerate (transformers 5.24 `fsdp=True` + `fsdp_config`, accelerate 1.15 `fsdp2_prepare_model`).

- Units: every decoder layer (the model's `_no_split_modules`), the input embedding and the tail
  (final norm + lm_head) are their own `fully_shard` units; parameters are resharded after forward.
- Precision: with bf16/fp16 accelerate upcasts trainable parameters to fp32 before sharding (the fp32
  shards are the master weights; AdamW's moments are fp32 too) and gathers them in 16 bits for compute
  (MixedPrecisionPolicy param_dtype = reduce_dtype = bf16). bf16-pure keeps bf16 shards.
- Activation checkpointing: FSDP's own (`fsdp_config.activation_checkpointing`), from the stage's
  `gradientCheckpointing`; HF's own would add an all-gather in backward.
- Hybrid sharding: a (replicate = nodes, shard = processes per node) device mesh via accelerate's
  ParallelismConfig: parameters are sharded within a node and replicated across nodes. One node (or
  one process per node, where accelerate has no replicate-only mesh) is full sharding.
- Checkpoints: SHARDED_STATE_DICT, torch.distributed.checkpoint files that every rank writes for its own
  shards (`pytorch_model_fsdp_0/`, `optimizer_0/`), so they go through the runtime's per-node upload and
  MANIFEST like ZeRO shards, and resume on any node count; the final model is gathered once into HF
  safetensors (`stages.base.save_model`).

accelerate 1.15 turns FSDP on only for GPU-like devices (AcceleratorState lists MULTI_GPU, MULTI_NPU, ...,
not MULTI_CPU) and otherwise ignores the plugin silently, which would run DDP. On CPU (tests, local mode)
`enable_on_cpu()` makes HF Trainer install the same plugin after it built its Accelerator, so the same
`fully_shard` path runs over gloo.
"""

from __future__ import annotations

from dhad_api.common import Distributed, Sharding, Strategy

FSDP_CONFIG = {
    "version": 2,
    "reshard_after_forward": True,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "state_dict_type": "SHARDED_STATE_DICT",
    "cpu_ram_efficient_loading": False,
}


def build(distributed: Distributed, nnodes: int, procs_per_node: int) -> dict | None:
    """TrainingArguments kwargs for FSDP2 (`fsdp`, `fsdp_config`, `parallelism_config`), or None unless fsdp.
    `training_arguments()` adds activation checkpointing from the stage's settings."""
    if distributed.strategy != Strategy.FSDP:
        return None
    kwargs: dict = {"fsdp": True, "fsdp_config": dict(FSDP_CONFIG)}
    sharding = distributed.fsdp.sharding if distributed.fsdp else Sharding.FULL
    if sharding == Sharding.HYBRID and nnodes > 1 and procs_per_node > 1:
        from accelerate.parallelism_config import ParallelismConfig

        kwargs["parallelism_config"] = ParallelismConfig(dp_replicate_size=nnodes, dp_shard_size=procs_per_node)
    return kwargs


def shard_group_size(distributed: Distributed, nnodes: int, procs_per_node: int) -> int:
    """How many processes share one copy of the model's states (the plan's divisor)."""
    sharding = distributed.fsdp.sharding if distributed.fsdp else Sharding.FULL
    if sharding == Sharding.HYBRID and nnodes > 1 and procs_per_node > 1:
        return procs_per_node
    return nnodes * procs_per_node


def enable_on_cpu() -> None:
    """Makes HF Trainer (and TRL's trainers, its subclasses) run FSDP on CPU, where accelerate drops it."""
    from transformers import Trainer

    original = Trainer.create_accelerator_and_postprocess
    if getattr(original, "dhad_cpu_fsdp", False):
        return

    def create_accelerator_and_postprocess(self) -> None:
        from accelerate.parallelism_config import ParallelismConfig
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        # A hybrid mesh (ParallelismConfig) is validated against the distributed type inside Accelerator():
        # check it once FSDP is on instead.
        validate, deferred = ParallelismConfig._validate_accelerator, []
        ParallelismConfig._validate_accelerator = lambda config, accelerator: deferred.append((config, accelerator))
        try:
            original(self)
        finally:
            ParallelismConfig._validate_accelerator = validate
        plugin_args = self.args.fsdp_plugin_args
        if plugin_args is None or self.is_fsdp_enabled:
            for config, accelerator in deferred:
                validate(config, accelerator)
            return

        plugin = FullyShardedDataParallelPlugin(**plugin_args)
        state = self.accelerator.state
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        self.is_fsdp_enabled = True
        for config, accelerator in deferred:
            validate(config, accelerator)

    create_accelerator_and_postprocess.dhad_cpu_fsdp = True
    Trainer.create_accelerator_and_postprocess = create_accelerator_and_postprocess
