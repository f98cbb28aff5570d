"""HFModelRunner and a whole evaluation on a tiny random Llama with a byte-level BPE trained here.

One module-scoped model keeps the torch cost to a single import and build.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dhad_trainer.evaluation.job import EvalSettings, run_eval
from dhad_trainer.evaluation.loaders import SAMPLE_BENCHMARKS as BENCH
from dhad_trainer.evaluation.loaders import load_suite
from dhad_trainer.evaluation.runner import HFModelRunner
from dhad_trainer.evaluation.scoring import GENERATE, LOGLIKELIHOOD, score_suite
from tests.support.scores import recount

SENTENCES = [
    "اللغة العربية من أقدم اللغات السامية وأوسعها انتشارا في العالم.",
    "يدرس الطلاب الرياضيات والفيزياء والكيمياء في المرحلة الثانوية.",
    "سؤال: ما عاصمة المملكة العربية السعودية؟ إجابة: الرياض",
    "فيما يلي أسئلة الاختيار من متعدد حول علم الأحياء، اختر إجابة واحدة.",
    "الإجابة الصحيحة هي ب لأن الخلية هي الوحدة الأساسية للحياة.",
    "نعم، هذه العبارة صحيحة. لا، هذه العبارة خاطئة.",
    "كان الخليل بن أحمد الفراهيدي عالما في اللغة والعروض.",
    "تقع مدينة القاهرة على ضفاف نهر النيل في مصر.",
    "الإسلام دين يدعو إلى السلام والعلم والعمل.",
    "A. B. C. D. The answer is C because it is correct.",
    "إجابة: A\nإجابة: B\nإجابة: C\nإجابة: D\nإجابة: نعم\nإجابة: لا",
]


class LengthJudge:
    """Deterministic local judge: the longer answer wins, equal length ties."""

    def compare(self, question: str, answer_a: str, answer_b: str) -> str | None:
        if len(answer_a) == len(answer_b):
            return "tie"
        return "A" if len(answer_a) > len(answer_b) else "B"


@pytest.fixture(scope="module")
def tiny() -> tuple:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 3, trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>"
    )
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.eos_token_id,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    return model, fast


def _manual_logprob(model, ids: list[int], start: int) -> float:
    """Reference: one unpadded forward, sum of log P(ids[t] | ids[:t]) for t >= start."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_batched_loglikelihood_matches_unpadded_forward(tiny) -> None:
    model, tok = tiny
    runner = HFModelRunner(model, tok, batch_size=2)
    requests = [
        ("فيما يلي أسئلة الاختيار من متعدد حول علم الأحياء\nإجابة:", " ب"),
        ("سؤال: ما عاصمة مصر؟\nإجابة:", " القاهرة"),
        ("نعم", " لا"),
        ("اللغة العربية من أقدم اللغات السامية وأوسعها انتشارا في العالم. إجابة:", " أ"),
        ("كان الخليل", "ي عالما"),
    ]  # no space: the continuation may merge with the context's last token
    batched = runner.loglikelihood(requests)
    for (ctx, cont), got in zip(requests, batched, strict=True):
        ids, start = runner._split(ctx, cont)
        assert tok.decode(ids[:start]) and ctx.startswith(
            tok.decode(ids[:start])
        )  # context kept, cut at a token
        assert tok.decode(ids) == ctx + cont
        assert got == pytest.approx(_manual_logprob(model, ids, start), abs=1e-4)
    assert HFModelRunner(model, tok, batch_size=1).loglikelihood(requests) == pytest.approx(batched, abs=1e-4)


