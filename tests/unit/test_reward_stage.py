"""The reward stage: RewardTrainer on judged pairs, a loadable one-label reward model, held-out and culture
accuracy reported, a custom culture set, and a clear error without pairs."""

from __future__ import annotations

import json

import pytest
import transformers

from dhad_trainer.stages import reward
from tests.support.alignment import rlaif_spec, stage_run, tiny_lm, write_pairs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    feedback_dir = write_pairs(root / "feedback", n_train=16, n_heldout=8)
    spec = rlaif_spec(reward={"training": {"maxSteps": 6, "microBatchSize": 4, "learningRate": 2e-3,
                                           "schedule": "constant", "logEverySteps": 1}})
    run = stage_run(spec, "reward", root / "stage", tiny_lm(), inputs={"feedback": feedback_dir})
    return run, reward.run(run)


def test_reward_model_is_saved_with_one_label_and_pad_token(trained):
    run, result = trained
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert result.metrics["steps"] == 6 and result.metrics["train_pairs"] == 16
    assert sorted(p.name for p in run.trainer_dir.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_accuracies_are_reported_and_learned(trained):
    run, result = trained
    m = result.metrics
    assert m["heldout_pairs"] == 8 and m["culture_pairs"] == 30
    assert m["heldout_accuracy"] >= 0.75  # chosen Arabic answers vs a fixed noise answer: easy to learn
    assert json.loads((run.output_dir / reward.EVAL_FILE).read_text()) == m
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.model_dir)
    # culture accuracy recounted here from the raw set: the saved model scores each chosen and rejected answer
    rows = [json.loads(line) for line in reward.CULTURE_SET.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) == m["culture_pairs"]
    def reward_of(row, answer):
        return reward.score(model, tokenizer, [[{"role": "user", "content": row["prompt"]},
                                                 {"role": "assistant", "content": row[answer]}]], 256)[0]
    wins = sum(reward_of(r, "chosen") > reward_of(r, "rejected") for r in rows)
    assert m["culture_accuracy"] == wins / len(rows)
    prompt = [{"role": "user", "content": "ما عاصمة الأردن؟"}]
    scores = reward.score(model, tokenizer, [prompt + [{"role": "assistant", "content": "عمّان"}]], 256)
    assert len(scores) == 1 and isinstance(scores[0], float)


def test_custom_culture_set_and_missing_pairs(tmp_path, trained):
    _, result = trained
    culture = tmp_path / "culture.jsonl"
    rows = [{"prompt": "س", "chosen": "جواب مهذب", "rejected": "جواب فظ"}, {"prompt": "ناقص"}]
    culture.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    spec = rlaif_spec(reward={"cultureSet": str(culture)})
    run = stage_run(spec, "reward", tmp_path / "r", tiny_lm())
    assert len(reward.culture_pairs(run, spec.reward.culture_set)) == 1  # the broken row is skipped
    empty = write_pairs(tmp_path / "empty", n_train=0, n_heldout=2)
    run.inputs["feedback"] = empty
    with pytest.raises(ValueError, match="no train pairs"):
        reward.run(run)
    run.inputs.pop("feedback")
    with pytest.raises(ValueError, match=r"run.inputs\['feedback'\]"):
        reward.run(run)
