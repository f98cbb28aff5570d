"""PPO (stages/ppo.py): its arithmetic against direct computations, the loop on tiny models in one process with a
reward model (the tiny LM read as a one-label classifier), checkpoints and resume with the adaptive KL coefficient,
LoRA with the reference and the reward model as adapters-off views of the trained weights, and settings refused
by name. That PPO raises a reward under torchrun is shown in test_policy_rewards_rise.py."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from transformers import TrainerCallback

from dhad_trainer.runtime.callbacks import ProgressCallback
from dhad_trainer.runtime.distributed import Cluster
from dhad_trainer.runtime.progress import FileSink, ProgressReporter
from dhad_trainer.stages import policy, ppo
from tests.support.alignment import StepRecorder, rlaif_spec, stage_run, tiny_lm, write_pairs
from tests.support.rewards import definite_article


def test_gae_matches_the_discounted_sum_of_td_errors():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.1, -0.2, 0.3, 1.0], [0.5, 2.0, 9.0, 9.0]])
    values = torch.tensor([[0.4, 0.3, 0.2, 0.1], [1.0, -1.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]])  # the second response ended after 2 tokens
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    for row in range(2):
        n = int(mask[row].sum())
        r, v = rewards[row, :n].tolist(), values[row, :n].tolist() + [0.0]  # nothing after the end
        deltas = [r[t] + gamma * v[t + 1] - v[t] for t in range(n)]
        expected = [sum((gamma * lam) ** k * deltas[t + k] for k in range(n - t)) for t in range(n)]
        assert advantages[row, :n].tolist() == pytest.approx(expected)
        assert returns[row, :n].tolist() == pytest.approx([a + b for a, b in zip(expected, v, strict=False)])
        assert advantages[row, n:].abs().sum() == 0 and returns[row, n:].abs().sum() == 0


def test_whitening_over_masked_entries_of_all_processes():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    out = ppo.whiten(x, mask)
    kept = out[mask.bool()]
    assert kept.mean().item() == pytest.approx(0, abs=1e-6) and kept.std().item() == pytest.approx(1, rel=1e-4)
    assert out[~mask.bool()].abs().sum() == 0
    twice = ppo.whiten(x, mask, reduce=lambda t: 2 * t)  # two processes holding the same rollout
    assert torch.allclose(twice[mask.bool()] / kept, torch.full_like(kept, math.sqrt(7 / 8) / math.sqrt(3 / 4)))


def test_clipped_policy_and_value_losses():
    old = torch.zeros(1, 2)
    batch = {"mask": torch.ones(1, 2), "logp": old, "advantages": torch.tensor([[1.0, -1.0]]),
             "values": torch.zeros(1, 2), "returns": torch.ones(1, 2)}
    logp = torch.log(torch.tensor([[1.5, 1.5]]))  # ratio 1.5 on both tokens
    values = torch.tensor([[1.0, 0.1]])
    policy_loss, value_loss, stats = ppo.ppo_losses(logp, values, batch, clip=0.2, value_clip=0.2)
    # A=+1: the gain is clipped at 1.2; A=-1: the larger loss, 1.5, is kept (pessimism of the surrogate)
    assert policy_loss.item() == pytest.approx((-1.2 + 1.5) / 2)
    # token 1 moved 1.0 > 0.2: max((1-1)^2, (0.2-1)^2); token 2 moved 0.1: (0.1-1)^2 either way
    assert value_loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert stats["clip_fraction"].item() == 1.0 and stats["value_clip_fraction"].item() == 0.5


def test_adaptive_kl_moves_toward_its_target_by_at_most_a_fifth_per_horizon():
    kl = ppo.AdaptiveKL(0.1, target=2.0, horizon=100)
    kl.update(kl=10.0, n=50)  # far above: +20% x 50/100
    assert kl.value == pytest.approx(0.11)
    kl.update(kl=1.0, n=100)  # half the target: -20% (clipped from -50%)
    assert kl.value == pytest.approx(0.088)
    fixed = ppo.AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(kl=10.0, n=50)
    assert fixed.value == 0.1


def test_response_mask_keeps_the_first_stop_token_and_nothing_after():
    response = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    assert ppo.response_mask(response, [2]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def ppo_spec(**policy_settings):
    settings = {"algorithm": "ppo", "generation": {"maxNewTokens": 6, "temperature": 1.0, "topP": 1.0},
                "ppo": {"epochs": 2, "miniBatches": 1, "klTarget": 0.01, "klHorizon": 16},
                "training": {"maxSteps": 4, "microBatchSize": 4, "gradientAccumulationSteps": 2,
                             "learningRate": 1e-3, "logEverySteps": 1, "schedule": "constant"}}
    settings.update(policy_settings)
    return rlaif_spec(policy=settings)


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("feedback"), n_train=8, n_heldout=2)


class KeepCheckpoint(TrainerCallback):
    """What the runtime's publisher does for one checkpoint: keep a copy that local rotation cannot delete."""

    def __init__(self, step: int, dest: Path) -> None:
        self.step, self.dest = step, dest

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            shutil.copytree(Path(args.output_dir) / f"checkpoint-{self.step}", self.dest)


