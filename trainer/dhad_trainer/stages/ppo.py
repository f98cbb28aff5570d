"""PPO for the policy sub-stage (policy.algorithm ppo): Dhad's own loop on transformers' Trainer and TRL's parts.

Not a sub-stage of its own: `stages/policy.py` builds `PPOTrainer` the way it builds TRL's trainers. TRL
1.16 has no PPO trainer (it lived in trl.experimental.ppo of TRL 1.10 to 1.12 only), so the rollout,
the advantages and the losses are written here; everything around them is the HF Trainer's: AdamW and
its schedule, DDP and DeepSpeed ZeRO-2/3 through accelerate, gradient accumulation and clipping,
`checkpoint-N` folders (which the runtime's callbacks publish to the object store and resume from),
logs and callbacks. TRL supplies the prompt sampler (`RepeatSampler`), log-softmax (`selective_log_softmax`),
generation under ZeRO-3 (`unwrap_model_for_generation`), frozen-model placement (`prepare_deepspeed`)
and vLLM generation (`VLLMGeneration`, policy.useVllm, when vLLM is installed).

Models (the choice issue 19 asked for):
- policy: the causal LM being trained (LoRA adapters with policy.lora).
- critic: a separate value model initialised from the reward model, as AceGPT's PPO setup (after
  InstructGPT) has it: the reward model's backbone and score head give a value for every prefix, so
  value estimates start from the reward model's judgement instead of from noise, and the policy and
  value losses do not pull one backbone two ways. It must share the policy's tokenizer (the reward
  stage trains its model from the policy, so it does). With a reward function instead of a model
  (tests), the critic starts from the policy's weights with a fresh score head.
- reference: the frozen starting policy; with LoRA, the policy with its adapters off (one copy of weights).
- reward: the frozen reward model; with LoRA, the critic with its adapters off (one copy of weights).
Policy and critic are one module (`PolicyAndCritic`) under one optimizer, so one DeepSpeed engine and
one checkpoint hold both.

Placement: the trained module (weights, gradients, optimizer states) is what DDP replicates and what
ZeRO-2 (gradients, optimizer states) or ZeRO-3 (also weights) partition across all ranks. The separate
frozen models (reference and reward without LoRA) are DeepSpeed inference engines of the job's stage
under ZeRO-3 (`prepare_deepspeed`: partitioned across all ranks like the trained module, gathered layer
by layer in each forward) and whole copies on every rank, in the job's dtype and without gradients or
optimizer states, under ZeRO-2 and DDP. For a rollout's generation the trained module is gathered
whole on every rank (TRL's `unwrap_model_for_generation`) and partitioned again afterwards.

One rollout, then epochs x miniBatches optimizer steps on it:
1. Each process takes microBatchSize x gradientAccumulationSteps x ppo.miniBatches prompts (the
   dataloader's batch; the sampler hands the same batch to every micro-step of the rollout).
2. One completion per prompt is sampled from the policy (policy.generation), cut after its first EOS.
3. The reward model scores the chat-rendered prompt + completion; the policy (old), the reference and
   the critic give per-token log-probabilities and values (logits divided by the sampling temperature).
4. Per-token reward: -beta x (logp - logp_ref) on every response token, plus the score on the last.
   beta is policy.klCoefficient, or adaptive with ppo.klTarget (the proportional controller of Ziegler
   et al. 2019, fed the rollout's mean KL per response over all processes).
5. GAE (ppo.gamma, ppo.lam) backwards over the response gives advantages and returns; advantages are
   whitened over the whole rollout of all processes (rewards too with ppo.whitenRewards).
6. ppo.epochs passes over the rollout, each in a fresh order, ppo.miniBatches optimizer steps per pass:
   clipped policy loss (ppo.clipRange) + ppo.valueCoefficient x clipped value loss (ppo.valueClipRange).
Dropout is off in policy and critic, so the rollout's log-probabilities are the ones training starts from.
maxSteps counts optimizer steps. A checkpoint saved in the middle of a rollout resumes by sampling that
rollout again from the restored policy (as TRL's GRPO does); the KL coefficient is saved with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer

from dhad_api.stages import PPO, Generation

log = logging.getLogger("dhad.ppo")
STATE_FILE = "ppo_state.json"  # in each checkpoint-N: what the Trainer's own state does not hold
PARTS = ("policy", "critic")

# A reward function takes the prompts (chat turns) and the completions (one assistant turn each, TRL's
# conversational form) and returns one float per completion.
RewardFunction = Callable[..., Sequence[float]]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding (transformers counts from the first column otherwise)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def base_of(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (adapters stay injected in its layers)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapters_off(model: nn.Module):
    """Context in which a peft model runs as its base; a plain model needs none."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


