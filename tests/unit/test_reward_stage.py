"""The reward stage: RewardTrainer on judged pairs, a loadable one-label reward model, held-out accuracy, the
culture set per topic in both orders beside the length baseline, ACVA as affirmation-vs-negation preferences on
the real ACVA files, a custom culture set, and clear errors without pairs."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import transformers

from dhad_trainer.stages import reward
from tests.conftest import ACEGPT as BENCH
from tests.support.alignment import rlaif_spec, stage_run, tiny_lm, write_pairs

ACVA_TEST = BENCH / "ArabicCulture" / "difficulty-easy-TF_test.jsonl"
CULTURE = [json.loads(line) for line in reward.CULTURE_SET.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward")
    feedback_dir = write_pairs(root / "feedback", n_train=16, n_heldout=8)
    spec = rlaif_spec(reward={"training": {"maxSteps": 6, "microBatchSize": 4, "learningRate": 2e-3,
                                           "schedule": "constant", "logEverySteps": 1},
                              "benchmarks": str(BENCH), "acvaLimit": 1})
    run = stage_run(spec, "reward", root / "stage", tiny_lm(), inputs={"feedback": feedback_dir})
    return run, reward.run(run)


@pytest.mark.benchmarks  # the module's stage scores the real ACVA files
def test_reward_model_is_saved_with_one_label_and_pad_token(trained):
    run, result = trained
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.model_dir)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert result.metrics["steps"] == 6 and result.metrics["train_pairs"] == 16
    assert sorted(p.name for p in run.trainer_dir.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


@pytest.mark.benchmarks  # the module's stage scores the real ACVA files
def test_accuracies_are_reported_and_learned(trained):
    run, result = trained
    m = result.metrics
    assert m["heldout_pairs"] == 8 and m["culture_pairs"] == len(CULTURE)
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


@pytest.mark.benchmarks  # the module's stage scores the real ACVA files
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


def test_the_culture_set_covers_ten_topics_with_length_reversed_pairs():
    topics = Counter(r["topic"] for r in CULTURE)
    assert len(CULTURE) >= 200 and len(topics) == 10 and min(topics.values()) >= 18
    assert {"religion", "family", "hospitality", "language", "history", "law"} <= topics.keys()
    assert len({r["prompt"] for r in CULTURE}) == len({r["id"] for r in CULTURE}) == len(CULTURE)
    assert all(r["id"].startswith(r["topic"] + "-") and r["chosen"] != r["rejected"] for r in CULTURE)
    assert sum(len(r["rejected"]) > len(r["chosen"]) for r in CULTURE) >= 40  # where "longer wins" fails


@pytest.mark.benchmarks  # the module's stage scores the real ACVA files
def test_culture_accuracy_per_topic_in_both_orders_beside_the_length_baseline(trained):
    run, result = trained
    m = result.metrics
    by_topic = m["culture_by_topic"]
    assert {t: v["pairs"] for t, v in by_topic.items()} == dict(Counter(r["topic"] for r in CULTURE))
    weighted = sum(v["pairs"] * v["accuracy"] for v in by_topic.values()) / m["culture_pairs"]
    assert weighted == pytest.approx(m["culture_accuracy"])
    assert m["culture_order_agreement"] == 1.0  # a scalar reward may not depend on the pair's place in its batch
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.model_dir)
    tokens = [tuple(len(tokenizer(r[k], add_special_tokens=False)["input_ids"]) for k in ("chosen", "rejected"))
              for r in CULTURE]
    assert m["culture_longer_answer_baseline"] == pytest.approx(sum(c > r for c, r in tokens) / len(CULTURE))
    assert m["culture_length_reversed"]["pairs"] == sum(c <= r for c, r in tokens)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    first = CULTURE[0]
    prompt = [{"role": "user", "content": first["prompt"]}]
    chosen, rejected = reward.score(model, tokenizer, [prompt + [{"role": "assistant", "content": first[k]}]
                                                       for k in ("chosen", "rejected")], 256)
    alone = reward.culture_report(model, tokenizer, reward.culture_pairs(run, None)[:1], 256)
    assert alone["culture_accuracy"] == float(chosen > rejected)  # the verdict is the two rewards' order


@pytest.mark.benchmarks  # the module's stage scores the real ACVA files
def test_acva_statements_are_scored_as_affirmation_against_negation(trained):
    run, result = trained
    acva = result.metrics["acva"]
    rows = [json.loads(line) for line in ACVA_TEST.read_text(encoding="utf-8").splitlines()]
    by_id = {r["id"]: r for r in rows}
    topics = {r["id"].rsplit("-", 1)[0] for r in rows}
    # acvaLimit 1: one statement of every topic (a seeded draw), in file order
    first_per_topic = {by_id[i]["id"].rsplit("-", 1)[0]: by_id[i] for i in acva["ids"]}
    assert sorted(first_per_topic) == sorted(topics) and len(acva["ids"]) == len(topics)
    assert acva["items"] == len(first_per_topic) == len(acva["per_topic"])
    assert acva["gold_yes_share"] == pytest.approx(sum(r["answer"] == "نعم" for r in first_per_topic.values())
                                                   / len(first_per_topic))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(result.model_dir)
    asked = [[{"role": "user", "content": reward.ACVA_QUESTION.format(statement=r["question"])}]
             for r in first_per_topic.values()]
    yes = reward.score(model, tokenizer, [a + [{"role": "assistant", "content": reward.AFFIRM}] for a in asked], 256)
    no = reward.score(model, tokenizer, [a + [{"role": "assistant", "content": reward.NEGATE}] for a in asked], 256)
    assert acva["predicted_yes_share"] == pytest.approx(sum(y > n for y, n in zip(yes, no, strict=True)) / len(asked))
    correct = sum((y > n) == (r["answer"] == "نعم") for y, n, r in zip(yes, no, first_per_topic.values(), strict=True))
    assert acva["accuracy"] == pytest.approx(correct / len(asked))
