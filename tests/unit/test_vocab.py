"""Vocabulary expansion: new Arabic merges lower fertility on held-out text, base tokenization is kept
where no new merge applies, every added merge can fire after the base merges (byte-level BPE and a
Llama-style Metaspace tokenizer with byte fallback, both built here), new embedding rows start as the
mean of their sub-token rows, the sample is bounded and independent of how the corpus is split, and the
optional warm-up moves only the embeddings."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

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
    report = vocab.expand_vocabulary(base, corpus, 200, tmp / "expanded")
    return base, tmp / "expanded", report


def test_fertility_drops_on_held_out_arabic(expanded):
    base_dir, out, report = expanded
    assert report["added"] == 200 - report["unreachable"] and report["vocab_after"] == report["vocab_before"] + report["added"]
    assert report["fertility_after"] < report["fertility_before"] * 0.95  # the sample's own held-out part
    base, tok = transformers.AutoTokenizer.from_pretrained(base_dir), transformers.AutoTokenizer.from_pretrained(out)
    assert vocab.fertility(tok, HELD_OUT) < vocab.fertility(base, HELD_OUT) * 0.95  # text it never saw
    saved = json.loads((out / "vocabulary.json").read_text())
    assert {k: v for k, v in saved.items() if k != "new"} == report and len(saved["new"]) == report["added"]


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
    assert merges[: len(base_merges)] == base_merges and len(merges) == len(base_merges) + report_added(out)
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


def report_added(out) -> int:
    return json.loads((out / "vocabulary.json").read_text())["added"]


def every_new_token_fires(tokenizer_dir) -> None:
    """Each added token's own text becomes that one token, and real text uses new tokens."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    new = json.loads((tokenizer_dir / "vocabulary.json").read_text())["new"]
    state = json.loads(tok.backend_tokenizer.to_str())
    state["model"]["ignore_merges"] = False
    model = Tokenizer.from_str(json.dumps(state)).model
    assert new and all([t.value for t in model.tokenize(token)] == [token] for token, _, _ in new)
    new_ids = {tok.convert_tokens_to_ids(t) for t, _, _ in new}
    used = {i for text in HELD_OUT for i in tok.encode(text, add_special_tokens=False)}
    assert used & new_ids


def test_every_merge_added_to_the_byte_level_tokenizer_can_fire(expanded):
    every_new_token_fires(expanded[1])


def test_a_merge_the_base_order_never_lets_fire_is_found():
    # base: "b c" ranks first, so in "abc" b joins c before a new (a, b) could: (ab, c) can never fire
    bpe = models.BPE(vocab={"a": 0, "b": 1, "c": 2, "bc": 3}, merges=[("b", "c")])
    state = json.loads(Tokenizer(bpe).to_str())
    new = [("ab", "a", "b"), ("abc", "ab", "c"), ("abcab", "abc", "ab")]
    assert vocab.unreachable_merges(state, new) == [("abc", "ab", "c"), ("abcab", "abc", "ab")]


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    """A SentencePiece-like BPE (Metaspace pre-tokenizer, byte fallback, <s> </s>) trained mostly on
    English with some Arabic, as Llama 2's is, then saved as a HF tokenizer with a tiny model."""
    tmp = tmp_path_factory.mktemp("llama")
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    english = ["The quick brown fox jumps over the lazy dog near the river bank."] * 20
    arabic = [line for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()][:10]
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=[f"<0x{i:02X}>" for i in range(256)])
    tok.train_from_iterator(english + arabic, trainer)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    base = init_tiny_model(tmp / "base", vocab_size=600, seed=0)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    hf.save_pretrained(base)
    corpus = [line for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    report = vocab.expand_vocabulary(base, corpus, 150, tmp / "expanded")
    return base, tmp / "expanded", report


def test_metaspace_tokenizer_gains_arabic_merges_that_fire_and_round_trip(llama_style):
    base_dir, out, report = llama_style
    assert report["added"] >= 100 and report["fertility_after"] < report["fertility_before"]
    every_new_token_fires(out)
    base, tok = transformers.AutoTokenizer.from_pretrained(base_dir), transformers.AutoTokenizer.from_pretrained(out)
    assert json.loads(tok.backend_tokenizer.to_str())["pre_tokenizer"]["type"] == "Metaspace"
    for text in HELD_OUT:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    english = "The quick brown fox jumps over the lazy dog."
    assert tok.encode(english, add_special_tokens=False) == base.encode(english, add_special_tokens=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)


def test_the_sample_is_bounded_and_the_same_for_any_split_of_the_corpus():
    texts = [f"وثيقة رقم {i} " + "نص " * (i % 7) for i in range(300)]
    hashes = [hash(("seed", t)) & (2**64 - 1) for t in texts]
    whole = vocab.BottomSample(2000)
    for h, t in zip(hashes, texts, strict=True):
        whole.offer(h, t)
    parts = [vocab.BottomSample(2000) for _ in range(3)]
    for i, (h, t) in enumerate(zip(hashes, texts, strict=True)):
        parts[i % 3].offer(h, t)
    merged = vocab.merge_samples([p.sorted() for p in parts], 2000)
    expected = vocab.merge_samples([whole.sorted()], 2000)
    assert merged == expected and 2000 <= sum(len(t.encode()) for t in merged) < 2000 + 200
    smallest = sorted(zip(hashes, texts, strict=True))[: len(merged)]
    assert merged == [t for _, t in smallest]


def test_the_warm_up_moves_only_the_embeddings(tmp_path):
    from dhad_trainer.stages.base import StageRun
    from dhad_trainer.stages.pretrain import warm_embeddings

    model = transformers.AutoModelForCausalLM.from_pretrained(init_tiny_model(tmp_path / "m", vocab_size=300, seed=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": torch.randint(5, 300, (16,), generator=rng).numpy(), "position_ids": torch.arange(16).numpy(),
               "index": i} for i in range(8)]
    run = StageRun(spec=None, stage="pretrain", model_dir=tmp_path, work_dir=tmp_path / "work", output_dir=tmp_path / "o")
    kwargs = {"output_dir": str(tmp_path / "t"), "learning_rate": 0.05, "per_device_train_batch_size": 2,
              "use_cpu": True, "report_to": [], "disable_tqdm": True, "remove_unused_columns": False}
    warm_embeddings(run, model, blocks, kwargs, steps=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(p.requires_grad for p in model.parameters())