class PolicyAndCritic(nn.Module):
    """The trained module: one forward gives the policy's logits and the critic's values for the last
    `keep` positions (the response, one position shifted, as next-token logits are)."""

    def __init__(self, policy: nn.Module, critic: nn.Module) -> None:
        super().__init__()
        self.policy, self.critic = policy, critic
        self.config = base_of(policy).config  # what the Trainer and DeepSpeed's "auto" sizes read

    def forward(self, input_ids, attention_mask, keep: int):
        ids = positions(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=ids,
                             logits_to_keep=keep, use_cache=False).logits
        return logits, self.values(input_ids, attention_mask, ids, keep)

    def values(self, input_ids, attention_mask, position_ids, keep: int) -> torch.Tensor:
        critic = base_of(self.critic)
        backbone = getattr(critic, critic.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return critic.score(hidden[:, -keep:]).squeeze(-1).float()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(base_of(self.policy), "is_gradient_checkpointing", False))

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        for part in (self.policy, self.critic):
            part.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self):
        for part in (self.policy, self.critic):
            part.gradient_checkpointing_disable()


@dataclass
class Frozen:
    """Where the reference and the reward come from: a separate frozen model, or the trained one with its
    adapters off (LoRA), or (reward only) a function."""

    reference: nn.Module | None  # None: the policy with its adapters off
    reward_model: nn.Module | None  # None with a function: reward_function; None without: the critic, adapters off
    reward_function: RewardFunction | None = None


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) by generalised advantage estimation over the response tokens. Values and
    rewards after a response's end are zero, so its last token bootstraps from nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
           shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries of every process (`reduce` sums a tensor over processes)."""
    sums = reduce(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double())
    mean = sums[0] / sums[2].clamp(min=1)
    var = (sums[1] / sums[2].clamp(min=1) - mean * mean).clamp(min=0)
    var = var * sums[2] / (sums[2] - 1).clamp(min=1)  # unbiased, as torch.var
    out = (x - mean.to(x.dtype)) * torch.rsqrt(var.to(x.dtype) + 1e-8)
    if not shift_mean:
        out = out + mean.to(x.dtype)
    return out * mask


def ppo_losses(logp: torch.Tensor, values: torch.Tensor, batch: dict, clip: float, value_clip: float):
    """(policy loss, value loss, stats) of one micro-batch: PPO's clipped surrogate and clipped value loss."""
    mask, advantages, returns = batch["mask"], batch["advantages"], batch["returns"]
    ratio = torch.exp(logp - batch["logp"])
    policy_loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip)), mask)
    clipped = batch["values"] + (values - batch["values"]).clamp(-value_clip, value_clip)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)
    stats = {
        "clip_fraction": masked_mean(((ratio - 1).abs() > clip).float(), mask),
        "value_clip_fraction": masked_mean(((values - batch["values"]).abs() > value_clip).float(), mask),
        "approx_kl": masked_mean(0.5 * (logp - batch["logp"]) ** 2, mask),  # old policy -> new, this epoch
    }
    return policy_loss, value_loss, stats


class AdaptiveKL:
    """beta moves by at most 20% x n/horizon per update, toward keeping the KL per response at `target`."""

    def __init__(self, value: float, target: float | None, horizon: int) -> None:
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n / self.horizon


