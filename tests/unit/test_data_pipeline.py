"""The `prepare` data pipeline: readers, dedup, decontamination, packing and the end-to-end stats."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhad_api.data_prep import (
    DataPrepSpec,
    DecontaminationSpec,
    DedupSpec,
    FilterSpec,
    NormalizationSpec,
    PackingSpec,
    ShingleUnit,
    SourceSpec,
    TextSplit,
)
from dhad_trainer.data import DataError, ReadCounts
from dhad_trainer.data.decontam import Decontaminator, build_decontaminator
from dhad_trainer.data.dedup import Banding, candidate_pairs, exact_key, gid, later_exact_copies, verified
from dhad_trainer.data.normalize import make_normalizer, match_words
from dhad_trainer.data.pack import Packer, pack_texts, tokenize_batches
from dhad_trainer.data.prepare import prepare
from dhad_trainer.data.readers import iter_jsonl, iter_parquet, iter_source, iter_text, resolve
from tests.conftest import ACEGPT

EXAMS = ACEGPT / "EXAMS_Arabic" / "exam_test.jsonl"

# Documents written for these tests, on unrelated topics so none is a near duplicate of another.
DOC_A = (
    "في صباح كل يوم يخرج سكان المدينة القديمة إلى الأسواق الضيقة، حيث تفوح رائحة القهوة المحمصة من "
    "الدكاكين الصغيرة، ويتبادل الباعة التحية مع المارة قبل أن تشتد حرارة الشمس وتزدحم الطرقات بالعربات "
    "والسياح القادمين من كل مكان."
)
# the same text with tatweel and a tanwin: a different string, the same matching key
DOC_A_VARIANT = DOC_A.replace("القديمة", "القديـــمة").replace("يوم", "يومٍ")
DOC_B = (
    "تعد المكتبات العامة من أهم المؤسسات الثقافية في أي مجتمع، فهي تتيح للقراء من مختلف الأعمار فرصة "
    "الوصول إلى الكتب والمراجع دون مقابل. وقد حرصت مدن عربية كثيرة خلال العقود الماضية على إنشاء مكتبات "
    "حديثة تضم قاعات للمطالعة وأركانا مخصصة للأطفال ومختبرات للحاسوب. ويقول أمناء هذه المكتبات إن عدد "
    "الزوار يرتفع في العطلة الصيفية، حين يبحث الطلاب عن أنشطة مفيدة تملأ أوقات فراغهم. كما تنظم بعض "
    "المكتبات ورش عمل في الكتابة الإبداعية والخط العربي، وتستضيف أدباء يتحدثون عن تجاربهم مع الجمهور. "
    "ويرى المختصون أن دعم هذه المؤسسات يسهم في نشر عادة القراءة وتعزيز مهارات التفكير النقدي لدى "
    "الأجيال الناشئة."
)
DOC_B_PARAPHRASE = DOC_B.replace("العطلة الصيفية", "الإجازة الصيفية")  # one word changed
DOC_D = (
    "يعتمد المزارعون في الواحات على مياه الآبار الجوفية لري أشجار النخيل والحمضيات، ويستخدم كثير منهم "
    "اليوم أنظمة الري بالتنقيط التي توفر الماء وتقلل من ملوحة التربة، مما ساعد على زيادة المحصول في "
    "المواسم الأخيرة."
)
DOC_E = (
    "انطلقت صباح أمس فعاليات معرض الكتاب السنوي بمشاركة دور نشر من عشرين دولة،\n"
    "وشهد اليوم الأول إقبالا كبيرا من العائلات والطلاب الباحثين عن الإصدارات الجديدة."
)
DOC_F = (
    "أعلن فريق من الباحثين في جامعة محلية عن تطوير تطبيق يساعد مرضى السكري على متابعة مستويات السكر "
    "في الدم،\nويرسل التطبيق تنبيهات إلى الطبيب المعالج عند حدوث أي تغير مفاجئ."
)
DOC_G = (
    "تشتهر الموسيقى الأندلسية بمقاماتها المتنوعة وأشعارها الرقيقة، وقد حافظت عليها عائلات في المغرب "
    "العربي جيلا بعد جيل، حتى أصبحت اليوم جزءا من التراث الذي تحتفي به المهرجانات الفنية."
)
QUESTION = "ما الاسم الذي أطلقه الجغرافيون العرب على المنطقة الواقعة بين نهري دجلة والفرات في العصور القديمة"
# 13 words of QUESTION (words 2-14), written with harakat, inside an otherwise new text
DOC_CONTAMINATED = (
    "كتب أحد المعلمين في مدونته أن طلابه سألوه ذات يوم عن الاسمِ الذي أطلقه الجُغرافيّون العربُ على "
    "المنطقة الواقعة بين نهري دجلة والفرات في حصة التاريخ، ثم شرح لهم حضارات تلك البلاد المتعاقبة."
)
ENGLISH = "The quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence."
REPETITIVE = "اشترك الآن في قناتنا المميزة\n" * 5
TOO_LONG = " ".join(f"كلمة{i}" for i in range(400))  # repeats nothing, but over maxChars
FILTERS = FilterSpec(min_chars=40, max_chars=1500)


@pytest.fixture(scope="session")
def tokenizer():
    """A tiny byte-level BPE trained here on the test documents, wrapped as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([DOC_A, DOC_B, DOC_D, DOC_E, DOC_F, DOC_G, QUESTION], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="session")