class RecordLogs(TrainerCallback):
    """What a report_to integration receives: each log after the callbacks ahead of it."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


RECORDED = RecordLogs()


@pytest.fixture(scope="module")
def with_reward_model(tmp_path_factory, feedback_dir):
    root = tmp_path_factory.mktemp("ppo")
    spec = ppo_spec()
    keep = KeepCheckpoint(2, root / "kept" / "checkpoint-2")  # the rollout boundary: steps 3-4 are a new rollout
    progress = ProgressReporter(FileSink(root / "progress.jsonl"), "policy", interval=0)
    run = stage_run(spec, "policy", root, tiny_lm(), inputs={"feedback": feedback_dir, "reward_model": tiny_lm()},
                    callbacks=[keep, ProgressCallback(progress, Cluster()), RECORDED])
    result = policy.run(run)
    progress.close()
    return run, result


def report_of(run):
    return json.loads((run.output_dir / policy.REPORT_FILE).read_text())


def test_ppo_with_a_reward_model_trains_a_policy_and_checkpoints_both_models(with_reward_model):
    run, result = with_reward_model
    assert result.metrics["algorithm"] == "ppo" and result.metrics["steps"] == 4
    final = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    assert any(not torch.equal(p, q) for p, q in zip(final.parameters(), base.parameters(), strict=True))
    rollouts = report_of(run)["rollouts"]
    assert [r["step"] for r in rollouts] == [0, 2]  # 4 steps, epochs 2 x miniBatches 1 = 2 steps a rollout
    assert abs(rollouts[0]["kl"]) < 1e-6  # before any update the policy is its reference: the reference is right
    # KL 0 is below klTarget: the coefficient falls by 20% x 8 responses / horizon 16, exactly
    assert rollouts[1]["kl_coefficient"] == pytest.approx(0.04 * (1 - 0.2 * 8 / 16))
    checkpoint = run.trainer_dir / "checkpoint-4"
    assert (checkpoint / "policy" / "model.safetensors").is_file() and (checkpoint / "critic" / "model.safetensors").is_file()
    error = max(-0.2, min(0.2, rollouts[1]["kl/sequence"] / 0.01 - 1))  # the controller after the second rollout
    assert json.loads((checkpoint / ppo.STATE_FILE).read_text())["kl_coefficient"] == pytest.approx(
        rollouts[1]["kl_coefficient"] * (1 + error * 8 / 16))
    critic = transformers.AutoModelForSequenceClassification.from_pretrained(checkpoint / "critic")
    start = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_lm(), num_labels=1)
    assert not torch.equal(critic.score.weight, start.score.weight)  # the critic trained too


def test_per_step_figures_reach_progress(with_reward_model):
    run, _ = with_reward_model
    reports = [json.loads(line) for line in (run.work_dir.parent / "progress.jsonl").read_text().splitlines()]
    with_figures = [r for r in reports if "rewardMean" in r.get("figures", {})]
    rollout = report_of(run)["rollouts"][-1]
    assert with_figures[-1]["figures"]["rewardMean"] == pytest.approx(rollout["reward"], abs=1e-6)
    assert {"rewardStd", "kl", "responseLength", "klCoefficient"} <= with_figures[-1]["figures"].keys()
    assert any(r.get("tokensPerSecond") for r in reports)


def test_ppo_logs_reach_the_integrations_under_the_rlaif_names(with_reward_model):
    run, _ = with_reward_model
    logged = [log for log in RECORDED.logs if "reward" in log]
    assert logged, RECORDED.logs
    for log in logged:  # the names GRPO/RLOO logs map to: one dashboard panel for every algorithm
        assert (log["rlaif/reward"], log["rlaif/kl"], log["rlaif/response_length"]) == (
            log["reward"], log["kl"], log["completions/mean_length"])


def test_ppo_resumes_from_a_checkpoint_with_its_kl_coefficient(with_reward_model, feedback_dir, tmp_path):
    run, _ = with_reward_model
    recorder = StepRecorder()
    again = stage_run(run.spec, "policy", tmp_path, tiny_lm(), inputs=run.inputs, callbacks=[recorder],
                      resume_from=run.work_dir.parent / "kept" / "checkpoint-2")
    result = policy.run(again)
    assert result.metrics["steps"] == 4 and recorder.steps == [3, 4]
    first, resumed = report_of(run)["rollouts"], report_of(again)["rollouts"]
    assert [r["step"] for r in resumed] == [2]  # the rollout of steps 3-4, sampled again from the restored policy
    assert resumed[0]["kl_coefficient"] == pytest.approx(first[1]["kl_coefficient"])  # restored, not 0.04
    assert resumed[0]["digest"] == first[1]["digest"]  # the same prompts, sampled alike
    assert resumed[0]["kl"] == pytest.approx(first[1]["kl"], rel=1e-4)  # the restored policy is the one saved


def test_ppo_with_lora_uses_the_trained_weights_with_adapters_off_as_reference_and_reward(feedback_dir, tmp_path):
    spec = ppo_spec(lora={"r": 4, "alpha": 8, "dropout": 0.0})
    run = stage_run(spec, "policy", tmp_path, tiny_lm(), inputs={"feedback": feedback_dir, "reward_model": tiny_lm()})
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm())
    trainer = policy.build_ppo(run, tokenizer)
    assert trainer.frozen.reference is None and trainer.frozen.reward_model is None  # one copy of each model
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "score" in n for n in trainable)
    result = policy.run(run)
    assert report_of(run)["lora"] and abs(report_of(run)["rollouts"][0]["kl"]) < 1e-6
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    changed = {n for (n, p), q in zip(merged.named_parameters(), base.parameters(), strict=True) if not torch.equal(p, q)}
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)


def test_a_reward_function_replaces_the_reward_model(feedback_dir, tmp_path):
    spec = ppo_spec(training={"maxSteps": 2, "microBatchSize": 4, "learningRate": 1e-3, "logEverySteps": 1})
    run = stage_run(spec, "policy", tmp_path, tiny_lm(), inputs={"feedback": feedback_dir})  # no reward_model
    policy.run(run, reward_function=definite_article)
    [rollout] = report_of(run)["rollouts"]
    assert 0 <= rollout["reward"] <= 1 and rollout["reward"] == pytest.approx(report_of(run)["per_step"][0]["reward"])


def test_ppo_refuses_a_rollout_larger_than_the_prompts_and_a_reward_model_of_another_vocabulary(feedback_dir, tmp_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm())
    big = ppo_spec(training={"maxSteps": 2, "microBatchSize": 64})
    run = stage_run(big, "policy", tmp_path / "big", tiny_lm(), inputs={"feedback": feedback_dir, "reward_model": tiny_lm()})
    with pytest.raises(ValueError, match="ppo rollout takes 64 prompts"):
        policy.build_ppo(run, tokenizer)
    other = tmp_path / "other-vocab"
    from dhad_trainer.local.tiny import init_tiny_model

    init_tiny_model(other, vocab_size=600)
    run = stage_run(ppo_spec(), "policy", tmp_path / "other", tiny_lm(), inputs={"feedback": feedback_dir, "reward_model": other})
    with pytest.raises(ValueError, match=r"policy\.rewardModel .* another vocabulary"):
        policy.build_ppo(run, tokenizer)


def test_grpo_with_lora_saves_a_merged_policy(feedback_dir, tmp_path):
    spec = rlaif_spec(policy={"algorithm": "grpo", "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                              "training": {"maxSteps": 2, "microBatchSize": 4, "learningRate": 1e-2, "logEverySteps": 1}})
    run = stage_run(spec, "policy", tmp_path, tiny_lm(), inputs={"feedback": feedback_dir})
    result = policy.run(run, reward_function=definite_article)
    merged = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    changed = {n for (n, p), q in zip(merged.named_parameters(), base.parameters(), strict=True) if not torch.equal(p, q)}
    assert changed and all(any(m in n for m in ("q_proj", "k_proj", "v_proj", "o_proj")) for n in changed)
    assert not list(result.model_dir.glob("adapter_*"))  # merged: a plain model, no adapter files
