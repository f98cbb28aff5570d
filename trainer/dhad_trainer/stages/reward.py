"""RLAIF reward stage: TRL RewardTrainer (Bradley-Terry) on the feedback stage's train pairs.

The reward model starts from the policy (a sequence-classification head with one label on the same
backbone and tokenizer), so it reads prompts exactly as the policy writes them. After training, the
main process writes reward_eval.json (`reward_report`):
- heldout_accuracy: pairwise accuracy on the held-out AI-labelled pairs (prompts it never saw);
- culture_*: the Arabic culture and values preference set (assets/culture_preferences.jsonl, see
  assets/README.md, or reward.cultureSet): accuracy overall and per topic, each pair scored in both
  orders (chosen first and second in its batch; a pair counts only if the chosen answer wins both
  times), the agreement of the two orders, the accuracy a "longer answer wins" rule would get, and
  the accuracy on the pairs whose rejected answer is the longer one (where length alone fails);
- acva (with reward.benchmarks): each ACVA statement as a preference between its affirmation and its
  negation; macro-F1 and accuracy overall and per topic, as the EvalJob reports ACVA.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dhad_api.jobs import RLAIFJobSpec
from dhad_trainer.data.conversations import iter_records
from dhad_trainer.runtime import tracking
from dhad_trainer.stages.alignment import (
    HELD_OUT,
    INPUT_FEEDBACK,
    STATS_FILE,
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
UNLABELLED = "unlabelled"
ACVA_QUESTION = "هل العبارة التالية صحيحة؟\n{statement}"
AFFIRM, NEGATE = "نعم، هذه العبارة صحيحة.", "لا، هذه العبارة غير صحيحة."


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
    """The culture preference set as conversational pairs with their topic; rows missing a field are skipped."""
    rows = [r for r in iter_records(uri or str(CULTURE_SET), store=run.data_store if uri else None)
            if isinstance(r, dict) and all(isinstance(r.get(k), str | list) for k in ("prompt", "chosen", "rejected"))]
    return [{**pair, "topic": str(row.get("topic") or UNLABELLED), "id": row.get("id")}
            for pair, row in zip(chat_pairs(rows), rows, strict=True)]


def pair_scores(model, tokenizer, pairs: list[dict], max_length: int, chosen_first: bool) -> list[tuple[float, float]]:
    """(chosen, rejected) rewards, each pair's two conversations side by side in a batch, in the given order."""
    conversations = []
    for p in pairs:
        both = [p["prompt"] + p["chosen"], p["prompt"] + p["rejected"]]
        conversations.extend(both if chosen_first else both[::-1])
    flat = score(model, tokenizer, conversations, max_length)
    return [(flat[2 * i], flat[2 * i + 1]) if chosen_first else (flat[2 * i + 1], flat[2 * i]) for i in range(len(pairs))]


def response_tokens(tokenizer, turns: list[dict]) -> int:
    return sum(len(tokenizer(t["content"], add_special_tokens=False)["input_ids"]) for t in turns)


def culture_report(model, tokenizer, pairs: list[dict], max_length: int) -> dict:
    """Accuracy on the culture set, per topic, in both orders, beside what answer length alone would get."""
    if not pairs:
        return {"culture_accuracy": None, "culture_pairs": 0}
    first = pair_scores(model, tokenizer, pairs, max_length, chosen_first=True)
    second = pair_scores(model, tokenizer, pairs, max_length, chosen_first=False)
    won = [c1 > r1 and c2 > r2 for (c1, r1), (c2, r2) in zip(first, second, strict=True)]
    same = [(c1 > r1) == (c2 > r2) for (c1, r1), (c2, r2) in zip(first, second, strict=True)]
    longer = [response_tokens(tokenizer, p["chosen"]) > response_tokens(tokenizer, p["rejected"]) for p in pairs]
    topics: dict[str, list[bool]] = {}
    for p, w in zip(pairs, won, strict=True):
        topics.setdefault(p["topic"], []).append(w)
    reversed_won = [w for w, chosen_longer in zip(won, longer, strict=True) if not chosen_longer]
    return {
        "culture_accuracy": sum(won) / len(pairs),
        "culture_pairs": len(pairs),
        "culture_order_agreement": sum(same) / len(pairs),
        "culture_margin_mean": sum(c - r for c, r in first) / len(pairs),
        "culture_longer_answer_baseline": sum(longer) / len(pairs),
        "culture_length_reversed": {"pairs": len(reversed_won),
                                    "accuracy": sum(reversed_won) / len(reversed_won) if reversed_won else None},
        "culture_by_topic": {t: {"pairs": len(w), "accuracy": sum(w) / len(w)} for t, w in sorted(topics.items())},
    }