def tokenizer_dir(tokenizer, tmp_path_factory):
    """The same tokenizer as a folder: what the prepare pipeline loads (each worker loads its own)."""
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


def jsonl_bytes(*records) -> bytes:
    """Records may be dicts (dumped) or raw bytes (written as they are, for broken lines)."""
    lines = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in records]
    return b"\n".join(lines) + b"\n"


BAD_UTF8_JSON = b'{"text": "' + "نص عربي".encode() + b"\xff\xfe" + " تالف".encode() + b'"}'


# --- readers --------------------------------------------------------------------------------------


def test_jsonl_counts_and_skips_broken_records():
    data = jsonl_bytes(
        {"text": DOC_A},
        b'{"text": "unterminated',
        {"content": DOC_D},
        {"text": 42},
        b"[1, 2]",
        b"",
        BAD_UTF8_JSON,
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"id": "\xff", "text": "' + "سليم".encode() + b'"}',  # bad bytes outside the text field
    )
    counts = ReadCounts()
    out = list(iter_jsonl(io.BytesIO(data), "text", counts))
    assert (counts.records, counts.bad_record) == (8, 4)
    assert out[0] == DOC_A and out[-1] == "سليم"
    assert [type(x) for x in out] == [str, bytes, bytes, str]
    assert out[1] == "نص عربي".encode() + b"\xff\xfe" + " تالف".encode()


def test_text_lines_and_paragraphs():
    data = b"\xd8\xb3\xd8\xb7\xd8\xb1 1\r\n\n  \nline 2\n\xff bad\n\npara end\n"
    counts = ReadCounts()
    assert list(iter_text(io.BytesIO(data), TextSplit.LINE, counts)) == [
        "سطر 1",
        "line 2",
        b"\xff bad",
        "para end",
    ]
    assert counts.records == 4
    counts = ReadCounts()
    paras = list(iter_text(io.BytesIO(data), TextSplit.PARAGRAPH, counts))
    assert paras == ["سطر 1", b"line 2\n\xff bad", "para end"] and counts.records == 3


def test_parquet_batches_nulls_binary_and_missing_column(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"وثيقة رقم {i}" for i in range(2500)] + [None]
    pq.write_table(pa.table({"text": texts, "raw": [b"\xff"] * 2501, "n": list(range(2501))}), path)
    counts = ReadCounts()
    with open(path, "rb") as f:
        out = list(iter_parquet(f, "text", counts, batch_size=1000))
    assert out == texts[:-1] and (counts.records, counts.bad_record) == (2501, 1)
    for field, bad in (("raw", 0), ("n", 2501), ("absent", 2501)):
        counts = ReadCounts()
        with open(path, "rb") as f:
            got = list(iter_parquet(f, field, counts))
        assert counts.bad_record == bad and len(got) == 2501 - bad
        if field == "raw":
            assert got[0] == b"\xff"


