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
from dhad_trainer.evaluation.runner import PAD_SLACK, HFModelRunner, padded_batches
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


@pytest.mark.parametrize(("lengths", "expected"), [
    ([100] * 20, [16, 4]),  # equal rows: full batches
    ([400, 120, 118, 110, 100, 100], [1, 5]),  # a long question goes alone instead of padding five short ones
    ([100, 90, 80, 70], [2, 2]),  # 100+90 pads 10 (5%); adding 80 would pad 30 of 270 (11%); 70: 50 of 320
    ([], []),
])
def test_padded_batches_cut_a_batch_before_it_pads_past_the_slack(lengths, expected) -> None:
    got = padded_batches(lengths, 16, slack=0.10)
    assert [len(b) for b in got] == expected
    assert [i for b in got for i in b] == list(range(len(lengths)))  # every row once, in order
    for b in got:
        real = sum(lengths[i] for i in b)
        assert len(b) * lengths[b.start] <= (1 + 0.10) * real


def test_padding_of_a_real_five_shot_run_stays_within_the_slack(tiny) -> None:
    """The question tails of a 5-shot run on Dhad's MMLU samples, batched as loglikelihood batches them:
    the padding is bounded by PAD_SLACK (fixed batches of 16 padded a real 5-shot run's tails by 35%)."""
    model, tok = tiny
    items = load_suite("arabic-mmlu", BENCH)
    runner = HFModelRunner(model, tok, batch_size=16)
    slots = []
    hook = model.register_forward_hook(lambda m, a, kw, out: slots.append(kw["input_ids"].numel()), with_kwargs=True)
    try:
        score_suite(items, runner, LOGLIKELIHOOD, dev=load_suite("arabic-mmlu", BENCH, "dev"), k_shot=5)
    finally:
        hook.remove()
    real = runner.stats["prefix_tokens"] + runner.stats["row_tokens"]
    assert runner.stats["prefix_tokens"] > 0  # the subjects' prefixes were shared
    assert real <= sum(slots) <= (1 + PAD_SLACK) * real


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


def test_shared_prefix_is_computed_once_and_scores_the_same(tiny) -> None:
    """Few-shot prompts of one subject share a long prefix: with the prefix cache each group's prefix goes
    through the model once, and every score equals an unpadded forward of the whole sequence, whether the
    rows attend to the prefix split from their own tokens (the default on a CPU; the model has
    grouped-query attention and the rows differ in length) or through a per-row copy of its KV cache."""
    model, tok = tiny
    shots = "فيما يلي أسئلة الاختيار من متعدد (مع الإجابات) حول علم الأحياء\n\n" + "".join(
        f"سؤال: {s}\nإجابة: ب\n\n" for s in SENTENCES[:4]
    )
    other = "اللغة العربية من أقدم اللغات السامية وأوسعها انتشارا في العالم. " * 3
    shorter = "فيما يلي أسئلة حول اللغة\n\n" + "".join(f"سؤال: {s}\nإجابة: أ\n\n" for s in SENTENCES[5:7])
    requests = [
        (shots + f"سؤال: ما عاصمة البلد رقم {k}؟\nإجابة:", cont)
        for k in range(5)
        for cont in (" A", " B", " C", " D", " القاهرة")  # one-token and several-token continuations
    ] + [  # a second subject whose shared prefix is shorter: prefixes of two lengths in one pass
        (shorter + f"سؤال: {w}\nإجابة:", cont) for w in ("الأولى", "الثانية الطويلة جدا") for cont in (" أ", " ب")
    ] + [(other + "إجابة:", " نعم"), (other + "إجابة:", " لا"), ("كان الخليل", "ي عالما")]
    cached = HFModelRunner(model, tok, batch_size=4)
    plain = HFModelRunner(model, tok, batch_size=4, prefix_cache=False)
    got, want = cached.loglikelihood(requests), plain.loglikelihood(requests)
    for (ctx, cont), value in zip(requests, got, strict=True):
        ids, start = cached._split(ctx, cont)
        assert value == pytest.approx(_manual_logprob(model, ids, start), abs=1e-4)
    assert got == pytest.approx(want, abs=1e-4)
    prefix_len = len(tok(shots)["input_ids"])
    groups = [p for p, _ in cached._groups(cached._rows(requests)) if p]
    assert len(groups) == 2 and len(set(groups)) == 2  # two subjects, two prefix lengths, one prefix pass
    assert cached.stats["prefix_tokens"] >= prefix_len  # the five questions' prefix was run once...
    assert cached.stats["prefix_tokens"] + cached.stats["row_tokens"] < plain.stats["row_tokens"] * 0.6  # ...not 5x
    copied = HFModelRunner(model, tok, batch_size=4, split_attention=False)
    assert copied.loglikelihood(requests) == pytest.approx(got, abs=1e-5)
    assert cached.stats["shared_prefix_batches"] > 0 and copied.stats["shared_prefix_batches"] == 0
    single = [(shots + "سؤال: س\nإجابة:", f" {x}") for x in "ABCD"]
    one = HFModelRunner(model, tok, batch_size=8, prefix_cache=False)
    one.loglikelihood(single)
    assert one.stats["forwards"] == 1  # the four letters of one question share one row


