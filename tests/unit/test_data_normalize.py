"""Arabic normalization, quality filters and the data-prep API models."""

from __future__ import annotations

import enum

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dhad_api.base import DhadModel
from dhad_api.data_prep import (
    DataPrepSpec,
    DecontaminationSpec,
    DedupSpec,
    DigitStyle,
    FilterSpec,
    NormalizationSpec,
    PackingSpec,
    SourceSpec,
)
from dhad_trainer.data import filters
from dhad_trainer.data.filters import DropReason
from dhad_trainer.data.normalize import make_normalizer, match_words, normalize

OFF = NormalizationSpec(remove_tatweel=False, nfkc=False, collapse_whitespace=False)


def only(**on) -> NormalizationSpec:
    """A spec with everything off except the given options."""
    return OFF.model_copy(update=on)


# --- normalization, one option at a time, on real Arabic ------------------------------------------


def test_unify_alef_hamza_and_madda_forms():
    text = "أحمد إبراهيم آمن بٱلله"
    assert normalize(text, only(unify_alef=True)) == "احمد ابراهيم امن بالله"
    assert normalize(text, OFF) == text
    # hamza on waw/ya is not an alef and stays
    assert normalize("مسؤول بريء سئل", only(unify_alef=True)) == "مسؤول بريء سئل"


def test_alef_maqsura_to_ya():
    assert normalize("مشى إلى المستشفى", only(alef_maqsura_to_ya=True)) == "مشي إلي المستشفي"
    assert normalize("على", OFF) == "على"


def test_ta_marbuta_to_ha():
    assert normalize("مدرسة جميلة في القرية", only(ta_marbuta_to_ha=True)) == "مدرسه جميله في القريه"


def test_remove_tashkeel_harakat_shadda_sukun_tanwin_superscript_alef():
    on = only(remove_tashkeel=True)
    assert normalize("مُدَرِّسٌ", on) == "مدرس"  # damma, fatha, shadda, kasra, tanwin damm
    assert normalize("قُلْ كِتابًا جَديدًا لِطالِبٍ", on) == "قل كتابا جديدا لطالب"  # sukun, tanwin
    assert normalize("هٰذا ذٰلك الرَّحمٰن", on) == "هذا ذلك الرحمن"  # superscript alef U+0670
    assert normalize("مُدَرِّسٌ", OFF) == "مُدَرِّسٌ"


def test_remove_tatweel():
    assert normalize("جميـــل جداً", only(remove_tatweel=True)) == "جميل جداً"
    assert normalize("جميـــل", OFF) == "جميـــل"
    assert NormalizationSpec().remove_tatweel  # on by default: kashida carries no meaning


@pytest.mark.parametrize(
    ("style", "text", "want"),
    [
        (DigitStyle.WESTERN, "سنة ٢٠٢٤ و١٤٤٥ هـ", "سنة 2024 و1445 هـ"),
        (DigitStyle.WESTERN, "۰۱۲۳۴۵۶۷۸۹", "0123456789"),  # Persian digits
        (DigitStyle.WESTERN, "٠١٢٣٤٥٦٧٨٩", "0123456789"),
        (DigitStyle.ARABIC_INDIC, "صفحة 17 من ۲۵", "صفحة ١٧ من ٢٥"),
        (DigitStyle.KEEP, "صفحة 17 من ۲۵ و٣", "صفحة 17 من ۲۵ و٣"),
    ],
)
def test_digits(style, text, want):
    assert normalize(text, only(arabic_indic_digits=style)) == want


def test_nfkc_presentation_forms_and_ligatures():
    on = only(nfkc=True)
    assert normalize("\ufefb", on) == "لا"  # ARABIC LIGATURE LAM WITH ALEF ISOLATED FORM
    assert normalize("\ufef7", on) == "لأ"  # lam-alef with hamza above
    assert normalize("\ufe91\ufe8e\ufe91", on) == "باب"  # contextual forms of ba and alef
    assert normalize("\ufdf2", on) == "الله"
    assert normalize("ا\u0654", on) == "أ"  # alef + combining hamza composes
    assert normalize("\ufefb", OFF) == "\ufefb"


