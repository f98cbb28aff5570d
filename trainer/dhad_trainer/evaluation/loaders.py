"""Loaders for the AceGPT benchmark files: from a local folder, an object store, or the community
copies on the Hugging Face hub.

All three produce the same `EvalItem`s so scoring never knows where data came from. Order is the
files' own order (MMLU subjects sorted by name). `limit` draws a seeded sample (see `apply_limit`),
always returned in file order, so a limited run covers every subject and is the same for a seed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, Protocol

from dhad_trainer.evaluation.mmlu_subjects import SUBJECT_CATEGORY, SUBJECTS

ACVA, MMLU, EXAMS, VICUNA, ALPACA = "acva", "arabic-mmlu", "exams", "vicuna-80", "alpaca-eval"
SUITES = (ACVA, MMLU, EXAMS, VICUNA, ALPACA)
MC_SUITES = (MMLU, EXAMS)
OPEN_SUITES = (VICUNA, ALPACA)
LETTERS = ("A", "B", "C", "D")
# Dhad's own few dozen items per suite, written by the team in the AceGPT files' layout and formats
# (not taken from the benchmarks): what the demo and the tests use where the real files are absent.
SAMPLE_BENCHMARKS = Path(__file__).resolve().parents[1] / "assets" / "benchmark-samples"
BENCHMARKS_ENV = "DHAD_BENCHMARKS"


def acegpt_files(repo: Path, env: Mapping[str, str] | None = None) -> Path | None:
    """The real AceGPT files on this machine: $DHAD_BENCHMARKS, else shared/benchmarks/acegpt beside the
    clone `repo`; None when neither is there. A $DHAD_BENCHMARKS that is not a folder is an error."""
    configured = (os.environ if env is None else env).get(BENCHMARKS_ENV)
    if configured:
        if not Path(configured).is_dir():
            raise FileNotFoundError(f"{BENCHMARKS_ENV}={configured} is not a folder of AceGPT benchmark files")
        return Path(configured)
    shared = Path(repo).resolve().parent / "shared" / "benchmarks" / "acegpt"
    return shared if shared.is_dir() else None
YES, NO = "نعم", "لا"
Split = Literal["test", "dev"]


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question. `answer` is a Latin letter (MC), نعم/لا (ACVA) or None (open-ended).
    `subject` is the MMLU/EXAMS subject, the ACVA topic, or the open-ended set's label."""

    suite: str
    id: str
    question: str
    choices: dict[str, str] | None
    answer: str | None
    subject: str | None
    category: str | None = None

    @property
    def topic(self) -> str | None:
        return self.subject


class ObjectStore(Protocol):
    """What the loaders need from S3: open one object for reading (and `list`, where the store has it,
    to find which MMLU subject files are there)."""

    def open(self, uri: str) -> IO[bytes]: ...


class _Files:
    """Reads benchmark files relative to a root, either a local folder or a store prefix."""

    def __init__(self, root: str | Path, store: ObjectStore | None) -> None:
        self.store = store
        self.root = str(root).rstrip("/") if store is not None else Path(root)

    def read(self, rel: str) -> str:
        if self.store is None:
            return (self.root / rel).read_text(encoding="utf-8")  # type: ignore[operator]
        with self.store.open(f"{self.root}/{rel}") as fh:
            return fh.read().decode("utf-8")

    def mmlu_subjects(self, split: str) -> list[str]:
        """The subjects whose files are there: what the folder or store lists (a sample set carries a
        few), or the 57 known subjects for a store that cannot list."""
        suffix = f"_{split}.csv"
        if self.store is None:  # local: the subject is whatever the file name says
            names = [f.name for f in (self.root / "MMLUArabic" / split).glob(f"*{suffix}")]  # type: ignore[operator]
        elif callable(getattr(self.store, "list", None)):
            names = [uri.rsplit("/", 1)[-1] for uri in self.store.list(f"{self.root}/MMLUArabic/{split}/")]
        else:
            return sorted(SUBJECTS)
        return sorted(name[: -len(suffix)] for name in names if name.endswith(suffix))


