"""Benchmark decontamination: drop training documents sharing a long word n-gram with an eval question.

Training on benchmark text inflates the scores Dhad reports, so this runs before packing. Both sides
are compared as matching-key words (normalize.match_words), so tashkeel, hamza spelling or digit
script differences cannot hide a copy. Questions shorter than N words are matched whole when they have
at least `min_question_words` words (shorter ones are too generic to flag a document).
"""

from __future__ import annotations

from collections.abc import Iterable

from dhad_api.data_prep import DecontaminationSpec, SourceSpec
from dhad_trainer.data.filters import decode_utf8
from dhad_trainer.data.normalize import match_words
from dhad_trainer.data.readers import ObjectStore, ReadCounts, iter_source


class Decontaminator:
    """An in-memory set of benchmark word n-grams, keyed by n-gram length."""

    def __init__(self, questions: Iterable[str] = (), ngram_words: int = 13, min_question_words: int = 8):
        if not 1 <= min_question_words <= ngram_words:
            raise ValueError("need 1 <= min_question_words <= ngram_words")
        self.n = ngram_words
        self.min_words = min_question_words
        self._grams: dict[int, set[str]] = {}
        self._prefixes: set[str] = set()  # first min_words words of every gram: one probe per position
        self.questions = 0
        for q in questions:
            self.add(q)

    def add(self, question: str) -> None:
        """Index one benchmark text (a question, or any field worth protecting)."""
        words = match_words(question)
        if len(words) < self.min_words:
            return
        self.questions += 1
        n = min(self.n, len(words))
        grams = self._grams.setdefault(n, set())
        for i in range(len(words) - n + 1):
            grams.add(" ".join(words[i : i + n]))
            self._prefixes.add(" ".join(words[i : i + self.min_words]))

    def __len__(self) -> int:
        return sum(len(g) for g in self._grams.values())

    def is_contaminated(self, words: list[str]) -> bool:
        """True if the document's matching-key words contain any indexed n-gram."""
        m = self.min_words
        for i in range(len(words) - m + 1):
            if " ".join(words[i : i + m]) not in self._prefixes:
                continue
            for n, grams in self._grams.items():
                if i + n <= len(words) and " ".join(words[i : i + n]) in grams:
                    return True
        return False


def load_benchmark_texts(
    spec: DecontaminationSpec, store: ObjectStore | None = None, counts: ReadCounts | None = None
) -> list[str]:
    """All `question_fields` strings from the benchmark files in `spec` (jsonl or parquet).

    Records lacking a field are normal in benchmarks (not every file has every field) and are skipped;
    a missing or empty benchmark file raises DataError like any source.
    """
    texts: list[str] = []
    for uri in spec.benchmarks:
        for field in spec.question_fields:
            src = SourceSpec(uri=uri, text_field=field)
            for item in iter_source(src, store, counts if counts is not None else ReadCounts()):
                text = decode_utf8(item, drop_bad=False)
                if text:
                    texts.append(text)
    return texts


def build_decontaminator(
    spec: DecontaminationSpec, extra_texts: Iterable[str] = (), store: ObjectStore | None = None
) -> Decontaminator:
    """The index for `spec`: benchmark files plus texts given in code (e.g. already-loaded questions)."""
    deco = Decontaminator(extra_texts, spec.ngram_words, spec.min_question_words)
    for text in load_benchmark_texts(spec, store):
        deco.add(text)
    return deco
