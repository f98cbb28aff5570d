"""The tiny model bootstrap every other test starts from: tokenizer, chat template, masks, determinism."""

from __future__ import annotations

import json
import re

import pytest
import torch
import transformers

from dhad_trainer.local import tiny

SAMPLES = [
    "مرحبًا بكم في مدينة الرياض.",
    "قال المعلّم: إنّ العِلمَ نورٌ يُضيءُ الطريقَ.",
    "بلغ عدد الطلاب ١٢٥٠٠ طالب في عام ٢٠٢٤، أي 12500 student.",
    "سطر أول\nسطر ثانٍ\t مع  مسافات  مزدوجة ",
    "رمز تعبيري 🌙 وعلامات: «اقتباس» (قوسان) ؟!",
]
# Held-out sentences (not in the corpus) for the fertility figure.
HELD_OUT = [
    "يحب الأطفال اللعب في الحديقة بعد المدرسة، وتجلس الأمهات على المقاعد يتحدثن عن شؤون البيت.",
    "اشترى والدي سيارة جديدة، وسافرنا بها إلى البحر في نهاية الأسبوع.",
    "تعمل الممرضة في قسم الطوارئ، وتساعد المرضى بصبر وابتسامة.",
    "يجتمع أهل القرية في المساء لتناول العشاء والحديث عن موسم الحصاد.",
]
CHAT = [
    {"role": "system", "content": "أنت مساعد عربي مفيد."},
    {"role": "user", "content": "ما عاصمة الأردن؟"},
    {"role": "assistant", "content": "عاصمة الأردن عمّان."},
    {"role": "user", "content": "وكم عدد سكانها تقريبًا؟"},
    {"role": "assistant", "content": "نحو ٤ ملايين نسمة."},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.init_tiny_model(tmp_path_factory.mktemp("tiny") / "lm", seed=0)


@pytest.fixture(scope="module")
def tok(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", SAMPLES)
def test_tokenizer_round_trips(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_tokenizer_round_trips_whole_corpus(tok):
    for line in tiny.DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines():
        assert tok.decode(tok.encode(line)) == line


def test_special_tokens_and_vocab(tok, model_dir):
    ids = [tok.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (tiny.ENDOFTEXT, tiny.IM_END, tiny.PAD)
    assert tok.encode("<|im_start|>user<|im_end|>")[0] == 1  # specials are single tokens, nothing auto-added
    config = transformers.AutoConfig.from_pretrained(model_dir)
    assert config.vocab_size == len(tok) == 2048
    assert config.tie_word_embeddings is False
    assert (config.eos_token_id, config.pad_token_id, config.bos_token_id) == (2, 3, 0)


def test_loads_and_generates(tok, model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    prompt = tok.apply_chat_template(
        CHAT[:2], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    n = prompt["input_ids"].shape[1]
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape == (1, n + 5)
    assert isinstance(tok.decode(out[0, n:]), str)


def test_same_seed_gives_byte_identical_files(tmp_path, model_dir):
    again = tiny.init_tiny_model(tmp_path / "again", seed=0)
    other = tiny.init_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (model_dir / "model.safetensors").read_bytes()


def test_chat_template_renders_chatml(tok):
    text = tok.apply_chat_template(CHAT[:3], tokenize=False)
    assert text == (
        "<|im_start|>system\nأنت مساعد عربي مفيد.<|im_end|>\n"
        "<|im_start|>user\nما عاصمة الأردن؟<|im_end|>\n"
        "<|im_start|>assistant\nعاصمة الأردن عمّان.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nما عاصمة الأردن؟<|im_end|>\n<|im_start|>assistant\n"
    assert re.search(r"\{%-?\s*generation\s*-?%\}", tok.chat_template)


def _expected(tok, messages):
    """Token ids and mask built piecewise: assistant content + <|im_end|> is 1, everything else 0."""
    ids, mask = [], []
    for m in messages:
        head = tok.encode(f"<|im_start|>{m['role']}\n", add_special_tokens=False)
        body = tok.encode(m["content"], add_special_tokens=False) + [tok.convert_tokens_to_ids(tiny.IM_END)]
        tail = tok.encode("\n", add_special_tokens=False)
        flag = int(m["role"] == "assistant")
        ids += head + body + tail
        mask += [0] * len(head) + [flag] * len(body) + [0] * len(tail)
    return ids, mask


def test_assistant_mask_covers_exactly_assistant_tokens(tok):
    out = tok.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = _expected(tok, CHAT)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == mask
    masked = tok.decode([i for i, k in zip(ids, mask, strict=True) if k])
    assert masked == "عاصمة الأردن عمّان.<|im_end|>نحو ٤ ملايين نسمة.<|im_end|>"


def test_assistant_mask_batched_padded_and_trl_stop_token(tok):
    from trl.chat_template_utils import is_chat_template_stop_token_trained

    out = tok.apply_chat_template(
        [CHAT[:3], CHAT],
        return_dict=True,
        return_assistant_tokens_mask=True,
        padding=True,
        return_tensors="pt",
    )
    for row, conv in enumerate((CHAT[:3], CHAT)):
        ids, mask = _expected(tok, conv)
        assert out["input_ids"][row, : len(ids)].tolist() == ids
        assert out["assistant_masks"][row].tolist() == mask + [0] * (out["input_ids"].shape[1] - len(ids))
    assert is_chat_template_stop_token_trained(tok)  # TRL would otherwise warn "may not learn to stop"


def test_fertility(tok, record_property):
    """Tokens per whitespace word; pure byte fallback would be ~10 for Arabic (2 bytes/letter)."""

    def fertility(lines):
        return sum(len(tok.encode(x)) for x in lines) / sum(len(x.split()) for x in lines)

    f_corpus = fertility(tiny.DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines())
    f_held = fertility(HELD_OUT)
    record_property("fertility_corpus", round(f_corpus, 2))
    record_property("fertility_held_out", round(f_held, 2))
    print(f"fertility: corpus {f_corpus:.2f}, held-out {f_held:.2f} tokens/word")
    assert 1.0 < f_corpus < 2.5  # measured 2.01 at vocab 2048
    assert 1.0 < f_held < 3.0  # measured 1.91


def test_reward_kind_loads_as_sequence_classifier(tmp_path, tok):
    path = tiny.init_tiny_model(tmp_path / "rm", kind="reward", seed=0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id
    batch = tok(["جواب قصير.", "جواب أطول قليلًا من الأول."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 1)


def test_unknown_kind_rejected(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        tiny.init_tiny_model(tmp_path / "x", kind="vision")


def test_assets_are_well_formed():
    corpus = tiny.DEFAULT_CORPUS.read_bytes()
    lines = corpus.decode("utf-8").splitlines()
    assert len(corpus) < 100_000 and 150 <= len(lines) <= 250 and all(lines)
    assert re.search("[٠-٩]", corpus.decode()) and re.search("[\u064b-\u0652]", corpus.decode())
    rows = [json.loads(x) for x in tiny.DEFAULT_INSTRUCTIONS.read_text(encoding="utf-8").splitlines()]
    assert 60 <= len(rows) <= 100
    for row in rows:
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert all(m["content"].strip() for m in row["messages"])
    prompts = [
        json.loads(x)["prompt"] for x in (tiny.ASSETS / "arabic_prompts.jsonl").read_text().splitlines()
    ]
    assert len(prompts) >= 40 and len(set(prompts)) == len(prompts)