def _mmlu(files: _Files, split: str) -> Iterable[EvalItem]:
    subjects = files.mmlu_subjects(split)
    if not subjects:
        raise FileNotFoundError(f"no MMLUArabic/{split}/*_{split}.csv under {files.root}")
    for subject in subjects:
        rel = f"MMLUArabic/{split}/{subject}_{split}.csv"
        for n, row in enumerate(csv.reader(io.StringIO(files.read(rel), newline=""))):
            if len(row) != 6 or row[5].strip() not in LETTERS:
                raise ValueError(f"{rel} row {n}: expected question,A,B,C,D,answer; got {row!r:.200}")
            yield EvalItem(
                MMLU,
                f"{subject}-{n}",
                row[0].strip(),
                dict(zip(LETTERS, (c.strip() for c in row[1:5]), strict=True)),
                row[5].strip(),
                subject,
                SUBJECT_CATEGORY.get(subject),
            )


def _jsonl(text: str, rel: str) -> Iterable[dict]:
    for n, line in enumerate(text.splitlines()):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{rel} line {n + 1}: {e}") from None


def _prefix(item_id: object) -> str:
    """`<Topic>-<n>` -> Topic (topics contain spaces but never end in -digits)."""
    return str(item_id).rsplit("-", 1)[0]


def _exams(files: _Files, split: str) -> Iterable[EvalItem]:
    rel = f"EXAMS_Arabic/exam_{split}.jsonl"
    for r in _jsonl(files.read(rel), rel):
        yield EvalItem(
            EXAMS,
            str(r["id"]),
            r["question"].strip(),
            {k: str(r[k]).strip() for k in LETTERS},
            r["answer"].strip(),
            _prefix(r["id"]),
        )


def _acva(files: _Files, split: str) -> Iterable[EvalItem]:
    rel = f"ArabicCulture/difficulty-easy-TF_{split}.jsonl"
    for r in _jsonl(files.read(rel), rel):
        answer = r["answer"].strip()
        if answer not in (YES, NO):
            raise ValueError(f"{rel} {r['id']}: answer {answer!r} is not نعم/لا")
        yield EvalItem(ACVA, str(r["id"]), r["question"].strip(), None, answer, _prefix(r["id"]))


def _open(files: _Files, suite: str) -> Iterable[EvalItem]:
    rel = "vicuna_ar80.jsonl" if suite == VICUNA else "alpaca_eval_ar.jsonl"
    for r in _jsonl(files.read(rel), rel):
        yield EvalItem(suite, str(r["id"]), r["query"].strip(), None, None, r.get("label"))


LimitPer = Literal["subject", "total"]


def _stratum_rng(seed: int, key: str | None) -> random.Random:
    """One generator per (seed, subject): a subject's draw does not depend on the other subjects."""
    return random.Random(f"{seed}/{key}")


def proportional_quotas(sizes: dict[str | None, int], limit: int, seed: int = 0) -> dict[str | None, int]:
    """`limit` split over strata in proportion to their sizes (largest remainder, Hamilton's method):
    each stratum gets floor(limit * n / N), and the items left over go to the largest fractional
    parts, ties broken by a seeded shuffle. The quotas sum to min(limit, N)."""
    total = sum(sizes.values())
    if limit >= total:
        return dict(sizes)
    exact = {k: limit * n / total for k, n in sizes.items()}
    quotas = {k: math.floor(v) for k, v in exact.items()}
    order = sorted(sizes, key=str)
    random.Random(f"{seed}/quotas").shuffle(order)
    order.sort(key=lambda k: exact[k] - quotas[k], reverse=True)  # stable: the shuffle breaks ties
    for k in order[: limit - sum(quotas.values())]:
        quotas[k] += 1
    return quotas


