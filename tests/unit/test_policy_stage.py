"""The policy stage: settings refused before compute, each TRL algorithm for two steps on tiny models,
and GRPO under 2-process torchrun. The reward model here is the tiny LM read as a one-label classifier."""

from __future__ import annotations

import pytest
import torch
import transformers

from dhad_api.stages import PolicyAlgorithm
from dhad_trainer.stages import policy
from tests.support.alignment import (
    StepRecorder,
    assert_ranks_trained_one_model,
    distributed_chain,
    rlaif_spec,
    stage_run,
    tiny_lm,
    write_pairs,
)


@pytest.fixture(scope="module")
def feedback_dir(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("feedback"), n_train=8, n_heldout=2)


def inputs(feedback_dir):
    return {"feedback": feedback_dir, "reward_model": tiny_lm()}


def assert_policy_model(result, algorithm):
    assert result.metrics["algorithm"] == algorithm and result.metrics["steps"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(result.model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    assert type(model).__name__ == "LlamaForCausalLM"
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters(), strict=True))
    assert transformers.AutoTokenizer.from_pretrained(result.model_dir).chat_template


@pytest.mark.parametrize("algorithm", ["rloo", "online-dpo", "dpo", "grpo"])
def test_each_algorithm_runs_two_steps_and_saves_a_policy(algorithm, feedback_dir, tmp_path):
    spec = rlaif_spec(policy={"algorithm": algorithm, "training": {"maxSteps": 2, "microBatchSize": 2,
                                                                   "learningRate": 1e-3, "logEverySteps": 1}})
    result = policy.run(stage_run(spec, "policy", tmp_path, tiny_lm(), inputs=inputs(feedback_dir)))
    assert_policy_model(result, algorithm)
    if algorithm in ("grpo", "rloo"):
        assert "reward" in result.metrics["last_log"]
    if algorithm == "grpo":  # resume like every stage: from checkpoint-1, with the runtime's callbacks
        recorder = StepRecorder()
        spec.policy.training.max_steps = 3
        resumed = stage_run(spec, "policy", tmp_path / "again", tiny_lm(), inputs=inputs(feedback_dir),
                            resume_from=tmp_path / "work" / "trainer" / "checkpoint-1", callbacks=[recorder])
        assert policy.run(resumed).metrics["steps"] == 3 and recorder.steps == [2, 3]


def test_kl_and_generation_settings_reach_the_trl_config(feedback_dir, tmp_path):
    spec = rlaif_spec(policy={"klCoefficient": 0.2, "generationsPerPrompt": 4,
                              "generation": {"maxNewTokens": 5, "temperature": 0.7, "topP": 0.9},
                              "training": {"microBatchSize": 4, "maxSteps": 1}})
    run = stage_run(spec, "policy", tmp_path, tiny_lm(), inputs=inputs(feedback_dir))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_lm())
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_lm())
    args = policy.build_trainer(run, model, tokenizer).args
    assert (args.beta, args.num_generations, args.max_completion_length) == (0.2, 4, 5)
    assert (args.temperature, args.top_p, args.scale_rewards) == (0.7, 0.9, "group")
    assert args.output_dir == str(run.trainer_dir) and args.save_steps == 1


@pytest.mark.parametrize("mutate,field", [
    (lambda p: setattr(p.training, "micro_batch_size", 3), "policy.generationsPerPrompt"),  # 3 % 2 groups
    (lambda p: setattr(p.generation, "temperature", 0.0), "policy.generation.temperature"),
    (lambda p: (setattr(p, "algorithm", PolicyAlgorithm.PPO), setattr(p.generation, "temperature", 0.0)),
     "policy.generation.temperature"),
    (lambda p: setattr(p, "use_vllm", True), "policy.useVllm"),
])
def test_settings_that_cannot_work_are_refused_by_name(mutate, field, tmp_path):
    spec = rlaif_spec()
    mutate(spec.policy)  # after validation, as a spec the API rule never saw (or a different world size)
    run = stage_run(spec, "policy", tmp_path, tiny_lm())
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        policy.run(run)
    assert not run.output_dir.exists()  # refused before any model was loaded or file written


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_vllm_that_is_not_installed_is_refused_before_any_model_on_gpus(algorithm, tmp_path):
    assert not policy.vllm_available()  # this environment has no vLLM (the 'gpu' extra is not installed)
    spec = rlaif_spec(policy={"algorithm": algorithm, "useVllm": True})
    run = stage_run(spec, "policy", tmp_path, tiny_lm(), use_cpu=False)  # as on a GPU node
    with pytest.raises(ValueError, match=r"policy\.useVllm is true but vLLM is not installed"):
        policy.run(run)
    assert not run.output_dir.exists()


def test_missing_reward_model_is_named(tmp_path):
    run = stage_run(rlaif_spec(), "policy", tmp_path, tiny_lm())
    with pytest.raises(ValueError, match=r"run.inputs\['reward_model'\]"):
        policy.run(run)


@pytest.mark.torchrun
def test_two_process_torchrun_grpo():
    results = distributed_chain()["policy"]  # GRPO from the 2-process SFT model, prompts from its feedback
    assert [r["world_size"] for r in results] == [2, 2]
    assert all(r["metrics"]["steps"] == 2 and r["metrics"]["algorithm"] == "grpo" for r in results)
    model = transformers.AutoModelForCausalLM.from_pretrained(results[0]["model_dir"])
    assert type(model).__name__ == "LlamaForCausalLM"
    sft_model = distributed_chain()["sft"][0]["model_dir"]  # GRPO started from the 2-process SFT model
    assert_ranks_trained_one_model(results, start=sft_model)
