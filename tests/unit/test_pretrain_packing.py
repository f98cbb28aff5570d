"""Packed blocks never attend across documents, and maxTokens becomes optimizer steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from dhad_api.jobs import PretrainJobSpec
from dhad_trainer.local.tiny import init_tiny_model
from dhad_trainer.stages.pretrain import PackedCollator, max_steps_for


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = init_tiny_model(tmp_path_factory.mktemp("m") / "tiny", seed=1)
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()


def block(a: list[int], b: list[int]) -> dict:
    return {"input_ids": np.array(a + b), "position_ids": np.array(list(range(len(a))) + list(range(len(b)))), "position": 0}


def test_collator_masks_document_starts():
    batch = PackedCollator()([block([11, 12, 13], [21, 22]), block([31], [41, 42, 43, 44])])
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22], [-100, -100, 42, 43, 44]]
    assert batch["use_cache"] is False and "attention_mask" not in batch


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_second_document_sees_only_itself(model, impl):
    model.config._attn_implementation = impl
    a, b = list(range(100, 130)), list(range(200, 220))
    batch = PackedCollator()([block(a, b)])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([b])).logits
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    assert torch.allclose(packed[0, len(a):], alone[0], atol=1e-5)
    # Why the stage turns the cache off: with it, transformers 5.24 skips the packed-sequence mask.
    assert not torch.allclose(leaky[0, len(a):], alone[0], atol=1e-3)


def test_max_tokens_becomes_steps():
    spec = PretrainJobSpec.model_validate({
        "model": {"uri": "/m"}, "storage": {"bucket": "bkt"}, "data": {"sources": [{"uri": "/d"}]},
        "training": {"maxTokens": 1_000_000, "microBatchSize": 4, "gradientAccumulationSteps": 2},
    })
    assert max_steps_for(spec, world_size=16, sequence_length=4096) == 2  # 524288 tokens per step, rounded up
