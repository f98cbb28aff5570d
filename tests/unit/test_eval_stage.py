"""The EvalJob stage through `StageRun`, and `dhad eval` / `dhad duplicates` / `dhad eval-references`,
on a tiny random model and Dhad's benchmark samples (the real files' layout; `dhad duplicates` reads the
real files, marker benchmarks).

The tiny model has a 128-token window, so open-ended answers are 64 tokens and the tests stay short.
Reference answers come from the same model with 16 tokens, so the judge sees different answers; the
judge (RLAIF's ModelJudge, the same tiny model) writes 1 token and falls back to its forced A/B choice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dhad_api.jobs import EvalJobSpec
from dhad_api.stages import Judge
from dhad_trainer.cli import main
from dhad_trainer.evaluation.loaders import SAMPLE_BENCHMARKS as BENCH
from dhad_trainer.stages import eval as eval_stage
from dhad_trainer.stages.base import StageRun
from tests.conftest import ACEGPT
from tests.support.scores import recount

REPO = Path(__file__).resolve().parents[2]
MC = ("acva", "arabic-mmlu", "exams")
OPEN = ("vicuna-80", "alpaca-eval")
LIMIT = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model and its own 16-token answers as the reference system (via `dhad eval-references`)."""
    from dhad_trainer.local.tiny import init_tiny_model

    root = tmp_path_factory.mktemp("eval-stage")
    model = init_tiny_model(root / "tiny", max_position=128)
    refs = root / "refs"
    args = ["--model", str(model), "--benchmarks", str(BENCH), "--output", str(refs)]
    assert main(["eval-references", *args, "--limit", str(LIMIT), "--max-new-tokens", "16"]) == 0
    return model, refs


def _run(model: Path, refs: Path, tmp: Path, method: str, shots: int, rank: int = 0) -> tuple:
    spec = EvalJobSpec.model_validate(
        {
            "model": {"uri": str(model)},
            "storage": {"bucket": "dhad-test"},
            "evaluation": {
                "suites": [*MC, *OPEN],
                "method": method,
                "shots": shots,
                "limit": LIMIT,
                "batchSize": 8,
                "benchmarks": str(BENCH),
                "referenceAnswers": str(refs),
                "judge": {"model": {"uri": str(model)}, "maxNewTokens": 1},
                "excludeDuplicates": True,
            },
        }
    )
    run = StageRun(spec, "eval", model, tmp / "work", tmp / "out", rank=rank, world_size=2 if rank else 1)
    return eval_stage.run(run), run.output_dir / "report"


@pytest.mark.parametrize(("method", "shots"), [("loglikelihood", 0), ("generate", 1)])
def test_stage_all_suites(tiny, tmp_path: Path, method: str, shots: int) -> None:
    model, refs = tiny
    result, report = _run(model, refs, tmp_path, method, shots)
    scores = result.metrics["scores"]
    assert (
        result.metrics["report"] == "report/summary.md"
        and (report.parent / result.metrics["report"]).is_file()
    )
    assert set(scores) == {f"{s}/{method}" for s in MC} | {f"{s}/generate+judge" for s in OPEN}
    for name, value in scores.items():  # each headline recounted from the report's per-item predictions
        suite, suite_method = name.split("/")
        assert value == pytest.approx(recount(report, suite, suite_method), abs=5e-5), name  # rounded to 4 places
    for name in ("results.json", "scores.png", f"acva_topics_{method}.png", f"mmlu_categories_{method}.png"):
        assert (report / name).is_file(), name
    doc = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert doc["headline"] == scores
    by = {s["suite"]: s for s in doc["suites"]}
    assert set(by) == {*MC, *OPEN} and all(s["metrics"]["n"] == LIMIT for s in doc["suites"])
    assert (
        by["arabic-mmlu"]["k_shot"] == shots and by["exams"]["k_shot"] == shots and by["acva"]["k_shot"] == 0
    )
    assert all(by[s]["method"] == method for s in MC)
    if method == "loglikelihood":
        assert all(by[s]["metrics"]["unparsed"] == 0 for s in MC)
    for suite in OPEN:
        m = by[suite]["metrics"]
        assert m["wins"] + m["ties"] + m["losses"] == LIMIT and m["invalid"] == 0
        assert m["missing_references"] == 0
        lines = (
            (report / f"predictions_{suite}_generate_judge.jsonl").read_text(encoding="utf-8").splitlines()
        )
        assert len(lines) == LIMIT
    assert set(doc["duplicates"]) == {*MC, *OPEN}
    assert all(d["n_items"] == LIMIT for d in doc["duplicates"].values())
    assert f"| acva | {method} |" in (report / "summary.md").read_text(encoding="utf-8")


def test_other_ranks_do_not_evaluate(tmp_path: Path) -> None:
    result, report = _run(tmp_path / "no-model", tmp_path, tmp_path, "loglikelihood", 0, rank=1)
    assert "skipped" in result.metrics and not report.exists()


def test_judges_are_the_rlaif_judges(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dhad_trainer.llm.judges import EndpointJudge

    endpoint = {"baseUrl": "http://judge:8000/v1", "model": "j", "apiKeySecretRef": {"name": "s", "key": "k"}}
    monkeypatch.setenv("DHAD_JUDGE_API_KEY", "sk-test")
    judge = eval_stage.make_judge(Judge.model_validate({"endpoint": endpoint, "maxNewTokens": 64}))
    assert isinstance(judge, EndpointJudge) and judge.client.config.api_key_env == "DHAD_JUDGE_API_KEY"
    assert judge.max_new_tokens == 64 and hasattr(judge, "compare")
    with pytest.raises(ValueError, match="run.inputs\\['judge'\\]"):
        eval_stage.make_judge(Judge.model_validate({"model": {"fromJob": {"kind": "SFTJob", "name": "x"}}}))


def test_cli_eval(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, refs = tiny
    common = ["--model", str(model), "--benchmarks", str(BENCH), "--output", str(tmp_path / "a")]
    assert (
        main(["eval", *common, "--suites", "acva,exams", "--method", "loglikelihood", "--limit", "24"]) == 0
    )
    out = capsys.readouterr().out
    assert "acva/loglikelihood" in out and "exams/loglikelihood" in out
    assert f"report: {tmp_path / 'a' / 'report' / 'summary.md'}" in out
    doc = json.loads((tmp_path / "a" / "report" / "results.json").read_text(encoding="utf-8"))
    assert [s["metrics"]["n"] for s in doc["suites"]] == [24, 24]

    # the tiny manifest: method and limit from the file, suites and locations from the flags
    manifest = REPO / "examples" / "tiny" / "eval.yaml"
    common[-1] = str(tmp_path / "b")
    assert main(["eval", "-f", str(manifest), *common, "--suites", "exams", "--exclude-duplicates"]) == 0
    doc = json.loads((tmp_path / "b" / "report" / "results.json").read_text(encoding="utf-8"))
    assert list(doc["headline"]) == ["exams/loglikelihood"] and doc["suites"][0]["metrics"]["n"] == 24
    with pytest.raises(SystemExit, match="judge model"):  # fromJob judge: a folder must be given locally
        main(["eval", "-f", str(manifest), *common, "--suites", "vicuna-80", "--references", str(refs)])


@pytest.mark.benchmarks
def test_cli_duplicates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["duplicates", "--suite", "arabic-mmlu", "--benchmarks", str(ACEGPT), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "arabic-mmlu (test): 14042 items" in out
    assert "exact duplicates: 1363 items in 114 groups (largest 309" in out
    assert "with near duplicates: 1399 items in 109 groups" in out
    assert "rule: exact: equal question after Arabic folding" in out
