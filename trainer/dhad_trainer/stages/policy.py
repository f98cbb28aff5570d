"""RLAIF policy stage: optimise the policy against the reward model (or on the judged pairs, for DPO).

- ppo: Dhad's PPO loop (stages/ppo.py) on the HF Trainer: a critic initialised from the reward model,
  per-token KL penalty to the frozen reference (fixed, or adaptive with ppo.klTarget), GAE, whitened
  advantages, clipped policy and value losses, ppo.epochs passes of ppo.miniBatches steps per rollout.
- grpo (default): TRL GRPOTrainer; the reward model folder is the reward function (TRL loads it as a
  sequence-classification model and scores the chat-rendered prompt + completion). Rewards are
  normalised per prompt group (`scale_rewards="group"`; the API has no field for it yet).
- rloo: TRL RLOOTrainer, same reward model, leave-one-out baseline.
- online-dpo: trl.experimental OnlineDPOTrainer; it samples two completions per prompt and lets the
  reward model pick, so generationsPerPrompt does not apply.
- dpo: TRL DPOTrainer on the feedback stage's train pairs (offline, no reward model).

klCoefficient maps to beta, generationsPerPrompt to num_generations, generation to the sampling
settings. policy.lora trains adapters (peft) on the policy: the reference is then the policy with its
adapters off (TRL does the same for its trainers), so one copy of the weights serves both; the final
model is merged unless lora.merge is false. useVllm generates rollouts with vLLM (TRL's colocated
engine), refused before any compute where vLLM is not installed or there is no GPU. Settings that
cannot work are refused before any model is loaded.

Every algorithm leaves `policy_report.json` beside the model: per logged step the reward mean and std,
the KL to the reference per response token, the response length and tokens/s (the same figures reach
the job's progress through the runtime's callbacks), and the first and last steps' means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable

from transformers import TrainerCallback

from dhad_api.jobs import RLAIFJobSpec
from dhad_api.stages import Lora, PolicyAlgorithm, PolicyStage
from dhad_trainer.data.conversations import load_prompts
from dhad_trainer.runtime import tracking
from dhad_trainer.stages.alignment import (
    INPUT_FEEDBACK,
    INPUT_REWARD_MODEL,
    TRAIN,
    barrier,
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
SAMPLED = (PolicyAlgorithm.PPO, PolicyAlgorithm.GRPO, PolicyAlgorithm.RLOO, PolicyAlgorithm.ONLINE_DPO)
REPORT_FILE = "policy_report.json"
FIGURE_KEYS = {"reward": "reward", "reward_std": "reward_std", "kl": "kl", "completions/mean_length": "response_length"}
RewardFunction = Callable[..., list[float]]  # TRL's reward-function form: (prompts, completions, **kw) -> floats


def vllm_available() -> bool:
    from trl.import_utils import is_vllm_available

    return is_vllm_available()


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
        raise ValueError(f"policy.generation.temperature is 0: {pol.algorithm.value} needs sampled completions "
                         "(greedy decoding explores nothing and makes a group's completions identical)")
    if pol.use_vllm and run.use_cpu:
        raise ValueError("policy.useVllm needs GPUs; this run is on CPU")
    if pol.use_vllm and not vllm_available():
        raise ValueError("policy.useVllm is true but vLLM is not installed in this trainer image (the 'gpu' extra)")
    if pol.use_vllm and pol.algorithm is PolicyAlgorithm.DPO:
        raise ValueError("policy.useVllm does not apply to policy.algorithm dpo, which generates nothing")
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


def lora_config(lora: Lora, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.target_modules), task_type=task_type)


def reward_source(run: StageRun, reward_function: RewardFunction | None):
    """The reward function (tests, rule-based rewards), else the reward model folder."""
    if reward_function is not None:
        return reward_function
    return str(require_input(run, INPUT_REWARD_MODEL, f"policy.algorithm {run.spec.policy.algorithm.value}"))


def build_trainer(run: StageRun, model, tokenizer, reward_function: RewardFunction | None = None):
    """A TRL trainer for grpo, rloo, online-dpo and dpo (ppo: `build_ppo`)."""
    from datasets import Dataset

    spec: RLAIFJobSpec = run.spec
    pol = spec.policy
    common = {"model": model, "processing_class": tokenizer, "callbacks": list(run.callbacks),
              "peft_config": lora_config(pol.lora) if pol.lora else None}
    if pol.algorithm is PolicyAlgorithm.DPO:
        from trl import DPOConfig, DPOTrainer

        feedback = require_input(run, INPUT_FEEDBACK, "policy.algorithm dpo")
        pairs = read_pairs(feedback, TRAIN)
        if not pairs:
            raise ValueError(f"{feedback}: no train pairs for policy.algorithm dpo")
        args = DPOConfig(**stage_arguments(run, pol.training, beta=pol.kl_coefficient))
        return DPOTrainer(args=args, train_dataset=Dataset.from_list(chat_pairs(pairs)), **common)
    rewards = reward_source(run, reward_function)
    prompts = Dataset.from_dict({"prompt": train_prompts(run, spec)})
    if pol.algorithm is PolicyAlgorithm.ONLINE_DPO:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        args = OnlineDPOConfig(**stage_arguments(run, pol.training, beta=[pol.kl_coefficient], use_vllm=pol.use_vllm,
                                                    **sampling(pol, "max_new_tokens")))
        return OnlineDPOTrainer(reward_funcs=rewards, args=args, train_dataset=prompts, **common)
    grouped = dict(beta=pol.kl_coefficient, num_generations=pol.generations_per_prompt, use_vllm=pol.use_vllm,
                   **sampling(pol, "max_completion_length"))
    if pol.algorithm is PolicyAlgorithm.RLOO:
        from trl import RLOOConfig, RLOOTrainer

        args = RLOOConfig(**stage_arguments(run, pol.training, **grouped))
        return RLOOTrainer(reward_funcs=rewards, args=args, train_dataset=prompts, **common)
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(**stage_arguments(run, pol.training, scale_rewards=SCALE_REWARDS, **grouped))
    return GRPOTrainer(reward_funcs=rewards, args=args, train_dataset=prompts, **common)


def check_same_vocabulary(reward_dir, tokenizer) -> None:
    """PPO's critic reads the policy's tokens, so a reward model it starts from must share the vocabulary."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(reward_dir)
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"policy.rewardModel ({reward_dir}) has another vocabulary than the policy "
                         f"({len(theirs)} vs {len(tokenizer)} tokens): ppo's critic starts from the reward model "
                         "and reads the policy's tokens; use a reward model trained from the policy (the reward sub-stage's)")


