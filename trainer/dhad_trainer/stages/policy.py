"""RLAIF policy stage: optimise the policy against the reward model (or on the judged pairs, for DPO).

- grpo (default): TRL GRPOTrainer; the reward model folder is the reward function (TRL loads it as a
  sequence-classification model and scores the chat-rendered prompt + completion). Rewards are
  normalised per prompt group (`scale_rewards="group"`; the API has no field for it yet).
- rloo: TRL RLOOTrainer, same reward model, leave-one-out baseline.
- online-dpo: trl.experimental OnlineDPOTrainer; it samples two completions per prompt and lets the
  reward model pick, so generationsPerPrompt does not apply.
- dpo: TRL DPOTrainer on the feedback stage's train pairs (offline, no reward model).

klCoefficient maps to beta, generationsPerPrompt to num_generations, generation to the sampling
settings. Settings that cannot work are refused before any model is loaded.

PPO is not offered: TRL 1.16 ships no PPOTrainer (it left the stable API; trl.experimental has none
either), and writing one here would mean maintaining a value model, GAE and rollout buffers outside
TRL. GRPO and RLOO reach the same goal with a reward model and no critic.
"""

from __future__ import annotations

import logging

from dhad_api.jobs import RLAIFJobSpec
from dhad_api.stages import PolicyAlgorithm, PolicyStage
from dhad_trainer.data.conversations import load_prompts
from dhad_trainer.runtime import tracking
from dhad_trainer.stages.alignment import (
    INPUT_FEEDBACK,
    INPUT_REWARD_MODEL,
    TRAIN,
    chat_pairs,
    load_dtype,
    prompt_id,
    read_pairs,
    read_prompts,
    require_input,
    resume_arg,
    save_final,
    split_of,
    stage_arguments,
)
from dhad_trainer.stages.base import StageResult, StageRun

log = logging.getLogger("dhad.policy")
SCALE_REWARDS = "group"
GROUPED = (PolicyAlgorithm.GRPO, PolicyAlgorithm.RLOO)
SAMPLED = (PolicyAlgorithm.GRPO, PolicyAlgorithm.RLOO, PolicyAlgorithm.ONLINE_DPO)


def check_settings(run: StageRun, pol: PolicyStage) -> None:
    """Refuse what cannot work, naming the field, before any compute."""
    t = pol.training
    if pol.algorithm in GROUPED:
        batch = t.micro_batch_size * t.gradient_accumulation_steps * run.world_size
        if batch % pol.generations_per_prompt:
            raise ValueError(
                f"policy.generationsPerPrompt ({pol.generations_per_prompt}) must divide the generation batch: "
                f"policy.training.microBatchSize {t.micro_batch_size} x gradientAccumulationSteps "
                f"{t.gradient_accumulation_steps} x {run.world_size} processes = {batch}")
    if pol.algorithm in SAMPLED and pol.generation.temperature == 0:
        raise ValueError(f"policy.generation.temperature is 0: {pol.algorithm.value} compares sampled "
                         "completions of one prompt, and greedy decoding makes them identical")
    if pol.use_vllm and run.use_cpu:
        raise ValueError("policy.useVllm needs GPUs; this run is on CPU")
    if pol.algorithm is PolicyAlgorithm.ONLINE_DPO and pol.generations_per_prompt != 2:
        log.warning("policy.generationsPerPrompt %d ignored: online DPO samples 2 completions per prompt",
                    pol.generations_per_prompt)


def train_prompts(run: StageRun, spec: RLAIFJobSpec) -> list[list[dict]]:
    """The feedback stage's train prompts, or (without its output) the same split of feedback.prompts."""
    feedback = run.inputs.get(INPUT_FEEDBACK)
    if feedback is not None:
        prompts = read_prompts(feedback, TRAIN)
        if prompts:
            return prompts
    prompts, _ = load_prompts(spec.feedback.prompts, run.data_store)
    return [p for p in prompts if split_of(prompt_id(p), spec.feedback.held_out_fraction) == TRAIN]


def sampling(pol: PolicyStage, length_name: str) -> dict:
    gen = pol.generation
    return {"temperature": gen.temperature, "top_p": gen.top_p, length_name: gen.max_new_tokens}


def build_trainer(run: StageRun, model, tokenizer):
    from datasets import Dataset

    spec: RLAIFJobSpec = run.spec
    pol = spec.policy
    common = {"model": model, "processing_class": tokenizer, "callbacks": list(run.callbacks)}
    if pol.algorithm is PolicyAlgorithm.DPO:
        from trl import DPOConfig, DPOTrainer

        feedback = require_input(run, INPUT_FEEDBACK, "policy.algorithm dpo")
        pairs = read_pairs(feedback, TRAIN)
        if not pairs:
            raise ValueError(f"{feedback}: no train pairs for policy.algorithm dpo")
        args = DPOConfig(**stage_arguments(run, pol.training, beta=pol.kl_coefficient))
        return DPOTrainer(args=args, train_dataset=Dataset.from_list(chat_pairs(pairs)), **common)
    reward_model = str(require_input(run, INPUT_REWARD_MODEL, f"policy.algorithm {pol.algorithm.value}"))
    prompts = Dataset.from_dict({"prompt": train_prompts(run, spec)})
    if pol.algorithm is PolicyAlgorithm.ONLINE_DPO:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(**stage_arguments(run, pol.training, beta=[pol.kl_coefficient], use_vllm=pol.use_vllm,
                                                    **sampling(pol, "max_new_tokens")))
        return OnlineDPOTrainer(reward_funcs=reward_model, args=args, train_dataset=prompts, **common)
    grouped = dict(beta=pol.kl_coefficient, num_generations=pol.generations_per_prompt, use_vllm=pol.use_vllm,
                   **sampling(pol, "max_completion_length"))
    if pol.algorithm is PolicyAlgorithm.RLOO:
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(**stage_arguments(run, pol.training, **grouped))
        return RLOOTrainer(reward_funcs=reward_model, args=args, train_dataset=prompts, **common)
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**stage_arguments(run, pol.training, scale_rewards=SCALE_REWARDS, **grouped))
    return GRPOTrainer(reward_funcs=reward_model, args=args, train_dataset=prompts, **common)


def run(run: StageRun) -> StageResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pol: PolicyStage = run.spec.policy
    check_settings(run, pol)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=load_dtype(run))
    trainer = build_trainer(run, model, tokenizer)
    tracking.rlaif_aliases(trainer)  # rlaif/reward, rlaif/kl, rlaif/response_length whatever the algorithm
    result = trainer.train(resume_from_checkpoint=resume_arg(run))
    save_final(trainer, tokenizer, run)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = {k: v for k, v in (logged[-1] if logged else {}).items()
            if any(word in k for word in ("reward", "kl", "score", "accurac", "margin"))}
    metrics = {"algorithm": pol.algorithm.value, "train_loss": result.training_loss,
               "steps": trainer.state.global_step, "last_log": last}
    log.info("policy: %s", metrics)
    return StageResult(metrics=metrics, model_dir=run.output_dir)
