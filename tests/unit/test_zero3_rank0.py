"""Work that only rank 0 reports, under DeepSpeed ZeRO-3 on 2 CPU processes (real torchrun, gloo): the SFT
LoRA merge and the reward model's accuracy pass. Under ZeRO-3 every rank holds a partition of each weight,
so rank 0 alone could neither merge (its tensors are partitions) nor run a forward (each layer's gather
waits for the other rank); before the fix the merge wrote a broken model and the accuracy pass hung."""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from dhad_trainer.stages.alignment import HELD_OUT, chat_pairs, read_pairs
from dhad_trainer.stages.reward import CULTURE_SET, load_reward_model, pairwise_accuracy
from tests.support.alignment import rlaif_spec, sft_spec, step, tiny_lm, torchrun_stages, write_pairs

pytestmark = pytest.mark.torchrun
ZERO3 = {"strategy": "deepspeed", "zeroStage": 3}
LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@functools.cache
def zero3_run() -> tuple[Path, dict]:
    root = Path(tempfile.mkdtemp(prefix="dhad-zero3-"))
    sft = sft_spec(maxSteps=2, packing=False, lora=LORA, learningRate=5e-3)
    sft = sft.model_copy(update={"distributed": sft.distributed.model_validate(ZERO3)})
    reward = rlaif_spec(reward={"training": {"maxSteps": 2, "microBatchSize": 2, "learningRate": 1e-3}})
    reward = reward.model_copy(update={"distributed": reward.distributed.model_validate(ZERO3)})
    feedback = write_pairs(root / "feedback", n_train=8, n_heldout=6)
    results = torchrun_stages([
        step("sft", sft, root / "sft", tiny_lm()),
        step("reward", reward, root / "reward", tiny_lm(), {"feedback": feedback}),
    ], root / "run", timeout=900)
    return root, results


@pytest.fixture(scope="module")
def zero3():
    root, results = zero3_run()
    yield root, results
    shutil.rmtree(root, ignore_errors=True)


def test_lora_merge_under_zero3_folds_the_trained_adapter_into_whole_weights(zero3):
    root, _ = zero3
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "sft" / "out")
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    adapter = load_file(root / "sft" / "work" / "adapter" / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = adapter[f"{prefix}.lora_A.weight"], adapter[f"{prefix}.lora_B.weight"]
    assert a.numel() > 0 and b.abs().sum() > 0  # gathered, trained adapter weights (B starts at zero)
    expected = base.model.layers[0].self_attn.q_proj.weight + (LORA["alpha"] / LORA["r"]) * (b @ a)
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(merged.lm_head.weight, base.lm_head.weight)  # outside the target modules
    assert not (root / "sft" / "out" / "adapter_config.json").exists()  # a plain model, not an adapter


def test_reward_accuracy_pass_runs_on_every_rank_and_matches_the_saved_model(zero3):
    root, results = zero3
    ranks = results["reward"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    m = ranks[0]["metrics"]
    culture = CULTURE_SET.read_text(encoding="utf-8").splitlines()  # every pair of the shipped culture set
    assert m["heldout_pairs"] == 6 and m["culture_pairs"] == len(culture) >= 200
    assert ranks[1]["metrics"]["heldout_accuracy"] == m["heldout_accuracy"]  # both ranks scored the same pairs
    model, tokenizer = load_reward_model(root / "reward" / "out", torch.float32)
    heldout = chat_pairs(read_pairs(root / "feedback", HELD_OUT))
    assert pairwise_accuracy(model, tokenizer, heldout, 256) == pytest.approx(m["heldout_accuracy"], abs=1 / 6 + 1e-9)
    assert (root / "reward" / "out" / "reward_eval.json").exists()