def test_batched_generation_matches_single(tiny) -> None:
    model, tok = tiny
    prompts = ["سؤال: ما عاصمة مصر؟\nإجابة:", "نعم", "فيما يلي أسئلة الاختيار من متعدد حول علم الأحياء"]
    batched = HFModelRunner(model, tok, batch_size=3).generate(prompts, 6)
    single = HFModelRunner(model, tok, batch_size=1).generate(prompts, 6)
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_truncation_keeps_the_continuation(tiny) -> None:
    model, tok = tiny
    runner = HFModelRunner(model, tok, max_length=16)
    ids, start = runner._split("اللغة العربية من أقدم اللغات السامية وأوسعها انتشارا في العالم. " * 3, " نعم")
    assert len(ids) == 16 and tok.decode(ids[start:]).endswith("نعم") and start >= 1
    assert len(runner.generate(["اللغة العربية " * 40], 4)) == 1


def test_loglikelihood_is_faster_than_generation(tiny) -> None:
    """One forward per batch of questions instead of one per new token. On this tiny CPU model a
    forward is mostly fixed overhead, so wall-clock gains understate what a real model on a GPU sees
    (where every decode step re-reads all weights); the forward count is the robust measure."""
    model, tok = tiny
    items = load_suite("arabic-mmlu", BENCH)  # Dhad's samples: 36 questions
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    qps, forwards = {}, {}
    try:
        for name, method, batch in (
            ("loglikelihood", LOGLIKELIHOOD, 16),
            ("generate", GENERATE, 16),
            ("generate, batch 1", GENERATE, 1),
        ):
            runner = HFModelRunner(model, tok, batch_size=batch, max_length=256)
            score_suite(items[:2], runner, method)  # warm-up
            calls.clear()
            start = time.perf_counter()
            score_suite(items, runner, method)
            qps[name], forwards[name] = len(items) / (time.perf_counter() - start), len(calls)
    finally:
        hook.remove()
    print(
        f"\nquestions/s on the tiny model: { {k: round(v, 1) for k, v in qps.items()} }, forwards {forwards}"
    )
    assert forwards["loglikelihood"] == 3  # 36 questions, 16 per batch, the 4 letters share a row
    assert forwards["generate"] >= 5 * forwards["loglikelihood"]  # up to 10 sequential steps per batch
    assert forwards["generate, batch 1"] >= 5 * len(items)
    # wall-clock is printed, not asserted: on 2 shared CPU cores it swings several-fold between runs


def test_end_to_end_all_suites_both_methods(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    runner = HFModelRunner(model, tok, batch_size=16, max_length=256)
    settings = EvalSettings(source=str(BENCH), limit=24, limit_per="total", k_shot=1, max_new_tokens_open=12)
    references = {
        s: {i.id: "إجابة مرجعية" for i in load_suite(s, BENCH, limit=24, limit_per="total")}
        for s in ("vicuna-80", "alpaca-eval")
    }
    headline = run_eval(
        settings, runner, tmp_path, model="tiny-llama", judge=LengthJudge(), references=references
    )
    assert set(headline) == {
        f"{s}/{m}" for s in ("acva", "arabic-mmlu", "exams") for m in (GENERATE, LOGLIKELIHOOD)
    } | {"vicuna-80/generate+judge", "alpaca-eval/generate+judge"}
    for name, value in headline.items():  # each recounted from the per-item predictions
        suite, method = name.split("/")
        assert value == pytest.approx(recount(tmp_path, suite, method), abs=5e-5), name  # rounded to 4 places
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    by = {(s["suite"], s["method"]): s for s in doc["suites"]}
    assert by[("arabic-mmlu", GENERATE)]["k_shot"] == 1 and by[("acva", GENERATE)]["k_shot"] == 0
    assert by[("arabic-mmlu", LOGLIKELIHOOD)]["metrics"]["unparsed"] == 0
    assert by[("acva", GENERATE)]["metrics"]["n"] == 24
    judged = by[("vicuna-80", "generate+judge")]["metrics"]
    assert judged["wins"] + judged["ties"] + judged["losses"] == 24 and judged["invalid"] == 0
    assert (tmp_path / "scores.png").exists() and (tmp_path / "summary.md").exists()
    assert (tmp_path / "acva_topics_loglikelihood.png").exists() and (
        tmp_path / "mmlu_categories_generate.png"
    ).exists()