def test_windowed_tokenization_equals_whole_encoding(tiny) -> None:
    """Each continuation is tokenized with the context's last 64 characters only; the ids must be the
    ones a whole encoding gives, merges across the boundary included."""
    model, tok = tiny
    long = " ".join(SENTENCES) * 2
    requests = [(long + "\nإجابة:", f" {x}") for x in "ABCD"] + [
        (long + " كان الخليل", "ي عالما"),  # the continuation merges with the context's last word
        (long + " الإجابة", "الصحيحة"),
        (long + " نعم", ""),
        ("قصير", " جدا"),  # shorter than the window: encoded whole
        (long + "   ", " نعم"),  # trailing spaces merge with the continuation's
    ]
    runner = HFModelRunner(model, tok)
    assert runner._pairs(requests) == [runner._split(c, x) for c, x in requests]
    assert runner.whole_encodes == 1  # only the short context; the windowed path did the rest


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
    items = load_suite("arabic-mmlu", BENCH)  # Dhad's samples: 48 questions
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
    # 48 questions, 16 per batch (the 4 letters share a row), plus at most one batch cut short where the
    # next question would have padded it past PAD_SLACK
    assert forwards["loglikelihood"] in (3, 4)
    assert forwards["generate"] >= 5 * forwards["loglikelihood"]  # up to 10 sequential steps per batch
    assert forwards["generate, batch 1"] >= 5 * len(items)
    # wall-clock is printed, not asserted: on 2 shared CPU cores it swings several-fold between runs


def test_end_to_end_all_suites_both_methods(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    runner = HFModelRunner(model, tok, batch_size=16, max_length=256)
    settings = EvalSettings(source=str(BENCH), limit=24, k_shot=1, max_new_tokens_open=12,
                            open_metrics=("judge-pairwise",))
    references = {
        s: {i.id: "إجابة مرجعية" for i in load_suite(s, BENCH, limit=24)} for s in ("vicuna-80", "alpaca-eval")
    }
    headline = run_eval(
        settings, runner, tmp_path, model="tiny-llama", judge=LengthJudge(), references=references
    )
    assert set(headline) >= {
        f"{s}/{m}" for s in ("acva", "arabic-mmlu", "exams") for m in (GENERATE, LOGLIKELIHOOD)
    }
    for name, value in headline.items():  # each recounted from the per-item predictions
        suite, method = name.split("/")
        if suite in ("acva", "arabic-mmlu", "exams"):
            assert value == pytest.approx(recount(tmp_path, suite, method), abs=5e-5), name  # rounded to 4 places
    doc = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    by = {(s["suite"], s["method"]): s for s in doc["suites"]}
    assert by[("arabic-mmlu", GENERATE)]["k_shot"] == 1 and by[("acva", GENERATE)]["k_shot"] == 0
    assert by[("arabic-mmlu", LOGLIKELIHOOD)]["metrics"]["unparsed"] == 0
    assert by[("acva", GENERATE)]["metrics"]["n"] == 24
    judged = by[("vicuna-80", "judge-pairwise")]["metrics"]
    assert judged["wins"] + judged["ties"] + judged["losses"] == 24 and judged["invalid"] == 0
    assert judged["forced"] == 0 and judged["inconsistent"] == 0  # LengthJudge is order-independent
    assert (tmp_path / "scores.png").exists() and (tmp_path / "summary.md").exists()
    assert (tmp_path / "acva_topics_loglikelihood.png").exists() and (
        tmp_path / "mmlu_categories_generate.png"
    ).exists()