def test_resolve_glob_directory_gzip_and_hidden_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes({"text": DOC_A}))
    with gzip.open(tmp_path / "sub" / "b.jsonl.gz", "wb") as f:
        f.write(jsonl_bytes({"text": DOC_D}, {"text": DOC_G}))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / ".a.jsonl.swp").write_text("x")
    assert resolve(str(tmp_path)) == [str(tmp_path / "a.jsonl"), str(tmp_path / "sub" / "b.jsonl.gz")]
    assert resolve(str(tmp_path / "*.jsonl")) == [str(tmp_path / "a.jsonl")]
    assert list(iter_source(SourceSpec(uri=str(tmp_path)))) == [DOC_A, DOC_D, DOC_G]


class DictStore:
    """An in-memory object store (the shape the S3 store plugs in with); streams are not seekable."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects

    def open(self, uri):
        stream = io.BufferedReader(io.BytesIO(self.objects[uri]))
        stream.seekable = lambda: False
        return stream

    def list(self, prefix):
        return sorted(k for k in self.objects if k.startswith(prefix))


def test_object_store_protocol(tmp_path):
    buf = io.BytesIO()
    pq.write_table(pa.table({"body": [DOC_B, DOC_G]}), buf)
    store = DictStore(
        {
            "s3://corpus/ar/part-0.jsonl": jsonl_bytes({"body": DOC_A}),
            "s3://corpus/ar/part-1.parquet": buf.getvalue(),
            "s3://corpus/ar-old/x.jsonl": jsonl_bytes({"body": ENGLISH}),
        }
    )
    got = list(iter_source(SourceSpec(uri="s3://corpus/ar", text_field="body"), store))
    assert got == [DOC_A, DOC_B, DOC_G]
    with pytest.raises(DataError, match="s3://corpus/missing"):
        list(iter_source(SourceSpec(uri="s3://corpus/missing"), store))


def test_missing_path_and_empty_dataset_raise_data_error_naming_the_path(tmp_path, tokenizer_dir):
    missing = tmp_path / "nowhere" / "data.jsonl"
    with pytest.raises(DataError, match=str(missing)):
        list(iter_source(SourceSpec(uri=str(missing))))
    with pytest.raises(DataError, match=str(missing)):
        prepare(DataPrepSpec(sources=[{"uri": str(missing)}]), tokenizer_dir, tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    with pytest.raises(DataError, match=f"{empty}: empty dataset"):
        list(iter_source(SourceSpec(uri=str(empty))))
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(jsonl_bytes({"content": DOC_A}, b"{oops"))
    with pytest.raises(DataError, match=f"{broken}: all 2 records are broken"):
        prepare(DataPrepSpec(sources=[{"uri": str(broken)}]), tokenizer_dir, tmp_path / "out2")


# --- dedup and decontamination --------------------------------------------------------------------


def test_exact_key_uses_the_matching_key():
    key = exact_key(match_words(DOC_A))
    assert exact_key(match_words(DOC_A_VARIANT)) == key
    assert exact_key(match_words(DOC_A.replace("،", " ,"))) == key  # punctuation is not part of the key
    assert exact_key(match_words(DOC_B_PARAPHRASE)) != exact_key(match_words(DOC_B))


def test_later_exact_copies_keeps_the_first_of_each_key():
    docs = [DOC_A, DOC_B, DOC_A_VARIANT, DOC_D, DOC_A, DOC_B]
    keys = [exact_key(match_words(d)) for d in docs]
    high = np.array([k[0] for k in keys], dtype=np.uint64)
    low = np.array([k[1] for k in keys], dtype=np.uint64)
    gids = np.array([gid(i // 3, i % 3) for i in range(6)], dtype=np.uint64)  # two pieces of three
    order = np.random.default_rng(0).permutation(6)  # the order entries arrive in does not matter
    later = sorted(later_exact_copies(high[order], low[order], gids[order]).tolist())
    assert later == [gid(0, 2), gid(1, 1), gid(1, 2)]


@pytest.mark.parametrize("unit", list(ShingleUnit))
def test_banding_finds_and_verifies_a_one_word_paraphrase(unit):
    banding = Banding(DedupSpec(shingle_unit=unit, shingle_size=5 if unit is ShingleUnit.WORDS else 8))
    docs = [DOC_A, DOC_B, DOC_D, DOC_G, DOC_B_PARAPHRASE, DOC_E]
    sigs = np.stack([banding.signature(match_words(d)) for d in docs])
    keys = banding.band_keys(sigs)
    assert keys.shape == (6, banding.bands)
    gids = np.arange(6, dtype=np.uint64)
    pairs = np.unique(np.concatenate([candidate_pairs(keys[:, b], gids) for b in range(banding.bands)]), axis=0)
    ok = verified(sigs[pairs[:, 0].astype(int)], sigs[pairs[:, 1].astype(int)], banding.spec.threshold)
    assert pairs[ok].tolist() == [[1, 4]]  # DOC_B and its paraphrase, earlier first


def test_candidate_pairs_pair_each_member_with_the_run_start_and_predecessors():
    keys = np.array([7, 7, 3, 7, 7, 7, 7, 7, 3], dtype=np.uint64)
    gids = np.array([10, 11, 12, 13, 14, 15, 16, 17, 18], dtype=np.uint64)
    pairs = {tuple(p) for p in candidate_pairs(keys, gids).tolist()}
    assert (12, 18) in pairs and all(a < b for a, b in pairs)
    assert {(10, 17), (13, 17), (14, 17), (15, 17), (16, 17)} <= pairs and (11, 17) not in pairs


def test_decontamination_13_word_span():
    deco = Decontaminator([QUESTION], ngram_words=13)
    assert deco.is_contaminated(match_words(DOC_CONTAMINATED))
    twelve = "سأل الطالب عن " + " ".join(QUESTION.split()[1:13]) + " وانتهى الدرس"
    assert not deco.is_contaminated(match_words(twelve))
    assert not deco.is_contaminated(match_words(DOC_B))
    short = Decontaminator(["من هو مؤلف كتاب البخلاء", "ما عاصمة مصر"], 13, min_question_words=5)
    assert short.questions == 1
    assert short.is_contaminated(match_words("سؤال اليوم: من هو مؤلف كتاب البُخلاء؟ الجواب الجاحظ"))
    assert not short.is_contaminated(match_words("ما عاصمة مصر"))


@pytest.mark.benchmarks
def test_decontamination_against_real_exams_questions():
    deco = build_decontaminator(DecontaminationSpec(benchmarks=[str(EXAMS)]))
    assert deco.questions > 400
    questions = [json.loads(line)["question"] for line in EXAMS.read_text().splitlines()]
    long_q = next(q for q in questions if len(match_words(q)) >= 16)
    plain = make_normalizer(NormalizationSpec(remove_tashkeel=True))(long_q)  # harakat dropped
    doc = "راجعت اليوم أسئلة الامتحان مع أصدقائي، وكان منها: " + plain + " وقد أجبنا عنه بسهولة."
    assert deco.is_contaminated(match_words(doc))
    assert not deco.is_contaminated(match_words(DOC_B)) and not deco.is_contaminated(match_words(DOC_G))


# --- packing --------------------------------------------------------------------------------------


def check_blocks(blocks, docs, length, eos, tail):
    """Blocks are the stream (doc + EOS ...) cut into `length` pieces, with restarting positions."""
    stream = [t for d in docs for t in ([*d, eos] if eos is not None else d) if d or eos is not None]
    assert len(stream) == len(blocks) * length + tail
    assert [t for b in blocks for t in b.input_ids] == stream[: len(blocks) * length]
    starts, pos = set(), 0
    for d in docs:
        n = len(d) + (eos is not None)
        if n:
            starts.add(pos)
        pos += n
    for i, b in enumerate(blocks):
        assert len(b.input_ids) == len(b.position_ids) == sum(b.seq_lens) == length
        assert b.position_ids[0] == 0
        for j in range(1, length):
            at_doc_start = i * length + j in starts
            assert b.position_ids[j] == (0 if at_doc_start else b.position_ids[j - 1] + 1)
        cuts = [sum(b.seq_lens[:k]) for k in range(len(b.seq_lens))]
        assert [b.position_ids[c] for c in cuts] == [0] * len(cuts)


def test_packer_eos_between_docs_and_restarting_positions():
    packer = Packer(8, eos_id=0)
    docs = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [14], [15, 16]]
    blocks = [b for d in docs for b in packer.add(d)]
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 0, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 0, 14]]
    assert [b.position_ids for b in blocks] == [[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0]]
    assert [b.seq_lens for b in blocks] == [[4, 4], [7, 1]]
    assert packer.pending == 4 and packer.finish() == 4  # [0, 15, 16, 0] is dropped, not padded
    assert packer.tokens == 2 * 8 + 4 and packer.blocks == 2 and packer.documents == 4


@settings(max_examples=200, deadline=None)
@given(
    docs=st.lists(st.lists(st.integers(1, 50), max_size=30), max_size=12),
    length=st.integers(1, 20),
    eos=st.sampled_from([None, 0]),
)
def test_packing_conserves_tokens(docs, length, eos):
    packer = Packer(length, eos)
    blocks = [b for d in docs for b in packer.add(d)]
    tail = packer.finish()
    assert packer.tokens == len(blocks) * length + tail and 0 <= tail < length
    check_blocks(blocks, docs, length, eos, tail)


def test_tokenize_batches_matches_one_by_one(tokenizer):
    texts = [DOC_A, DOC_D, DOC_E, DOC_F, DOC_G]
    single = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert list(tokenize_batches(tokenizer, texts, batch_size=2)) == single
    assert tokenizer.decode(single[0]) == DOC_A


def test_pack_texts_with_hf_tokenizer(tokenizer):
    texts = [DOC_A, DOC_D, DOC_G]
    packer, blocks = pack_texts(texts, tokenizer, PackingSpec(sequence_length=32), batch_size=2)
    blocks = list(blocks)
    tail = packer.finish()
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    check_blocks(blocks, docs, 32, tokenizer.eos_token_id, tail)
    packer, blocks = pack_texts(texts, tokenizer, PackingSpec(sequence_length=32, add_eos=False))
    assert tokenizer.eos_token_id not in [t for b in blocks for t in b.input_ids]
    no_eos = type(tokenizer)(tokenizer_object=tokenizer.backend_tokenizer)
    with pytest.raises(ValueError, match="eos"):
        pack_texts(texts, no_eos, PackingSpec())


# --- the whole pipeline ---------------------------------------------------------------------------


def write_corpus(root: Path) -> list:
    """Three sources (jsonl, paragraph text, parquet) with one of every drop reason."""
    (root / "web").mkdir()
    (root / "web" / "part-0.jsonl").write_bytes(
        jsonl_bytes(
            {"text": DOC_A},  # kept
            {"text": DOC_A_VARIANT},  # exact_duplicate
            {"text": DOC_B},  # kept
            {"text": DOC_B_PARAPHRASE},  # near_duplicate
            {"text": ENGLISH},  # low_arabic_ratio
            b'{"text": "' + DOC_D.encode(),  # bad_record: broken JSON
            {"content": DOC_D},  # bad_record: missing field
            {"text": 42},  # bad_record: not a string
            BAD_UTF8_JSON,  # bad_utf8
            {"text": "مرحبا بكم"},  # too_short
            {"text": REPETITIVE},  # repetitive
            {"text": DOC_CONTAMINATED},  # contaminated
            b"",
            {"text": DOC_D},  # kept
            {"text": TOO_LONG},  # too_long
        )
    )
    bad_para = "فقرة فيها بايتات تالفة في منتصفها تماما".encode() + b"\xc3\x28\n"
    (root / "books.txt").write_bytes((DOC_E + "\n\n\n" + DOC_F + "\n\n").encode() + bad_para)
    pq.write_table(pa.table({"text": [DOC_G, None, DOC_A]}), root / "news.parquet")  # kept, bad, exact
    (root / "bench.jsonl").write_bytes(jsonl_bytes({"question": QUESTION, "answer": "أ"}, {"id": 7}))
    return [
        {"uri": str(root / "web")},
        {"uri": str(root / "books.txt"), "textSplit": "paragraph"},
        {"uri": str(root / "*.parquet")},
    ]


def test_prepare_end_to_end_exact_stats(tmp_path, tokenizer, tokenizer_dir):
    sources = write_corpus(tmp_path)
    spec = DataPrepSpec(
        sources=sources,
        filters=FILTERS,
        decontamination={"benchmarks": [str(tmp_path / "bench.jsonl")]},
        packing={"sequenceLength": 64, "blocksPerShard": 8},
    )
    out = tmp_path / "out"
    stats = prepare(spec, tokenizer_dir, out)

    assert stats["dropped"] == {
        "bad_record": 4,
        "bad_utf8": 2,
        "too_short": 1,
        "too_long": 1,
        "low_arabic_ratio": 1,
        "language": 0,
        "repetitive": 1,
        "exact_duplicate": 2,
        "near_duplicate": 1,
        "contaminated": 1,
    }
    assert stats["documents_in"] == 20 and stats["kept"] == 6
    assert stats["documents_in"] == stats["kept"] + sum(stats["dropped"].values())
    per_source = {s["name"]: (s["documents_in"], s["kept"]) for s in stats["sources"]}
    assert per_source == {"source-0": (14, 3), "source-1": (3, 2), "source-2": (3, 1)}
    for s in stats["sources"]:
        assert s["documents_in"] == s["kept"] + sum(s["dropped"].values())

    norm = make_normalizer(spec.normalization)
    kept_by_source = [(DOC_A, DOC_B, DOC_D), (DOC_E, DOC_F), (DOC_G,)]
    docs = [[tokenizer(norm(d), add_special_tokens=False)["input_ids"] for d in group] for group in kept_by_source]
    assert stats["tokens"] == sum(len(d) + 1 for group in docs for d in group)
    assert stats["tokens"] == stats["blocks"] * 64 + stats["dropped_tail_tokens"]
    assert json.loads((out / "stats.json").read_text()) == stats
    manifest = json.loads((out / "MANIFEST.json").read_text())
    assert not (out / "work").exists()  # the passes' intermediate files are removed at the end

    for group, src in zip(docs, manifest["sources"], strict=True):
        rows = [r for path, _ in src["shards"] for r in pq.read_table(out / path).to_pylist()]
        assert len(rows) == sum(b for _, b in src["shards"])
        tail = next(s for s in stats["sources"] if s["name"] == src["name"])["dropped_tail_tokens"]
        check_written_blocks(rows, group, 64, tokenizer.eos_token_id, tail)
    table = pq.read_table(out / manifest["sources"][0]["shards"][0][0])
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("position_ids").type == pa.list_(pa.int32())


def check_written_blocks(rows, docs, length, eos, tail):
    """Shards hold the token stream in order; positions restart after every EOS and at block starts."""
    stream = [t for d in docs for t in [*d, eos]]
    assert len(stream) == len(rows) * length + tail
    assert [t for r in rows for t in r["input_ids"]] == stream[: len(rows) * length]
    eos_at = {i for i, t in enumerate(stream) if t == eos}
    for i, r in enumerate(rows):
        pos = r["position_ids"]
        assert len(pos) == len(r["input_ids"]) == length
        for j in range(length):
            assert pos[j] == (0 if j == 0 or (i * length + j - 1) in eos_at else pos[j - 1] + 1)


def test_prepare_with_everything_off_keeps_all_good_records(tmp_path, tokenizer_dir):
    sources = write_corpus(tmp_path)
    spec = DataPrepSpec(
        sources=sources,
        filters={"minChars": 0, "minArabicRatio": 0, "maxRepetitionRatio": 1, "dropBadUtf8": False, "languages": []},
        dedup={"exact": False, "nearDuplicate": False},
        decontamination={"enabled": False},
        packing={"sequenceLength": 16},
    )
    stats = prepare(spec, tokenizer_dir, tmp_path / "out")
    assert stats["dropped"]["bad_record"] == 4 and stats["dropped"]["too_long"] == 0
    assert stats["kept"] == 16 and sum(stats["dropped"].values()) == 4