def test_collapse_whitespace_keeps_paragraphs():
    text = "  كلمة\t\tأخرى\u00a0 ثالثة  \r\n\n\n\n  فقرة ثانية  "
    assert normalize(text, only(collapse_whitespace=True)) == "كلمة أخرى ثالثة\n\nفقرة ثانية"


def test_defaults_are_conservative():
    # spelling (hamza, maqsura, ta marbuta, harakat) is kept; encoding noise is cleaned
    text = "إِلى  المدرســة\ufefb"
    assert normalize(text) == "إِلى المدرسةلا"


def test_deleting_tatweel_exposes_a_composition_and_is_still_idempotent():
    # alef + tatweel + combining hamza: removing tatweel lets NFKC compose أ, then unifyAlef applies
    spec = NormalizationSpec(unify_alef=True)
    assert normalize("ا\u0640\u0654", NormalizationSpec()) == "أ"
    assert normalize("ا\u0640\u0654", spec) == "ا"


def test_match_words_unifies_spelling_variants():
    a = match_words("أَلْقى المُعَلِّمُ مُحاضرةً عن الـــبيئة عام ٢٠٢٣ ، ومسؤولية الإنسان!")
    b = match_words("القي المعلم محاضره عن البيئه عام 2023 و مسوولية الانسان")
    assert a[:7] == b[:7] == ["القي", "المعلم", "محاضره", "عن", "البييه", "عام", "2023"]
    assert a[-1] == b[-1] == "الانسان"
    assert match_words("ﻻ ، ! ...") == ["لا"]


_ALPHABET = st.one_of(
    st.characters(min_codepoint=0x0600, max_codepoint=0x06FF),
    st.characters(min_codepoint=0xFB50, max_codepoint=0xFEFC),
    st.sampled_from(list(" \t\n\r\u00a0\u200cabcXYZ0123456789.,؟")),
)


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet=_ALPHABET, max_size=40),
    flags=st.lists(st.booleans(), min_size=7, max_size=7),
    digits=st.sampled_from(list(DigitStyle)),
)
def test_normalization_is_idempotent(text, flags, digits):
    names = ["unify_alef", "alef_maqsura_to_ya", "ta_marbuta_to_ha", "remove_tashkeel"]
    names += ["remove_tatweel", "nfkc", "collapse_whitespace"]
    spec = NormalizationSpec(**dict(zip(names, flags, strict=True)), arabic_indic_digits=digits)
    norm = make_normalizer(spec)
    once = norm(text)
    assert norm(once) == once


# --- filters --------------------------------------------------------------------------------------


def test_arabic_ratio_counts_letters_only():
    assert filters.arabic_ratio("مرحبا 123 !!!") == 1.0
    assert filters.arabic_ratio("abcd مرحبا") == pytest.approx(5 / 9)
    assert filters.arabic_ratio("12345 ...") == 0.0
    assert filters.arabic_ratio("\ufefb\ufe8d") == 1.0  # presentation forms are Arabic script


def test_repetition_lines_and_ngrams():
    assert filters.duplicate_line_ratio("سطر أول\nسطر ثان\nسطر أول\nسطر أول") == pytest.approx(0.5)
    assert filters.duplicate_line_ratio("سطر واحد فقط") == 0.0
    words = "اشترك الآن في قناتنا المميزة".split() * 4
    assert filters.repeated_ngram_ratio(words, 5) == 1.0
    assert filters.repeated_ngram_ratio("كل كلمة هنا تظهر مرة واحدة فقط في هذه الجملة".split(), 3) == 0.0


def test_decode_utf8():
    assert filters.decode_utf8("نص") == "نص"
    assert filters.decode_utf8("نص".encode()) == "نص"
    assert filters.decode_utf8(b"\xd9\x86\xff") is None
    assert filters.decode_utf8(b"\xd9\x86\xff", drop_bad=False) == "ن\ufffd"