def build_ppo(run: StageRun, tokenizer, reward_function: RewardFunction | None = None):
    """PPOTrainer with its four roles placed (see stages/ppo.py). The arguments exist before any model is
    loaded, so under ZeRO-3 every model is built partitioned (zero.Init) instead of whole on each rank."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainingArguments

    from dhad_trainer.stages.ppo import Frozen, PolicyAndCritic, PPOTrainer
    from dhad_trainer.stages.reward import load_reward_model

    spec: RLAIFJobSpec = run.spec
    pol = spec.policy
    prompts = train_prompts(run, spec)
    t = pol.training
    needed = t.micro_batch_size * t.gradient_accumulation_steps * pol.ppo.mini_batches * run.world_size
    if len(prompts) < needed:
        raise ValueError(f"policy: a ppo rollout takes {needed} prompts (microBatchSize x gradientAccumulationSteps x "
                         f"ppo.miniBatches x {run.world_size} processes) but there are {len(prompts)} train prompts")
    reward_dir = None if reward_function is not None else reward_source(run, None)
    if reward_dir is not None:
        check_same_vocabulary(reward_dir, tokenizer)
    args = TrainingArguments(**stage_arguments(run, t, remove_unused_columns=False))
    dtype = load_dtype(run)
    policy = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=dtype)
    critic, _ = load_reward_model(reward_dir or run.model_dir, dtype)
    reference = reward_model = None
    if pol.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, lora_config(pol.lora))
        critic = get_peft_model(critic, lora_config(pol.lora, "SEQ_CLS"))  # the score head is trained whole
    else:
        reference = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=dtype)
        if reward_dir is not None:
            reward_model, _ = load_reward_model(reward_dir, dtype)
    return PPOTrainer(
        model=PolicyAndCritic(policy, critic), frozen=Frozen(reference, reward_model, reward_function), ppo=pol.ppo,
        generation=pol.generation, kl_coefficient=pol.kl_coefficient, reward_max_length=spec.reward.sequence_length,
        use_vllm=pol.use_vllm, args=args, train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer, callbacks=list(run.callbacks))


@contextlib.contextmanager
def whole_weights():
    """Load a model whole on this process even while a ZeRO-3 config is registered (from_pretrained would
    build it partitioned, with empty tensors, under zero.Init)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def save_policy(trainer, tokenizer, run: StageRun, prefix: str, lora: Lora | None) -> None:
    """The policy as a plain causal LM (LoRA merged unless lora.merge is false): every rank takes part in
    gathering the weights (ZeRO-3 partitions them), rank 0 loads them into a fresh copy and writes it."""
    from transformers import AutoModelForCausalLM

    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if run.is_main:
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        with whole_weights():
            model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=load_dtype(run))
        if lora is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(lora))
        result = model.load_state_dict(weights, strict=False)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        lost = [k for k in result.missing_keys if k not in tied]
        if result.unexpected_keys or (lost and lora is None):
            raise RuntimeError(f"policy weights do not fit the model: missing {lost[:5]}, unexpected {result.unexpected_keys[:5]}")
        if lora is not None and lora.merge:
            model = model.merge_and_unload()
        model.save_pretrained(run.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(run.output_dir)
    barrier(run)


class Figures(TrainerCallback):
    """Per logged step: reward mean and std, KL, response length and tokens/s (over all processes, since
    the last log), for the report. Adds tokens_per_second to the logs the progress callback sees."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.monotonic(), int(state.num_input_tokens_seen or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "reward" not in logs:
            return
        now, tokens = time.monotonic(), int(state.num_input_tokens_seen or 0)
        t0, k0 = self._last or (now, tokens)
        self._last = (now, tokens)
        rate = round((tokens - k0) / (now - t0), 1) if now > t0 and tokens > k0 else None
        if rate is not None:
            logs.setdefault("tokens_per_second", rate)
        row = {"step": state.global_step, **{name: logs[key] for key, name in FIGURE_KEYS.items() if key in logs},
               "tokens_per_second": rate}
        self.rows.append(row)


def summary(rows: list[dict], window: int = 3) -> dict:
    """Means of the first and last `window` logged steps (the report's headline)."""
    def mean(part: list[dict], key: str):
        values = [r[key] for r in part if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    first, last = rows[:window], rows[-window:]
    return {f"{which}_{key}": mean(part, key) for which, part in (("first", first), ("last", last))
            for key in ("reward", "reward_std", "kl", "response_length", "tokens_per_second")} | {"summary_window": window}


def run(run: StageRun, reward_function: RewardFunction | None = None) -> StageResult:
    """`reward_function` replaces the reward model (tests; TRL's reward-function form)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pol: PolicyStage = run.spec.policy
    check_settings(run, pol)
    tokenizer = AutoTokenizer.from_pretrained(run.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    figures = Figures()
    run = dataclasses.replace(run, callbacks=[figures, *run.callbacks])  # first: progress sees tokens_per_second
    if pol.algorithm is PolicyAlgorithm.PPO:
        trainer = build_ppo(run, tokenizer, reward_function)
    else:
        model = AutoModelForCausalLM.from_pretrained(run.model_dir, dtype=load_dtype(run))
        trainer = build_trainer(run, model, tokenizer, reward_function)
    tracking.rlaif_aliases(trainer)  # rlaif/reward, rlaif/kl, rlaif/response_length whatever the algorithm
    tracking.integrations_last(trainer)  # and tokens_per_second, from the progress callback
    result = trainer.train(resume_from_checkpoint=resume_arg(run))
    if pol.algorithm is PolicyAlgorithm.PPO:
        save_policy(trainer, tokenizer, run, "policy.", pol.lora)
    elif pol.lora is not None:
        save_policy(trainer, tokenizer, run, "", pol.lora)
    else:
        save_final(trainer, tokenizer, run)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = {k: v for k, v in (logged[-1] if logged else {}).items()
            if any(word in k for word in ("reward", "kl", "score", "accurac", "margin"))}
    metrics = {"algorithm": pol.algorithm.value, "train_loss": result.training_loss,
               "steps": trainer.state.global_step, "last_log": last, **summary(figures.rows)}
    if run.is_main:
        report = {"algorithm": pol.algorithm.value, "steps": trainer.state.global_step, "lora": pol.lora is not None,
                  "per_step": figures.rows, "rollouts": getattr(trainer, "history", None), "summary": summary(figures.rows)}
        (run.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=1), encoding="utf-8")
    log.info("policy: %s", metrics)
    return StageResult(metrics=metrics, model_dir=run.output_dir)
