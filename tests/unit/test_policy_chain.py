"""The whole alignment chain once, on the project's own Arabic data: SFT -> feedback -> reward -> policy (GRPO),
each stage's output folder being the next one's input, as the runtime will wire them."""

from __future__ import annotations

import re

import pytest
import torch
import transformers

from dhad_trainer.stages import feedback, policy, reward, sft
from dhad_trainer.stages.alignment import TRAIN, read_pairs, read_prompts
from tests.support.alignment import rlaif_spec, sft_spec, stage_run, tiny_lm
from tests.support.openai_server import OpenAIServer, Reply
from tests.unit.test_judge import answers

ARABIC = re.compile(r"[\u0621-\u064A]")


def arabic_loving_judge(body, attempt):
    """Prefers the answer with more Arabic letters (then the smaller text): consistent in both orders."""
    _, a, b = answers(body)
    rank_a, rank_b = (-len(ARABIC.findall(a)), a), (-len(ARABIC.findall(b)), b)
    return Reply(content=f"الإجابة المفضلة أغنى بالعربية.\nالحكم: [[{'A' if rank_a <= rank_b else 'B'}]]")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    out = {}
    out["sft"] = sft.run(stage_run(sft_spec(), "sft", root / "sft", tiny_lm()))
    policy_start = out["sft"].model_dir
    with OpenAIServer(api_key=None, script=arabic_loving_judge) as srv:
        spec = rlaif_spec(
            feedback={"samplesPerPrompt": 2, "judge": {"endpoint": {"baseUrl": srv.base_url, "model": "judge"}}},
            reward={"training": {"maxSteps": 3, "microBatchSize": 4, "learningRate": 1e-3, "logEverySteps": 1}},
        )
        out["feedback"] = feedback.run(stage_run(spec, "feedback", root / "feedback", policy_start))
        out["requests"] = len(srv.bodies)
    feedback_dir = root / "feedback" / "out"
    out["reward"] = reward.run(stage_run(spec, "reward", root / "reward", policy_start,
                                         inputs={"feedback": feedback_dir}))
    out["policy"] = policy.run(stage_run(spec, "policy", root / "policy", policy_start,
                                         inputs={"feedback": feedback_dir, "reward_model": out["reward"].model_dir}))
    out["feedback_dir"] = feedback_dir
    return out


def test_feedback_judged_the_sft_models_samples_of_the_arabic_prompts(chain):
    stats = chain["feedback"].metrics
    assert stats["prompts"] == 42 and stats["samples"] == 84 and stats["pairs"] == 42
    assert stats["judge_calls"] == chain["requests"] == stats["judgements"] == 2 * (42 - stats["identical"])
    assert stats["agreement_rate"] == 1.0 and stats["agreed"] == stats["pairs_judged"]
    assert stats["train_prompts"] + stats["heldout_prompts"] == 42 and stats["heldout_prompts"] > 0
    pairs = read_pairs(chain["feedback_dir"], TRAIN)
    assert len(pairs) == stats["train_pairs"] > 0
    assert all(len(ARABIC.findall(p["chosen"][0]["content"])) >= len(ARABIC.findall(p["rejected"][0]["content"]))
               for p in pairs)


def test_reward_model_trained_from_the_sft_model_on_those_pairs(chain):
    m = chain["reward"].metrics
    assert m["train_pairs"] == chain["feedback"].metrics["train_pairs"] and m["steps"] == 3
    culture = reward.CULTURE_SET.read_text(encoding="utf-8").splitlines()
    assert m["culture_pairs"] == len(culture) >= 200 and m["culture_accuracy"] is not None
    assert (m["heldout_accuracy"] is None) == (chain["feedback"].metrics["heldout_pairs"] == 0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(chain["reward"].model_dir)
    sft_model = transformers.AutoModelForCausalLM.from_pretrained(chain["sft"].model_dir)
    assert model.config.vocab_size == sft_model.config.vocab_size


def test_grpo_policy_optimised_against_that_reward_model(chain):
    m = chain["policy"].metrics
    assert m["algorithm"] == "grpo" and m["steps"] == 2 and "reward" in m["last_log"]
    assert len(read_prompts(chain["feedback_dir"], TRAIN)) == chain["feedback"].metrics["train_prompts"]
    final = transformers.AutoModelForCausalLM.from_pretrained(chain["policy"].model_dir)
    start = transformers.AutoModelForCausalLM.from_pretrained(chain["sft"].model_dir)
    assert any(not torch.equal(p, q) for p, q in zip(final.parameters(), start.parameters(), strict=True))
    tokenizer = transformers.AutoTokenizer.from_pretrained(chain["policy"].model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "ما عاصمة قطر؟"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    assert final.generate(**prompt, max_new_tokens=4, do_sample=False).shape[0] == 1
