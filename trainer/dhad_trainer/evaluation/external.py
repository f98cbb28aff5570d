"""Scoring model outputs produced elsewhere (`dhad eval score`): another harness's generations, parsed and
scored with Dhad's rules, so a user can see where the two disagree.

Input: jsonl, one record per item: `{"id": "<benchmark item id>", "response": "<the model's text>"}`,
optionally `"prediction"`: the label the other harness parsed from it ("A".."D", "نعم"/"لا", or null).
Records with an unknown id, a repeated id (the first is kept) or no text are counted and skipped;
benchmark items without a record are counted as missing and left out of the figures (n says how many
were scored). Only suites with a gold label (MMLU, EXAMS, ACVA) can be scored this way.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

from dhad_trainer.evaluation.loaders import OPEN_SUITES, ObjectStore, load_suite
from dhad_trainer.evaluation.parsing import OK, parse_detail
from dhad_trainer.evaluation.scoring import GENERATE, ItemResult, SuiteResult, summarise_labels

EXTERNAL = GENERATE  # the figures are generation-based: same parsing, same metric


def read_outputs(path: str | Path) -> tuple[dict[str, dict], Counter[str]]:
    """{id: record} in file order, and the counts of skipped records by why."""
    records: dict[str, dict] = {}
    skipped: Counter[str] = Counter()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped["not json"] += 1
            continue
        if not isinstance(record, dict) or "id" not in record or not isinstance(record.get("response"), str):
            skipped["no id or response"] += 1
            continue
        key = str(record["id"])
        if key in records:
            skipped["repeated id"] += 1
            continue
        records[key] = record
    return records, skipped


def score_outputs(suite: str, outputs: str | Path, source: str | Path, *,
                  store: ObjectStore | None = None) -> SuiteResult:
    """Parse and score `outputs` for `suite` (see module docstring); the counts are in metrics["outputs"]."""
    if suite in OPEN_SUITES:
        raise ValueError(f"{suite} is open-ended: its answers need a judge, not a parser")
    start = time.perf_counter()
    items = load_suite(suite, source, "test", store=store)
    records, skipped = read_outputs(outputs)
    known = {it.id for it in items}
    skipped["unknown id"] += sum(k not in known for k in records)
    scored = [it for it in items if it.id in records]
    if not scored:
        raise ValueError(f"{outputs}: no record matches an item id of {suite}")
    results, disagree = [], []
    for it in scored:
        record = records[it.id]
        label, reason = parse_detail(suite, record["response"], it.choices)
        results.append(ItemResult(it.id, it.subject, it.answer, label, output=record["response"],
                                  reason=None if reason == OK else reason))
        if "prediction" in record and record["prediction"] != label:
            disagree.append({"id": it.id, "response": record["response"], "dhad": label, "dhad_reason": reason,
                             "theirs": record["prediction"], "gold": it.answer})
    result = summarise_labels(scored, results, EXTERNAL, 0, time.perf_counter() - start)
    compared = sum("prediction" in records[it.id] for it in scored)
    theirs = [it for it in scored if "prediction" in records[it.id]]
    their_correct = sum(records[it.id]["prediction"] == it.answer for it in theirs)
    result.metrics["outputs"] = {
        "file": str(outputs),
        "records": len(records) + sum(skipped.values()) - skipped["unknown id"],
        "scored": len(scored),
        "missing": len(items) - len(scored),
        "skipped": dict(sorted((k, v) for k, v in skipped.items() if v)),
        "with_their_prediction": compared,
        "agree": compared - len(disagree),
        "disagree": len(disagree),
        "their_accuracy": their_correct / len(theirs) if theirs else None,
        "disagreements": disagree,
    }
    result.notes.append(f"scored from {outputs}: {len(scored)} of {len(items)} items had a record")
    return result
