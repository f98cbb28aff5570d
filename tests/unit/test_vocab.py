"""Vocabulary expansion: new Arabic merges lower fertility on held-out text, base tokenization is kept
where no new merge applies, and new embedding rows start as the mean of their sub-token rows."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from dhad_trainer.data import vocab
from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model

HELD_OUT = [  # not in the corpus
    "يحب الأطفال اللعب في الحديقة بعد المدرسة، وتجلس الأمهات على المقاعد يتحدثن عن شؤون البيت.",
    "اشترى والدي سيارة جديدة، وسافرنا بها إلى البحر في نهاية الأسبوع.",
    "تعمل الممرضة في قسم الطوارئ، وتساعد المرضى بصبر وابتسامة.",
    "يجتمع أهل القرية في المساء لتناول العشاء والحديث عن موسم الحصاد.",
]


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vocab")
    base = init_tiny_model(tmp / "base", vocab_size=600, seed=0)  # room for new merges in this corpus
    corpus = [line for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    report = vocab.expand_vocabulary(base, corpus, HELD_OUT, 200, tmp / "expanded")
    return base, tmp / "expanded", report


def test_fertility_drops_on_held_out_arabic(expanded):
    _, out, report = expanded
    assert report["added"] == 200 and report["vocab_after"] == report["vocab_before"] + 200
    assert report["fertility_after"] < report["fertility_before"] * 0.95
    assert json.loads((out / "vocabulary.json").read_text()) == report


def test_tokenizer_round_trips_and_keeps_base_merges(expanded):
    base_dir, out, _ = expanded
    base = transformers.AutoTokenizer.from_pretrained(base_dir)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in HELD_OUT + ["mixed نص 123 «اقتباس» 🌙"]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    latin = "hello world 12345"
    assert tok.encode(latin, add_special_tokens=False) == base.encode(latin, add_special_tokens=False)
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    base_merges = json.loads(base.backend_tokenizer.to_str())["model"]["merges"]
    assert merges[: len(base_merges)] == base_merges and len(merges) == len(base_merges) + 200
    assert tok.eos_token == base.eos_token and tok.convert_tokens_to_ids("<|im_end|>") == base.eos_token_id


def test_expanded_model_loads_and_runs(expanded):
    _, out, _ = expanded
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    ids = tok(HELD_OUT[0], return_tensors="pt")["input_ids"]
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_new_rows_are_the_mean_of_their_parts(tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(init_tiny_model(tmp_path / "m", vocab_size=300))
    rows = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(torch.arange(rows * 64, dtype=torch.float32).view(rows, 64))
    new = [("ab", "a", "b"), ("abc", "ab", "c")]
    vocab.init_new_rows(model, {"a": 5, "b": 6, "c": 9}, new, [rows, rows + 1])
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert table.shape[0] == rows + 2 and head.shape[0] == rows + 2
    assert torch.allclose(table[rows], table[[5, 6]].mean(0)) and torch.allclose(table[rows + 1], table[[5, 6, 9]].mean(0))
    assert torch.allclose(head[rows + 1], head[[5, 6, 9]].mean(0))
