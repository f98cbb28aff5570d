"""Reference answers for the open-ended suites: the answers the evaluated model is judged against.

Format (what `referenceAnswers` / `--references` points at): a folder (or s3:// prefix) holding one
`<suite>.jsonl` per open-ended suite (`vicuna-80.jsonl`, `alpaca-eval.jsonl`), one JSON object a line:
`{"id": "<benchmark item id>", "answer": "<reference system's answer>"}` (AlpacaEval's `"output"` is
accepted for `"answer"`; extra keys such as `"model"` are ignored). Items without a reference answer are
counted as invalid pairs and reported as `missing_references`.

AceGPT judged against ChatGPT's answers; with no hosted model at hand (tests, the tiny demo),
`write_references` makes any local model the reference system.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dhad_trainer.evaluation.loaders import OPEN_SUITES, ObjectStore, load_suite
from dhad_trainer.evaluation.prompts import build_prompt
from dhad_trainer.evaluation.scoring import ModelRunner


def reference_file(suite: str) -> str:
    return f"{suite}.jsonl"


def fetch_references(
    location: str,
    suites: Sequence[str],
    *,
    store: ObjectStore | None = None,
    cache: Path | None = None,
) -> dict[str, Path]:
    """Local paths of the suites' reference files; s3:// objects are copied under `cache` first."""
    out = {}
    for suite in suites:
        name = reference_file(suite)
        if location.startswith("s3://"):
            if store is None or cache is None:
                raise ValueError(
                    f"{location}: s3:// reference answers need the data store (locally: a folder)"
                )
            cache.mkdir(parents=True, exist_ok=True)
            with store.open(f"{location.rstrip('/')}/{name}") as fh:
                (cache / name).write_bytes(fh.read())
            out[suite] = cache / name
        elif "://" in location:
            raise ValueError(f"{location}: reference answers are read from a folder or an s3:// prefix")
        else:
            out[suite] = Path(location) / name
            if not out[suite].is_file():
                raise FileNotFoundError(f"no reference answers for {suite}: {out[suite]} is missing")
    return out


def write_references(
    runner: ModelRunner,
    source: str,
    out_dir: str | Path,
    *,
    suites: Sequence[str] = OPEN_SUITES,
    limit: int | None = None,
    seed: int = 0,
    max_new_tokens: int = 512,
    model: str = "reference",
    store: ObjectStore | None = None,
) -> dict[str, Path]:
    """Answer each open-ended suite with `runner`, in the format above; with `limit`, the same seeded
    sample an evaluation with that `limit` and `seed` draws (limitPer total), so every item it judges
    has a reference answer."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for suite in suites:
        if suite not in OPEN_SUITES:
            raise ValueError(f"{suite} is not open-ended; reference answers are for {OPEN_SUITES}")
        items = load_suite(suite, source, limit=limit, limit_per="total", seed=seed, store=store)
        answers = runner.generate([build_prompt(it) for it in items], max_new_tokens)
        path = out / reference_file(suite)
        with path.open("w", encoding="utf-8") as fh:
            for it, answer in zip(items, answers, strict=True):
                fh.write(
                    json.dumps({"id": it.id, "answer": answer, "model": model}, ensure_ascii=False) + "\n"
                )
        written[suite] = path
    return written