def acva_report(model, tokenizer, items, max_length: int) -> dict:
    """ACVA on the reward model: for each statement, does it prefer the affirmation or the negation? Scored
    with the EvalJob's metrics (macro-F1 over نعم/لا pooled over topics, accuracy, per topic)."""
    from dhad_trainer.evaluation.loaders import NO, YES
    from dhad_trainer.evaluation.metrics import Outcome, acva_summary

    if not items:
        return {"items": 0}
    asked = [[{"role": "user", "content": ACVA_QUESTION.format(statement=it.question)}] for it in items]
    yes = score(model, tokenizer, [a + [{"role": "assistant", "content": AFFIRM}] for a in asked], max_length)
    no = score(model, tokenizer, [a + [{"role": "assistant", "content": NEGATE}] for a in asked], max_length)
    outcomes = [Outcome(it.id, it.answer, YES if y > n else NO, group=it.subject)
                for it, y, n in zip(items, yes, no, strict=True)]
    summary = acva_summary(outcomes)
    return {"items": len(items), "macro_f1": summary["macro_f1"], "accuracy": summary["accuracy"],
            "predicted_yes_share": sum(o.pred == YES for o in outcomes) / len(outcomes),
            "gold_yes_share": sum(o.gold == YES for o in outcomes) / len(outcomes),
            "affirmation": AFFIRM, "negation": NEGATE, "question": ACVA_QUESTION,
            "ids": [it.id for it in items],  # acvaLimit draws a seeded sample per topic: which statements it scored
            "per_topic": {t: {"items": v["n"], "accuracy": v["accuracy"], "macro_f1": v["macro_f1"]}
                          for t, v in summary["per_topic"].items()}}


def reward_report(run: StageRun, model, tokenizer, held_out: list[dict]) -> dict:
    """What reward_eval.json holds (see the module docstring)."""
    from dhad_trainer.evaluation.loaders import ACVA, load_suite

    rs = run.spec.reward
    out = {"heldout_accuracy": pairwise_accuracy(model, tokenizer, chat_pairs(held_out), rs.sequence_length)}
    out.update(culture_report(model, tokenizer, culture_pairs(run, rs.culture_set), rs.sequence_length))
    if rs.benchmarks:
        store = run.data_store if str(rs.benchmarks).startswith("s3://") else None
        items = load_suite(ACVA, rs.benchmarks, "test", limit=rs.acva_limit, limit_per="subject", store=store)
        out["acva"] = acva_report(model, tokenizer, items, rs.sequence_length)
    return out


def forced_note(feedback: Path) -> str:
    """Why a local judge's feedback may hold no pairs: its verdicts were forced and not asked for."""
    stats_file = Path(feedback) / STATS_FILE
    stats = json.loads(stats_file.read_text(encoding="utf-8")) if stats_file.is_file() else {}
    if not stats.get("forced_pairs") or stats.get("forced_pairs_kept"):
        return ""
    return (f" ({stats['forced_pairs']} pairs were decided by forced likelihood verdicts of a judge that did not answer in "
            "the format; feedback.useForcedVerdicts keeps them)")


def run(run: StageRun) -> StageResult:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    spec: RLAIFJobSpec = run.spec
    rs = spec.reward
    feedback = require_input(run, INPUT_FEEDBACK, "the reward stage")
    train_rows, held_out = read_pairs(feedback, TRAIN), read_pairs(feedback, HELD_OUT)
    if not train_rows:
        raise ValueError(f"{feedback}: no train pairs; the feedback stage kept no pair both judge orders agreed on"
                         + forced_note(feedback))
    model, tokenizer = load_reward_model(run.model_dir, load_dtype(run))
    trainer = RewardTrainer(
        model=model,
        args=RewardConfig(**stage_arguments(run, rs.training, max_length=rs.sequence_length)),
        train_dataset=Dataset.from_list(chat_pairs(train_rows)),
        processing_class=tokenizer,
        callbacks=list(run.callbacks),
    )
    tracking.integrations_last(trainer)
    result = trainer.train(resume_from_checkpoint=resume_arg(run))
    save_final(trainer, tokenizer, run)
    metrics = {"train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_pairs": len(train_rows), "heldout_pairs": len(held_out)}
    # Every rank scores the same pairs: under ZeRO-3 and FSDP a forward gathers each layer's parameters
    # from all ranks, so rank 0 alone would wait forever. Rank 0 reports.
    trained = trainer.accelerator.unwrap_model(trainer.model)
    metrics.update(reward_report(run, trained, tokenizer, held_out))
    if run.is_main:
        (run.output_dir / EVAL_FILE).write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
        log.info("reward: %s", {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return StageResult(metrics=metrics, model_dir=run.output_dir)