class PPOTrainer(Trainer):
    """The HF Trainer, with PPO's rollout as its input step and PPO's losses as its loss."""

    def __init__(self, *, model: PolicyAndCritic, frozen: Frozen, ppo: PPO, generation: Generation,
                 kl_coefficient: float, reward_max_length: int, use_vllm: bool = False, **kwargs) -> None:
        from trl.trainer.utils import disable_dropout_in_model, identity

        args = kwargs["args"]
        args.remove_unused_columns = False
        for part in (model.policy, model.critic):
            disable_dropout_in_model(part)
        super().__init__(model=model, data_collator=identity, **kwargs)
        self.model_accepts_loss_kwargs = False  # the Trainer divides the loss by the accumulation steps
        self.ppo, self.generation = ppo, generation
        self.kl = AdaptiveKL(kl_coefficient, ppo.kl_target, ppo.kl_horizon)
        self.reward_max_length = reward_max_length
        self.frozen = Frozen(self._place(frozen.reference), self._place(frozen.reward_model), frozen.reward_function)
        micro, accumulation = args.per_device_train_batch_size, args.gradient_accumulation_steps
        self.micro_steps_per_pass = accumulation * ppo.mini_batches
        self.micro_steps_per_rollout = self.micro_steps_per_pass * ppo.epochs
        self.rollout_size = micro * self.micro_steps_per_pass  # prompts per process
        self.stop_ids = stop_token_ids(base_of(model.policy), self.processing_class)
        self._vllm = self._vllm_generation() if use_vllm else None
        self._micro: int | None = None
        self._buffer: dict | None = None
        self._orders: list[torch.Tensor] = []
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.history: list[dict] = []  # one row per rollout, for the stage's report

    # --- placement and data -------------------------------------------------------------------------

    def _place(self, model: nn.Module | None):
        """A frozen model where the trained one lives: a ZeRO-3 inference engine, or a whole copy per device."""
        if model is None:
            return None
        model.requires_grad_(False)
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(model, self.accelerator)
        return self.accelerator.prepare_model(model, evaluation_mode=True)

    def _vllm_generation(self):
        from trl.generation.vllm_generation import VLLMGeneration

        gen = self.generation
        return VLLMGeneration(self.accelerator.unwrap_model(self.model).policy, self.accelerator, self.processing_class,
                              mode="colocate", temperature=gen.temperature, top_p=gen.top_p,
                              max_completion_length=gen.max_new_tokens)

    def _get_train_sampler(self, dataset=None):
        from trl.trainer.utils import RepeatSampler

        class EpochSeeded(RepeatSampler):
            """TRL's sampler, its order a function of (seed, epoch): a resumed run, which skips the epochs done
            without iterating them, draws the prompts the first attempt drew."""

            def set_epoch(self, epoch: int) -> None:
                self.generator.manual_seed(self.seed + epoch)

        dataset = dataset if dataset is not None else self.train_dataset
        return EpochSeeded(dataset, mini_repeat_count=1, batch_size=self.rollout_size * self.args.world_size,
                           repeat_count=self.micro_steps_per_rollout, shuffle=True, seed=self.args.seed)

    def get_train_dataloader(self):
        return self._get_dataloader(dataset=self.train_dataset, description="Training", batch_size=self.rollout_size,
                                    sampler_fn=self._get_train_sampler, is_training=True)

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt"]

    # --- the rollout --------------------------------------------------------------------------------

    def _prepare_inputs(self, batch):
        """The micro-batch this micro-step trains on; a new rollout at the start of each rollout's steps."""
        if self._micro is None:  # a resumed run starts its count at the restored step
            self._micro = self.state.global_step * self.args.gradient_accumulation_steps
        rollout, phase = divmod(self._micro, self.micro_steps_per_rollout)
        if phase == 0 or self._buffer is None:
            self._buffer = self.rollout([row["prompt"] for row in batch], rollout)
            generator = torch.Generator().manual_seed(self.args.seed * 1_000_003 + rollout * 8191 + self.args.process_index)
            self._orders = [torch.randperm(self.rollout_size, generator=generator) for _ in range(self.ppo.epochs)]
        epoch, within = divmod(phase, self.micro_steps_per_pass)
        micro = self.args.per_device_train_batch_size
        index = self._orders[epoch][within * micro:(within + 1) * micro].to(self.args.device)
        self._micro += 1
        return {k: v[index] for k, v in self._buffer.items()}

    @torch.no_grad()
    def rollout(self, prompts: list, number: int) -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        tokenizer, device = self.processing_class, self.args.device
        texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
        enc = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False,  # the template has them
                        return_tensors="pt").to(device)
        torch.manual_seed(self.args.seed + 7919 * number + self.args.process_index)  # a resumed rollout samples alike
        response = self._generate(enc)
        mask = response_mask(response, self.stop_ids)
        response = response.masked_fill(mask == 0, tokenizer.pad_token_id)
        sequences = torch.cat([enc["input_ids"], response], dim=1)
        attention = torch.cat([enc["attention_mask"], mask], dim=1)
        keep = response.shape[1] + 1
        old_logp, values = self._logp_and_values(sequences, attention, response, keep)
        ref_logp = self._reference_logp(sequences, attention, response, keep)
        texts = tokenizer.batch_decode(response, skip_special_tokens=True)
        scores = self._scores(prompts, texts).to(device)
        maskf = mask.float()
        kl = (old_logp - ref_logp) * maskf
        rewards = -self.kl.value * kl
        last = (mask.sum(1) - 1).clamp(min=0)
        rewards[torch.arange(len(prompts), device=device), last] += scores
        reduce = self._sum_over_processes
        if self.ppo.whiten_rewards:
            rewards = whiten(rewards, maskf, reduce, shift_mean=False)
        advantages, returns = gae(rewards, values, maskf, self.ppo.gamma, self.ppo.lam)
        advantages = whiten(advantages, maskf, reduce)
        self._record(number, scores, kl, mask, attention, rollout_seconds=time.perf_counter() - started,
                     digest=digest(enc["input_ids"]) + ":" + digest(response))
        self.accelerator.unwrap_model(self.model).train()
        return {"sequences": sequences, "attention": attention, "response": response, "mask": maskf,
                "logp": old_logp, "values": values * maskf, "advantages": advantages, "returns": returns}

    def _generate(self, enc) -> torch.Tensor:
        gen = self.generation
        if self._vllm is not None:
            from trl.trainer.utils import pad

            self._vllm.sync_weights()
            ids = [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"], strict=True)]
            _, completions, _, _ = self._vllm.generate(ids, None, num_generations=1)
            tensors = [torch.tensor(c or [self.processing_class.pad_token_id], device=self.args.device) for c in completions]
            return pad(tensors, padding_value=self.processing_class.pad_token_id)
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(self.model_wrapped, self.accelerator) as unwrapped:
            out = unwrapped.policy.generate(**enc, do_sample=True, temperature=gen.temperature, top_p=gen.top_p,
                                            max_new_tokens=gen.max_new_tokens, eos_token_id=self.stop_ids,
                                            pad_token_id=self.processing_class.pad_token_id)
        return out[:, enc["input_ids"].shape[1]:]

    def _token_logp(self, logits: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        from trl.trainer.utils import selective_log_softmax

        return selective_log_softmax(logits[:, :-1].float() / self.generation.temperature, response)

    def _logp_and_values(self, sequences, attention, response, keep):
        logits, values = self.model_wrapped(input_ids=sequences, attention_mask=attention, keep=keep)
        return self._token_logp(logits, response), values[:, :-1]

    def _reference_logp(self, sequences, attention, response, keep) -> torch.Tensor:
        if self.frozen.reference is not None:
            model = self.frozen.reference
            logits = model(input_ids=sequences, attention_mask=attention, position_ids=positions(attention),
                           logits_to_keep=keep, use_cache=False).logits
            return self._token_logp(logits, response)
        policy = self.accelerator.unwrap_model(self.model).policy
        with adapters_off(policy):
            logits = policy(input_ids=sequences, attention_mask=attention, position_ids=positions(attention),
                            logits_to_keep=keep, use_cache=False).logits
        return self._token_logp(logits, response)

    def _scores(self, prompts: list, texts: list[str]) -> torch.Tensor:
        completions = [[{"role": "assistant", "content": t}] for t in texts]
        if self.frozen.reward_function is not None:
            values = self.frozen.reward_function(prompts=prompts, completions=completions)
            return torch.tensor([float(v) for v in values], dtype=torch.float32)
        from dhad_trainer.stages.reward import score

        conversations = [list(p) + c for p, c in zip(prompts, completions, strict=True)]
        if self.frozen.reward_model is not None:
            return torch.tensor(score(self.frozen.reward_model, self.processing_class, conversations,
                                      self.reward_max_length))
        critic = self.accelerator.unwrap_model(self.model).critic
        with adapters_off(critic):
            return torch.tensor(score(critic, self.processing_class, conversations, self.reward_max_length))

    def _sum_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t.to(self.args.device), reduction="sum") if self.args.world_size > 1 else t

    def _record(self, number, scores, kl, mask, attention, rollout_seconds, digest: str) -> None:
        """The rollout's figures over all processes; the KL controller moves on the global mean."""
        gather = self.accelerator.gather
        all_scores = gather(scores.float())
        lengths = gather(mask.sum(1).float())
        kl_per_response = gather(kl.sum(1))
        tokens = int(gather(attention.sum().reshape(1)).sum())
        per_token_kl = float(kl_per_response.sum() / lengths.sum().clamp(min=1))
        self.state.num_input_tokens_seen += tokens
        figures = {"reward": float(all_scores.mean()), "reward_std": float(all_scores.std()) if len(all_scores) > 1 else 0.0,
                   "kl": per_token_kl, "kl/sequence": float(kl_per_response.mean()),
                   "completions/mean_length": float(lengths.mean()), "kl_coefficient": self.kl.value,
                   "rollout/generated_tokens_per_second": float(lengths.sum()) / max(rollout_seconds, 1e-9)}
        for k, v in figures.items():
            self._metrics[k].append(v)
        self.history.append({"rollout": number, "step": self.state.global_step, **figures, "digest": digest})
        self.kl.update(float(kl_per_response.mean()), len(kl_per_response))

    # --- the loss ----------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        keep = inputs["response"].shape[1] + 1
        logits, values = model(input_ids=inputs["sequences"], attention_mask=inputs["attention"], keep=keep)
        logp = self._token_logp(logits, inputs["response"])
        policy_loss, value_loss, stats = ppo_losses(logp, values[:, :-1], inputs, self.ppo.clip_range,
                                                    self.ppo.value_clip_range)
        loss = policy_loss + self.ppo.value_coefficient * value_loss
        for name, value in {"policy_loss": policy_loss, "value_loss": value_loss, **stats}.items():
            self._metrics[name].append(float(self.accelerator.gather(value.detach().reshape(1)).mean()))
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update({k: sum(v) / len(v) for k, v in self._metrics.items() if v})
        self._metrics.clear()
        super().log(logs, start_time)

    # --- checkpoints -------------------------------------------------------------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """policy/ and critic/ as their own save_pretrained folders (peft: adapters only), tokenizer beside."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        module = self.accelerator.unwrap_model(self.model)
        state_dict = module.state_dict() if state_dict is None else state_dict
        for name in PARTS:
            sub = {k[len(name) + 1:]: v for k, v in state_dict.items() if k.startswith(name + ".")}
            getattr(module, name).save_pretrained(os.path.join(output_dir, name), state_dict=sub)
        self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        module = self.accelerator.unwrap_model(model if model is not None else self.model)
        for name in PARTS:
            load_part(getattr(module, name), Path(resume_from_checkpoint) / name)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (folder / STATE_FILE).write_text(json.dumps({"kl_coefficient": self.kl.value}), encoding="utf-8")

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint:
            saved = Path(resume_from_checkpoint) / STATE_FILE
            if saved.is_file():
                self.kl.value = json.loads(saved.read_text(encoding="utf-8"))["kl_coefficient"]
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def digest(*tensors: torch.Tensor) -> str:
    """A short hash of this process's prompts and samples: a resumed rollout can be told from a new one."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def stop_token_ids(policy, tokenizer) -> list[int]:
    """Every token that ends a response: the generation config's EOS ids and the tokenizer's."""
    configured = getattr(policy.generation_config, "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def response_mask(response: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including each row's first stop token (or through the end), 0 after it."""
    stops = torch.isin(response, torch.tensor(list(stop_ids), device=response.device))
    after = (stops.long().cumsum(1) - stops.long()) > 0  # strictly after the first stop
    return (~after).long()


def load_part(part: nn.Module, folder: Path) -> None:
    """Weights saved by `PPOTrainer._save` back into `part` (peft: its adapters; else every shard)."""
    from safetensors.torch import load_file

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not in the checkpoint (saved by PPOTrainer?)")
    if hasattr(part, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(part, load_file(str(folder / "adapter_model.safetensors")))
        return
    missing = set(part.state_dict())
    for shard in sorted(folder.glob("*.safetensors")):
        weights = load_file(str(shard))
        unexpected = part.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"{shard}: weights the model does not have: {unexpected[:5]}")
        missing -= set(weights)
    tied = {k for k in missing if any(t in k for t in (getattr(part, "_tied_weights_keys", None) or {}))}
    if missing - tied:
        raise ValueError(f"{folder}: checkpoint lacks {sorted(missing - tied)[:5]}")
