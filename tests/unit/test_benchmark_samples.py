"""Dhad's own benchmark samples (what the demo evaluates on where the AceGPT files are absent): every
suite loads in the real files' formats, through a listing object store too, and no sample item is a
copy of a real benchmark item."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import pytest

from dhad_trainer.evaluation.arabic import fold
from dhad_trainer.evaluation.duplicates import near_pairs
from dhad_trainer.evaluation.loaders import (
    LETTERS,
    MC_SUITES,
    NO,
    OPEN_SUITES,
    SAMPLE_BENCHMARKS,
    SUITES,
    YES,
    acegpt_files,
    load_suite,
)
from dhad_trainer.evaluation.mmlu_subjects import SUBJECT_CATEGORY
from dhad_trainer.local import demo
from tests.conftest import ACEGPT


class ListingStore:
    """An object store over a local folder that can list, as the S3 store can."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root, self.prefix = root, prefix.rstrip("/")

    def open(self, uri: str) -> IO[bytes]:
        return (self.root / uri.removeprefix(self.prefix + "/")).open("rb")

    def list(self, prefix: str) -> list[str]:
        folder = self.root / prefix.removeprefix(self.prefix + "/")
        return sorted(f"{prefix.rstrip('/')}/{p.name}" for p in folder.iterdir())


@pytest.mark.parametrize("suite", SUITES)
def test_each_suite_has_a_few_dozen_items_in_the_real_format(suite: str) -> None:
    test = load_suite(suite, SAMPLE_BENCHMARKS)
    assert 24 <= len(test) <= 60, len(test)  # the demo takes 24 of each
    assert len({i.id for i in test}) == len(test)
    assert all(i.question and not i.question.isascii() for i in test)  # Arabic text
    if suite == "acva":
        assert {i.answer for i in test} == {YES, NO}
    if suite in MC_SUITES:
        assert all(set(i.choices) == set(LETTERS) and i.answer in LETTERS for i in test)
        assert len({i.answer for i in test}) == 4  # not one letter for every question
        dev = load_suite(suite, SAMPLE_BENCHMARKS, "dev")
        assert {i.subject for i in dev} == {i.subject for i in test}  # a few-shot example for each subject
    if suite == "arabic-mmlu":
        assert all(SUBJECT_CATEGORY.get(i.subject) == i.category is not None for i in test)
    if suite in OPEN_SUITES:
        assert all(i.answer is None and i.subject for i in test)


def test_a_listing_store_reads_only_the_mmlu_subjects_that_are_there() -> None:
    store = ListingStore(SAMPLE_BENCHMARKS, "s3://demo/benchmarks/acegpt")
    for split in ("test", "dev"):
        via_store = load_suite("arabic-mmlu", "s3://demo/benchmarks/acegpt", split, store=store)
        assert via_store == load_suite("arabic-mmlu", SAMPLE_BENCHMARKS, split)
    assert len({i.subject for i in via_store}) == 8


def test_the_demo_uses_the_real_files_where_configured_else_the_samples(tmp_path: Path, monkeypatch) -> None:
    clone = tmp_path / "clone"
    clone.mkdir()
    assert acegpt_files(clone, env={}) is None
    with pytest.raises(FileNotFoundError, match="DHAD_BENCHMARKS"):
        acegpt_files(clone, env={"DHAD_BENCHMARKS": str(tmp_path / "nowhere")})
    assert acegpt_files(clone, env={"DHAD_BENCHMARKS": str(tmp_path)}) == tmp_path
    (tmp_path / "shared" / "benchmarks" / "acegpt").mkdir(parents=True)
    assert acegpt_files(clone, env={}) == tmp_path / "shared" / "benchmarks" / "acegpt"

    monkeypatch.setattr(demo, "REPO", tmp_path / "elsewhere" / "clone")
    monkeypatch.delenv("DHAD_BENCHMARKS", raising=False)
    folder, said = demo.benchmark_source()
    assert folder == SAMPLE_BENCHMARKS and "not the AceGPT benchmarks" in said
    monkeypatch.setenv("DHAD_BENCHMARKS", str(tmp_path / "nowhere"))
    with pytest.raises(SystemExit, match="nowhere"):
        demo.benchmark_source()
    monkeypatch.setenv("DHAD_BENCHMARKS", str(tmp_path))
    assert demo.benchmark_source() == (tmp_path, f"the AceGPT benchmark files in {tmp_path}")


def test_the_report_says_where_the_items_came_from(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    summary.write_text("| suite | method |\n", encoding="utf-8")
    demo.note_benchmarks(summary, "Dhad's own small samples")
    assert summary.read_text(encoding="utf-8") == "> Benchmarks: Dhad's own small samples.\n\n| suite | method |\n"


@pytest.mark.benchmarks
@pytest.mark.parametrize("suite", SUITES)
def test_no_sample_is_copied_from_the_benchmark(suite: str) -> None:
    """Written by the team, never taken from the benchmarks: no sample equals a real item after Arabic
    folding or is a near duplicate of one (5-gram Jaccard 0.8, the duplicate rule of the evaluator)."""
    splits = ("test", "dev") if suite not in OPEN_SUITES else ("test",)
    real = list(dict.fromkeys(fold(i.question) for split in splits for i in load_suite(suite, ACEGPT, split)))
    mine = [fold(i.question) for split in splits for i in load_suite(suite, SAMPLE_BENCHMARKS, split)]
    assert not set(mine) & set(real)
    copied = [(real[i], mine[j - len(real)]) for i, j in near_pairs(real + mine) if i < len(real) <= j]
    assert copied == []