def test_check_reasons_in_order():
    spec = FilterSpec(min_chars=10, max_chars=200, min_arabic_ratio=0.5, max_repetition_ratio=0.3)
    good = "ذهب الطلاب إلى الحديقة العامة بعد انتهاء الدروس"
    assert filters.check(good, spec) is None
    assert filters.check("", FilterSpec(min_chars=0)) is DropReason.TOO_SHORT
    assert filters.check("قصير", spec) is DropReason.TOO_SHORT
    assert filters.check(good * 10, spec) is DropReason.TOO_LONG
    assert filters.check("This sentence is written in English only.", spec) is DropReason.LOW_ARABIC_RATIO
    assert filters.check("تخفيضات كبيرة اليوم\n" * 4, spec) is DropReason.REPETITIVE
    assert (
        filters.check("تخفيضات كبيرة اليوم\n" * 4, spec.model_copy(update={"max_repetition_ratio": 1}))
        is None
    )


# --- API models -----------------------------------------------------------------------------------

MODELS = [
    SourceSpec,
    NormalizationSpec,
    FilterSpec,
    DedupSpec,
    DecontaminationSpec,
    PackingSpec,
    DataPrepSpec,
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_fields_follow_api_conventions(model):
    assert issubclass(model, DhadModel)
    schema = model.model_json_schema(by_alias=True)
    defs = schema.get("$defs", {})
    for name, prop in schema["properties"].items():
        desc = model.model_fields[_snake(model, name)].description
        assert desc and desc.startswith(name + " "), (model.__name__, name, desc)
        assert "Default" in desc or "Required" in desc, (name, desc)
        if "$ref" in prop or "allOf" in prop:
            continue
        kind = prop.get("type")
        if kind == "string":
            assert "maxLength" in prop, name
        if kind == "array":
            items = prop["items"]
            items = defs.get(items.get("$ref", "").rsplit("/", 1)[-1], items)
            assert "maxItems" in prop and ("maxLength" in items or items.get("type") == "object"), name
        if kind in ("integer", "number"):
            assert ("minimum" in prop or "exclusiveMinimum" in prop) and "maximum" in prop, name


def _snake(model, alias):
    return next(n for n, f in model.model_fields.items() if (f.alias or n) == alias)


def test_enums_are_str_enums_and_round_trip_camel_case():
    spec = DataPrepSpec.model_validate(
        {
            "sources": [{"uri": "s3://corpus/ar/", "format": "parquet", "textField": "content"}],
            "normalization": {"arabicIndicDigits": "western", "removeTashkeel": True},
            "dedup": {"shingleUnit": "chars", "shingleSize": 7},
        }
    )
    assert spec.normalization.arabic_indic_digits is DigitStyle.WESTERN
    data = spec.to_json_dict()
    assert data["sources"][0]["textField"] == "content"
    assert DataPrepSpec.model_validate(data) == spec
    choices = {
        f.annotation for m in MODELS for f in m.model_fields.values() if isinstance(f.annotation, type)
    }
    enums = {c for c in choices if issubclass(c, enum.Enum)}
    assert len(enums) == 4 and all(issubclass(e, str) for e in enums)  # digits, format, split, shingle


@pytest.mark.parametrize(
    "bad",
    [
        {"sources": []},
        {"sources": [{"uri": ""}]},
        {"sources": [{"uri": "a", "typo": 1}]},
        {"sources": [{"uri": "a"}], "filters": {"minChars": 500, "maxChars": 100}},
        {"sources": [{"uri": "a"}], "filters": {"minArabicRatio": 1.5}},
        {"sources": [{"uri": "a"}], "normalization": {"arabicIndicDigits": "roman"}},
        {"sources": [{"uri": "a"}], "decontamination": {"ngramWords": 5, "minQuestionWords": 9}},
        {"sources": [{"uri": "a"}], "packing": {"sequenceLength": 0}},
    ],
)
def test_invalid_specs_are_rejected(bad):
    with pytest.raises(pydantic.ValidationError):
        DataPrepSpec.model_validate(bad)
