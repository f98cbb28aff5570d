"""DeepSpeed configs from the spec: ZeRO stage, offload, the ZeRO-3 save flag, and "auto" values that
HF Trainer fills consistently with the TrainingArguments built from the same spec."""

from __future__ import annotations

import pytest

from dhad_api.common import Distributed
from dhad_trainer.runtime import deepspeed_config


def test_ddp_and_fsdp_have_no_deepspeed_config():
    assert deepspeed_config.build(Distributed(), use_cpu=True) is None
    assert deepspeed_config.build(Distributed(strategy="fsdp"), use_cpu=False) is None


@pytest.mark.parametrize(("spec", "stage", "optimizer_offload", "param_offload"), [
    ({"strategy": "deepspeed"}, 2, False, False),
    ({"strategy": "deepspeed", "zeroStage": 3}, 3, False, False),
    ({"strategy": "deepspeed", "zeroStage": 2, "offload": "optimizer"}, 2, True, False),
    ({"strategy": "deepspeed", "zeroStage": 3, "offload": "optimizer-and-parameters"}, 3, True, True),
])
def test_zero_stage_and_offload(spec, stage, optimizer_offload, param_offload):
    config = deepspeed_config.build(Distributed.model_validate(spec), use_cpu=False)
    zero = config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == optimizer_offload and ("offload_param" in zero) == param_offload
    assert zero.get("stage3_gather_16bit_weights_on_model_save", False) == (stage == 3)
    assert config["train_micro_batch_size_per_gpu"] == config["gradient_accumulation_steps"] == "auto"
    assert "scheduler" not in config  # HF's warmup + cosine, as in DDP runs
    # DeepSpeed's own Adam only with offload (its CPU Adam); otherwise torch's fused AdamW, no op to compile
    assert ("optimizer" in config) == optimizer_offload
    assert deepspeed_config.needed_ops(Distributed.model_validate(spec)) == (["cpu_adam"] if optimizer_offload else [])
    assert zero["overlap_comm"] is True and zero.get("offload_optimizer", {}).get("pin_memory", True) is True


def test_resolve_fills_batch_arithmetic():
    config = deepspeed_config.build(Distributed(strategy="deepspeed", zero_stage=3), use_cpu=True)
    resolved = deepspeed_config.resolve(config, 4, 8, 16, max_grad_norm=0.5, bf16=True)
    assert resolved["train_batch_size"] == 4 * 8 * 16 and resolved["gradient_clipping"] == 0.5
    assert resolved["bf16"] == {"enabled": True} and config["bf16"] == {"enabled": "auto"}


@pytest.fixture
def one_process_group(monkeypatch):
    """DeepSpeed needs a process group even alone: a real one-process gloo group, as the runtime makes."""
    from dhad_trainer.runtime import distributed
    from tests.harness.processes import free_port

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    distributed.setup(always=True)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
    distributed.teardown()


def test_hf_trainer_fills_auto_values_from_the_spec(tmp_path, one_process_group):
    """The config goes through HF's own processing with TrainingArguments from `training_arguments()`."""
    import transformers

    from dhad_api.jobs import PretrainJobSpec
    from dhad_trainer.stages.base import StageRun, training_arguments

    spec = PretrainJobSpec.model_validate({
        "model": {"uri": "/m"}, "storage": {"bucket": "bkt"}, "data": {"sources": [{"uri": "/d"}]},
        "distributed": {"strategy": "deepspeed", "zeroStage": 2},
        "training": {"learningRate": 3e-4, "microBatchSize": 4, "gradientAccumulationSteps": 8, "maxGradNorm": 0.7,
                     "adamBeta2": 0.97, "weightDecay": 0.1, "maxSteps": 10},
    })
    config = deepspeed_config.build(spec.distributed, use_cpu=True)
    run = StageRun(spec=spec, stage="pretrain", model_dir=tmp_path, work_dir=tmp_path, output_dir=tmp_path, deepspeed=config)
    args = transformers.TrainingArguments(**training_arguments(run, spec.training))
    filled = args.hf_deepspeed_config.config
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 8
    assert filled["train_batch_size"] == 4 * 8 * args.world_size and filled["gradient_clipping"] == 0.7
    assert "optimizer" not in filled and args.optim == "adamw_torch_fused"  # HF builds torch's fused AdamW
    assert args.learning_rate == 3e-4 and (args.adam_beta1, args.adam_beta2) == (0.9, 0.97) and args.weight_decay == 0.1
    assert filled["bf16"]["enabled"] is False and filled["fp16"]["enabled"] is False  # fp32 on CPU
    assert config["train_micro_batch_size_per_gpu"] == "auto"  # the spec's config is not mutated
