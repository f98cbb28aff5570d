"""Mixed precision keeps fp32 master weights: a job with model.dtype bfloat16 and precision bf16 (the GPU
examples) trains fp32 weights under bf16 autocast, so AdamW updates smaller than bf16's resolution are
kept; precision bf16-pure asks for the old behaviour (weights and optimizer in bf16) and loses them.
Before the fix the first job trained pure bf16 weights."""

from __future__ import annotations

import pytest
import torch
import transformers

from dhad_api.common import DType
from dhad_trainer.stages import sft
from dhad_trainer.stages.base import weights_dtype
from tests.support.alignment import sft_spec, stage_run, tiny_lm

LR = 1e-6  # Adam moves each weight by ~lr: far below bf16's spacing (2^-8 relative) for weights of ~1e-2


def trained(tmp_path, precision: str):
    spec = sft_spec(maxSteps=2, packing=False, learningRate=LR, precision=precision)
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": DType.BFLOAT16})})
    run = stage_run(spec, "sft", tmp_path / precision, tiny_lm())
    result = sft.run(run)
    return run, transformers.AutoModelForCausalLM.from_pretrained(result.model_dir, dtype="auto")


@pytest.fixture(scope="module")
def base():
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_lm(), dtype=torch.float32)


def changed_share(model, base) -> float:
    w, w0 = model.model.layers[0].mlp.up_proj.weight.float(), base.model.layers[0].mlp.up_proj.weight.bfloat16().float()
    return (w != w0).float().mean().item()


def test_bf16_mixed_precision_trains_fp32_master_weights(tmp_path, base):
    run, model = trained(tmp_path, "bf16")
    assert weights_dtype(run, run.spec.training) == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # the master weights were saved
    delta = (model.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight).abs()
    assert 0 < delta.max().item() < 10 * LR * 2  # two tiny updates, kept
    assert changed_share(model, base) > 0.5


def test_bf16_pure_keeps_bf16_weights_and_loses_small_updates(tmp_path, base):
    run, model = trained(tmp_path, "bf16-pure")
    assert weights_dtype(run, run.spec.training) == torch.bfloat16
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert changed_share(model, base) < 0.1  # most updates rounded away: why mixed precision is the default
