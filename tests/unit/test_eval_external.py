"""`dhad eval score`: outputs written here by the team (not a model's), scored with Dhad's parsing and
metrics against the real benchmark files, with the other harness's labels compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhad_trainer.cli import main
from dhad_trainer.evaluation.external import score_outputs
from tests.conftest import ACEGPT as BENCH

pytestmark = pytest.mark.benchmarks
ARABIC = {"A": "أ", "B": "ب", "C": "ج", "D": "د"}


def _gold(rel: str, n: int) -> list[dict]:
    """The first n records of a benchmark file, read directly (not through the loader under test)."""
    lines = (BENCH / rel).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def _other(gold: str) -> str:
    return next(x for x in "ABCD" if x != gold)


def _exams_outputs(path: Path) -> list[dict]:
    g = _gold("EXAMS_Arabic/exam_test.jsonl", 6)
    rows = [
        {"id": g[0]["id"], "response": g[0]["answer"], "prediction": g[0]["answer"]},  # right
        {"id": g[1]["id"], "response": f"الإجابة: {_other(g[1]['answer'])}", "prediction": _other(g[1]["answer"])},
        {"id": g[2]["id"], "response": "A, B, C, D", "prediction": "A"},  # a hedge: theirs takes the first letter
        {"id": g[3]["id"], "response": ARABIC[g[3]["answer"]] + ") لأن ...", "prediction": g[3]["answer"]},
        # one option named wrong, the other marked as the answer: theirs reads the first letter
        {"id": g[4]["id"], "response": f"الخيار {ARABIC[_other(g[4]['answer'])]} خاطئ والإجابة هي {ARABIC[g[4]['answer']]}",
         "prediction": _other(g[4]["answer"])},
        {"id": "No Such Subject-99", "response": "A"},  # unknown id
        {"id": g[0]["id"], "response": "D"},  # repeated id: the first record counts
        {"id": g[5]["id"]},  # no response
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + "not json\n", encoding="utf-8")
    return g


def test_exams_outputs_scored_with_dhad_rules(tmp_path: Path) -> None:
    g = _exams_outputs(tmp_path / "outputs.jsonl")
    r = score_outputs("exams", tmp_path / "outputs.jsonl", BENCH)
    m, o = r.metrics, r.metrics["outputs"]
    assert [x.id for x in r.items] == [x["id"] for x in g[:5]]  # file order of the benchmark
    assert [x.pred for x in r.items] == [g[0]["answer"], _other(g[1]["answer"]), None, g[3]["answer"], g[4]["answer"]]
    assert m["n"] == 5 and m["correct"] == 3 and m["accuracy"] == 3 / 5
    assert m["hedged"] == 1 and m["unparsed"] == 1
    assert (o["scored"], o["missing"]) == (5, 537 - 5)
    assert o["skipped"] == {"no id or response": 1, "not json": 1, "repeated id": 1, "unknown id": 1}
    assert (o["with_their_prediction"], o["agree"], o["disagree"]) == (5, 3, 2)
    assert o["their_accuracy"] == 2 / 5  # their first-letter rule: right on 0 and 3 only
    assert {d["id"] for d in o["disagreements"]} == {g[2]["id"], g[4]["id"]}
    hedge = next(d for d in o["disagreements"] if d["id"] == g[2]["id"])
    assert hedge["dhad"] is None and hedge["dhad_reason"] == "hedged" and hedge["theirs"] == "A"


def test_cli_eval_score_acva(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = _gold("ArabicCulture/difficulty-easy-TF_test.jsonl", 4)
    flip = {"نعم": "لا", "لا": "نعم"}
    rows = [
        {"id": g[0]["id"], "response": g[0]["answer"]},
        {"id": g[1]["id"], "response": f"الإجابة: {flip[g[1]['answer']]}"},
        {"id": g[2]["id"], "response": "نعم أو لا"},  # hedged
        {"id": g[3]["id"], "response": "الإسلام"},  # contains لا, but not as a word
    ]
    outputs = tmp_path / "acva.jsonl"
    outputs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "scored"
    assert main(["eval", "score", "--suite", "acva", "--outputs", str(outputs), "--benchmarks", str(BENCH),
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "acva: macro_f1" in printed and "on 4 items (8707 without a record" in printed
    assert "unparseable: 2 (hedged 1, no_answer 1)" in printed
    doc = json.loads((out / "report" / "results.json").read_text(encoding="utf-8"))
    s = doc["suites"][0]
    assert s["metrics"]["n"] == 4 and s["metrics"]["accuracy"] == 1 / 4 and s["metrics"]["hedged"] == 1
    assert (out / "report" / "summary.md").is_file() and (out / "report" / "disagreements.jsonl").is_file()
    with pytest.raises(ValueError, match="open-ended"):
        score_outputs("vicuna-80", outputs, BENCH)
