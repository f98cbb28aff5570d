"""Settings of the Arabic data pipeline (`dhad prepare`): read, normalize, filter, dedup, decontaminate, pack.

The defaults are conservative: training text keeps its spelling (hamza, alef maqsura, ta marbuta and
tashkeel are meaning-bearing in Arabic and the model should learn to write them), and only encoding
noise (presentation forms, tatweel, whitespace) is cleaned. Dedup and decontamination never depend on
these switches: they compare an aggressively normalized matching key, so spelling variants still match.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import Field, StringConstraints

from dhad_api.base import DhadModel, Rule, RuledModel
from dhad_api.common import DataUri as Uri

FieldName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
LanguageCode = Annotated[str, StringConstraints(pattern=r"^[a-z]{2,3}$", max_length=3)]
SourceName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)]


class DigitStyle(StrEnum):
    """What to do with digits: leave them, or write all of them in one script."""

    KEEP = "keep"
    WESTERN = "western"
    ARABIC_INDIC = "arabic-indic"


class SourceFormat(StrEnum):
    """File format of a source; `auto` picks it from the extension (.jsonl/.json, .parquet, else text)."""

    AUTO = "auto"
    JSONL = "jsonl"
    PARQUET = "parquet"
    TEXT = "text"


class TextSplit(StrEnum):
    """How a plain-text file is cut into documents."""

    LINE = "line"
    PARAGRAPH = "paragraph"


class ShingleUnit(StrEnum):
    """Unit of the shingles that near-duplicate detection hashes."""

    WORDS = "words"
    CHARS = "chars"


class NormalizationSpec(DhadModel):
    """Orthographic normalization applied to the training text itself."""

    unify_alef: bool = Field(
        False,
        description="unifyAlef rewrites the hamza and madda alef forms (أ إ آ ٱ) as bare alef (ا). Default "
        "false: hamza spelling is kept so the model learns correct orthography.",
    )
    alef_maqsura_to_ya: bool = Field(
        False,
        description="alefMaqsuraToYa rewrites alef maqsura (ى) as ya (ي). Default false: they are distinct "
        "letters in standard spelling (على versus علي).",
    )
    ta_marbuta_to_ha: bool = Field(
        False,
        description="taMarbutaToHa rewrites ta marbuta (ة) as ha (ه). Default false: it changes the word.",
    )
    remove_tashkeel: bool = Field(
        False,
        description="removeTashkeel deletes the harakat: fatha, damma, kasra, the three tanwin, shadda, "
        "sukun, madda and hamza marks, superscript alef and Quranic annotation signs. Default false: "
        "vocalized text (Quran, poetry, teaching material) is kept as written.",
    )
    remove_tatweel: bool = Field(
        True,
        description="removeTatweel deletes the kashida/tatweel stretching character (ـ), which carries no "
        "meaning. Default true.",
    )
    arabic_indic_digits: DigitStyle = Field(
        DigitStyle.KEEP,
        description="arabicIndicDigits rewrites digits: keep leaves them, western turns Arabic-Indic "
        "(٠-٩) and Persian (۰-۹) digits into 0-9, arabic-indic turns 0-9 and Persian digits into ٠-٩. "
        "Default keep.",
    )
    nfkc: bool = Field(
        True,
        description="nfkc applies Unicode NFKC, which maps Arabic presentation forms and ligatures "
        "(ﻻ, ﷲ) to ordinary letters and composes hamza/madda sequences. Default true.",
    )
    collapse_whitespace: bool = Field(
        True,
        description="collapseWhitespace turns every run of spaces and tabs into one space, keeps at most one "
        "blank line between paragraphs and trims each line and the document. Default true.",
    )


class FilterSpec(RuledModel):
    """Document quality filters, applied after normalization."""

    min_arabic_ratio: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="minArabicRatio is the smallest share of letters that must be Arabic script for a "
        "document to be kept, from 0 to 1. Default 0.5. 0 keeps documents in any script.",
    )
    min_chars: int = Field(
        100,
        ge=0,
        le=100_000_000,
        description="minChars is the shortest document kept, in characters after normalization. Default "
        "100. Empty documents are always dropped, even with 0.",
    )
    max_chars: int = Field(
        1_000_000,
        ge=1,
        le=1_000_000_000,
        description="maxChars is the longest document kept, in characters after normalization; longer ones "
        "are dropped, not truncated. Default 1000000.",
    )
    max_repetition_ratio: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="maxRepetitionRatio is the largest allowed share of repeated content: the larger of the "
        "share of lines that repeat an earlier line and the share of words covered by a word n-gram "
        "(repetitionNgramWords long) that occurs more than once, from 0 to 1. Default 0.3. 1 disables it.",
    )
    repetition_ngram_words: int = Field(
        5,
        ge=2,
        le=50,
        description="repetitionNgramWords is the n-gram length, in words, that maxRepetitionRatio counts "
        "repeats of. Default 5.",
    )
    drop_bad_utf8: bool = Field(
        True,
        description="dropBadUtf8 drops records whose bytes are not valid UTF-8. Default true. When false "
        "the bad bytes become U+FFFD and the record goes on to the other filters.",
    )
    languages: list[LanguageCode] = Field(
        default_factory=lambda: ["ar"],
        max_length=32,
        description="languages are the ISO 639 codes a document's identified language must be one of "
        "(fastText lid.176; Egyptian Arabic counts as ar), at most 32. Default [ar]: Persian, Urdu and "
        "other Arabic-script text is dropped. Empty keeps every language.",
    )
    min_language_confidence: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="minLanguageConfidence is the lowest probability of the identified language for a "
        "document to count as that language, from 0 to 1. Default 0.5. Ignored when languages is empty.",
    )

    rules = (
        Rule("self.minChars <= self.maxChars", "filters: minChars must not exceed maxChars",
             lambda f: f.min_chars <= f.max_chars, ".minChars"),
    )


class SourceSpec(DhadModel):
    """One input dataset: a local path, a glob, or an object-store URI/prefix."""

    uri: Uri = Field(
        ...,
        description="uri is the file, directory, glob or s3:// prefix to read, 1 to 1024 characters. "
        "Required.",
    )
    format: SourceFormat = Field(
        SourceFormat.AUTO,
        description="format is the file format: auto, jsonl, parquet or text. Default auto: .jsonl/.json "
        "(optionally .gz) is jsonl, .parquet is parquet, anything else is text.",
    )
    text_field: FieldName = Field(
        "text",
        description="textField is the jsonl key or parquet column holding the document text, up to 128 "
        'characters. Default "text". Ignored for plain text.',
    )
    text_split: TextSplit = Field(
        TextSplit.LINE,
        description="textSplit says how plain-text files become documents: line (one document per "
        "non-blank line) or paragraph (blank-line-separated blocks). Default line. Ignored for jsonl and "
        "parquet.",
    )
    name: SourceName | None = Field(
        None,
        description="name labels the source in the stats (tokens before and after filtering and in the "
        "mixture), a DNS label. Default empty: source-<position>, counted from 0.",
    )
    weight: float = Field(
        1.0,
        gt=0,
        le=1000,
        description="weight is how many times each kept token of this source is seen per epoch of the "
        "mixture: 1 once, 2.5 two and a half times (upsampling), 0.25 a quarter of its blocks, chosen at "
        "random with the training seed (downsampling). Default 1.",
    )
    filters: FilterSpec | None = Field(
        None,
        description="filters replaces data.filters for this source (for example languages [en] and "
        "minArabicRatio 0 for English replay data). Default empty: data.filters.",
    )


class DedupSpec(DhadModel):
    """Exact and MinHash near-duplicate removal; the first document seen is the one kept."""

    exact: bool = Field(
        True,
        description="exact drops documents whose normalized matching key (letters and digits only, "
        "spelling variants unified) hashes equal to an earlier document's. Default true.",
    )
    near_duplicate: bool = Field(
        True,
        description="nearDuplicate drops documents whose estimated Jaccard similarity to an earlier document "
        "reaches threshold (MinHash LSH). Default true.",
    )
    threshold: float = Field(
        0.8,
        ge=0.1,
        le=0.99,
        description="threshold is the Jaccard similarity of shingle sets at which two documents count as "
        "near duplicates, from 0.1 to 0.99. Default 0.8.",
    )
    num_perm: int = Field(
        128,
        ge=16,
        le=1024,
        description="numPerm is the number of MinHash permutations; more is more precise and slower. "
        "Default 128.",
    )
    shingle_unit: ShingleUnit = Field(
        ShingleUnit.WORDS,
        description="shingleUnit is what a shingle is made of: words or chars. Default words.",
    )
    shingle_size: int = Field(
        5,
        ge=1,
        le=64,
        description="shingleSize is the shingle length, in shingleUnit units. Default 5.",
    )


class DecontaminationSpec(RuledModel):
    """Drops training documents that share a long word n-gram with an evaluation benchmark."""

    enabled: bool = Field(
        True,
        description="enabled turns decontamination on. Default true; with no benchmarks and no benchmark "
        "texts given in code it drops nothing.",
    )
    ngram_words: int = Field(
        13,
        ge=4,
        le=64,
        description="ngramWords is the length, in words of the normalized matching key, of the spans "
        "compared with benchmark questions. Default 13.",
    )
    min_question_words: int = Field(
        8,
        ge=1,
        le=64,
        description="minQuestionWords is the fewest words a question shorter than ngramWords words must "
        "have to be matched as a whole; shorter ones are ignored as too generic. Default 8.",
    )
    benchmarks: list[Uri] = Field(
        default_factory=list,
        max_length=64,
        description="benchmarks lists jsonl or parquet benchmark files (paths, globs or s3:// URIs, each up "
        "to 1024 characters, at most 64). Default empty: only benchmark texts passed in code are used.",
    )
    question_fields: list[FieldName] = Field(
        default_factory=lambda: ["question"],
        max_length=16,
        description="questionFields are the benchmark record fields whose text is indexed, at most 16. "
        'Default ["question"]. Empty indexes nothing from the files.',
    )

    rules = (
        Rule("self.minQuestionWords <= self.ngramWords", "decontamination: minQuestionWords must not exceed ngramWords",
             lambda d: d.min_question_words <= d.ngram_words, ".minQuestionWords"),
    )


class PackingSpec(DhadModel):
    """Tokenize and pack documents into fixed-length training blocks."""

    sequence_length: int = Field(
        4096,
        ge=16,
        le=1_048_576,
        description="sequenceLength is the length of every packed block, in tokens. Default 4096.",
    )
    add_eos: bool = Field(
        True,
        description="addEos puts the tokenizer's EOS token after every document. Default true.",
    )
    blocks_per_shard: int = Field(
        1024,
        ge=1,
        le=10_000_000,
        description="blocksPerShard is how many blocks each output parquet file holds (the last may hold "
        "fewer). Default 1024.",
    )


class DataPrepSpec(RuledModel):
    """The whole `prepare` sub-stage: where to read, how to clean, dedup, decontaminate, pack and mix."""

    sources: list[SourceSpec] = Field(
        ...,
        min_length=1,
        max_length=64,
        description="sources are the datasets to read, in order, 1 to 64 entries; earlier sources win "
        "when documents repeat across sources. Required.",
    )
    normalization: NormalizationSpec = Field(
        default_factory=NormalizationSpec,
        description="normalization is the orthographic normalization of the training text. Default: the "
        "NormalizationSpec defaults (NFKC, tatweel removed, whitespace collapsed, spelling kept).",
    )
    filters: FilterSpec = Field(
        default_factory=FilterSpec,
        description="filters are the quality filters. Default: the FilterSpec defaults.",
    )
    dedup: DedupSpec = Field(
        default_factory=DedupSpec,
        description="dedup configures exact and near-duplicate removal. Default: both on, threshold 0.8.",
    )
    decontamination: DecontaminationSpec = Field(
        default_factory=DecontaminationSpec,
        description="decontamination configures benchmark n-gram removal. Default: on, 13-word spans, "
        "no benchmark files.",
    )
    packing: PackingSpec = Field(
        default_factory=PackingSpec,
        description="packing configures tokenization into blocks. Default: 4096-token blocks with EOS.",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="workers is the number of pods of the prepare sub-stage's Indexed Job; each takes a "
        "fixed share of the input pieces, and a failed pod is retried alone. The prepared data does not "
        "depend on it. Default 1.",
    )
    split_megabytes: float = Field(
        64,
        gt=0,
        le=65536,
        description="splitMegabytes is the size of the input pieces workers share out: byte ranges of "
        "jsonl and line-split text files, runs of parquet row groups (gzip files and paragraph-split text "
        "are one piece each). Default 64. Part of the prepared data's identity.",
    )
    rules = (
        Rule("self.sources.all(x, !has(x.name) || self.sources.exists_one(y, has(y.name) && y.name == x.name))",
             "data.sources: names must be unique",
             lambda d: len({s.name for s in d.sources if s.name}) == len([s for s in d.sources if s.name]),
             ".sources"),
    )

    def source_names(self) -> list[str]:
        """Each source's name in the stats: its own, or source-<position>."""
        return [s.name or f"source-{i}" for i, s in enumerate(self.sources)]