def apply_limit(
    items: Iterable[EvalItem], limit: int | None, per: LimitPer = "total", seed: int = 0
) -> list[EvalItem]:
    """A seeded sample, stratified by subject (MMLU, EXAMS), topic (ACVA) or label (open-ended sets).

    per="total": `limit` items in all, each subject's share proportional to its size
    (`proportional_quotas`), so a limited MMLU run still averages four real category means.
    per="subject": `limit` items from every subject (all of a smaller one), for equal counts.
    Within a subject the items are drawn uniformly without replacement with a generator seeded by
    (seed, subject). The sample keeps the files' order.
    """
    items = list(items)
    if limit is None:
        return items
    by_subject: dict[str | None, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_subject[it.subject].append(i)
    if per == "total":
        quotas = proportional_quotas({k: len(v) for k, v in by_subject.items()}, limit, seed)
    else:
        quotas = {k: min(limit, len(v)) for k, v in by_subject.items()}
    keep: set[int] = set()
    for key, idx in by_subject.items():
        keep.update(_stratum_rng(seed, key).sample(idx, quotas[key]))
    return [it for i, it in enumerate(items) if i in keep]


def sample_summary(
    population: Sequence[EvalItem], sample: Sequence[EvalItem], limit: int | None, per: LimitPer, seed: int
) -> dict:
    """What the report records about a sample: the rule, the seed, counts per subject and the ids used."""
    pop, got = Counter(i.subject for i in population), Counter(i.subject for i in sample)
    return {
        "rule": "all items" if limit is None else (
            f"{limit} items, stratified by subject/topic, proportional to size (largest remainder), seeded"
            if per == "total" else f"{limit} items per subject/topic, seeded"
        ),
        "limit": limit,
        "limit_per": per,
        "seed": seed,
        "population": len(population),
        "drawn": len(sample),
        "subjects_covered": f"{len(got)}/{len(pop)}",
        "per_subject": {str(k): [got.get(k, 0), n] for k, n in sorted(pop.items(), key=lambda kv: str(kv[0]))},
        "ids": [i.id for i in sample],
    }


def load_suite(
    suite: str,
    source: str | Path,
    split: Split = "test",
    *,
    limit: int | None = None,
    limit_per: LimitPer = "total",
    seed: int = 0,
    store: ObjectStore | None = None,
) -> list[EvalItem]:
    """Load one suite. `source` is a local folder laid out like shared/benchmarks/acegpt, an
    `s3://bucket/prefix` with the same layout (needs `store`), or `hf://[org/name]` for the community
    copies. The open-ended sets have a single file, loaded for either split. `limit` draws a seeded
    stratified sample (`apply_limit`)."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {SUITES}")
    src = str(source)
    if src.startswith("hf://"):
        items: Iterable[EvalItem] = load_hf(suite, split, src[len("hf://") :] or None)
    else:
        if src.startswith("s3://") and store is None:
            raise ValueError(f"{src}: an s3:// source needs an ObjectStore")
        files = _Files(source, store if src.startswith("s3://") else None)
        if suite == MMLU:
            items = _mmlu(files, split)
        elif suite == EXAMS:
            items = _exams(files, split)
        elif suite == ACVA:
            items = _acva(files, split)
        else:
            items = _open(files, suite)
    return apply_limit(items, limit, limit_per, seed)


# --- Hugging Face hub copies (community mirrors used by lighteval / the Open Arabic LLM Leaderboard) ---
# Not exercised by the tests (no hub here). Their layout differs from the AceGPT files: one config per
# subject/topic, "validation" instead of "dev", and ACVA labels written صح/خطأ instead of نعم/لا.
HF_REPOS = {MMLU: "OALL/Arabic_MMLU", EXAMS: "OALL/Arabic_EXAMS", ACVA: "OALL/ACVA"}
_HF_ACVA_LABELS = {"صح": YES, "خطأ": NO, YES: YES, NO: NO}


def load_hf(suite: str, split: str, repo: str | None = None) -> list[EvalItem]:
    """Same items from the hub via `datasets.load_dataset`; `repo` overrides the default mirror."""
    if suite not in HF_REPOS:
        raise ValueError(f"{suite}: no community hub copy is known; load it from a folder or S3")
    from datasets import get_dataset_config_names, load_dataset

    repo = repo or HF_REPOS[suite]
    hf_split = "dev" if (suite == MMLU and split == "dev") else ("validation" if split == "dev" else "test")
    out: list[EvalItem] = []
    for config in sorted(get_dataset_config_names(repo)):
        for n, r in enumerate(load_dataset(repo, config, split=hf_split)):
            if suite == ACVA:
                out.append(
                    EvalItem(
                        ACVA,
                        str(r.get("id", f"{config}-{n}")),
                        r["question"].strip(),
                        None,
                        _HF_ACVA_LABELS[r["answer"].strip()],
                        config.replace("_", " "),
                    )
                )
                continue
            subject = config if suite == MMLU else str(r.get("subject") or _prefix(r.get("id", config)))
            out.append(
                EvalItem(
                    suite,
                    str(r.get("id", f"{subject}-{n}")),
                    r["question"].strip(),
                    {k: str(r[k]).strip() for k in LETTERS},
                    str(r["answer"]).strip(),
                    subject,
                    SUBJECT_CATEGORY.get(subject) if suite == MMLU else None,
                )
            )
    return out
