"""RLAIF reward stage: TRL RewardTrainer (Bradley-Terry) on the feedback stage's train pairs.

The reward model starts from the policy (a sequence-classification head with one label on the same
backbone and tokenizer), so it reads prompts exactly as the policy writes them. After training, the
main process reports pairwise accuracy on the held-out pairs (prompts the reward model never saw) and
on the Arabic culture preference set (assets/culture_preferences.jsonl, or reward.cultureSet).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dhad_api.jobs import RLAIFJobSpec
from dhad_trainer.data.conversations import iter_records
from dhad_trainer.stages.alignment import (
    HELD_OUT,
    INPUT_FEEDBACK,
    TRAIN,
    chat_pairs,
    load_dtype,
    read_pairs,
    require_input,
    resume_arg,
    save_final,
    stage_arguments,
)
from dhad_trainer.stages.base import StageResult, StageRun

log = logging.getLogger("dhad.reward")
CULTURE_SET = Path(__file__).resolve().parents[1] / "assets" / "culture_preferences.jsonl"
EVAL_FILE = "reward_eval.json"


def load_reward_model(path, dtype="auto"):
    """(sequence-classification model with one label, tokenizer), pad token set on both."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def score(model, tokenizer, conversations: list[list[dict]], max_length: int, batch_size: int = 16) -> list[float]:
    """Reward of each conversation, rendered as the trainers render it (chat template, no extra specials)."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    out: list[float] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True, padding_side="right",
                        truncation=True, max_length=max_length, add_special_tokens=False).to(model.device)
        with torch.no_grad():
            out.extend(model(**enc).logits[:, 0].float().tolist())
    return out


def pairwise_accuracy(model, tokenizer, pairs: list[dict], max_length: int) -> float | None:
    """Share of pairs whose chosen response gets the higher reward; None without pairs."""
    if not pairs:
        return None
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], max_length)
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], max_length)
    return sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)


def culture_pairs(run: StageRun, uri: str | None) -> list[dict]:
    """The culture preference set as conversational pairs; rows missing a field are skipped."""
    rows = [r for r in iter_records(uri or str(CULTURE_SET), store=run.data_store if uri else None)
            if isinstance(r, dict) and all(isinstance(r.get(k), str | list) for k in ("prompt", "chosen", "rejected"))]
    return chat_pairs(rows)


def run(run: StageRun) -> StageResult:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    spec: RLAIFJobSpec = run.spec
    rs = spec.reward
    feedback = require_input(run, INPUT_FEEDBACK, "the reward stage")
    train_rows, held_out = read_pairs(feedback, TRAIN), read_pairs(feedback, HELD_OUT)
    if not train_rows:
        raise ValueError(f"{feedback}: no train pairs; the feedback stage kept no pair both judge orders agreed on")
    model, tokenizer = load_reward_model(run.model_dir, load_dtype(run))
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**stage_arguments(run, rs.training, max_length=rs.sequence_length)),
        train_dataset=Dataset.from_list(chat_pairs(train_rows)),
        processing_class=tokenizer,
        callbacks=list(run.callbacks),
    )
    result = trainer.train(resume_from_checkpoint=resume_arg(run))
    save_final(trainer, tokenizer, run)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_pairs": len(train_rows), "heldout_pairs": len(held_out)}
    # Every rank scores the same pairs: under ZeRO-3 and FSDP a forward gathers each layer's parameters
    # from all ranks, so rank 0 alone would wait forever. Rank 0 reports.
    trained = trainer.accelerator.unwrap_model(trainer.model)
    culture = culture_pairs(run, rs.culture_set)
    metrics["heldout_accuracy"] = pairwise_accuracy(trained, tokenizer, chat_pairs(held_out), rs.sequence_length)
    metrics["culture_accuracy"] = pairwise_accuracy(trained, tokenizer, culture, rs.sequence_length)
    metrics["culture_pairs"] = len(culture)
    if run.is_main:
        (run.output_dir / EVAL_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        log.info("reward: %s", metrics)
    return StageResult(metrics=metrics, model_dir=run.output_dir)
