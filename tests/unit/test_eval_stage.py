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
    # the tiny judge writes 1 token: every pairwise verdict is forced and no 1-10 score parses, so the
    # open-ended figures are flagged and left out of the headline scores (the demo used to headline 1.0)
    assert set(scores) == {f"{s}/{method}" for s in MC}
    for name, value in scores.items():  # each headline recounted from the report's per-item predictions
        suite, suite_method = name.split("/")
        assert value == pytest.approx(recount(report, suite, suite_method), abs=5e-5), name  # rounded to 4 places
    for name in ("results.json", "scores.png", f"acva_topics_{method}.png", f"mmlu_categories_{method}.png"):
        assert (report / name).is_file(), name
    doc = json.loads((report / "results.json").read_text(encoding="utf-8"))
    assert doc["headline"] == scores
    assert set(doc["flagged"]) == {f"{s}/{m}" for s in OPEN for m in ("judge-scores", "judge-pairwise")}
    by = {(s["suite"], s["method"]): s for s in doc["suites"]}
    assert set(by) == {(s, method) for s in MC} | {(s, m) for s in OPEN for m in ("judge-scores", "judge-pairwise")}
    assert all(s["metrics"]["n"] == LIMIT for s in doc["suites"])
    assert by[("arabic-mmlu", method)]["k_shot"] == shots and by[("exams", method)]["k_shot"] == shots
    assert by[("acva", method)]["k_shot"] == 0
    if method == "loglikelihood":
        assert all(by[(s, method)]["metrics"]["unparsed"] == 0 for s in MC)
    for s in MC:
        m = by[(s, method)]["metrics"]
        assert m["ci95"][0] <= m["headline"] <= m["ci95"][1] and m["chance"] > 0
    for suite in OPEN:
        m = by[(suite, "judge-pairwise")]["metrics"]
        assert m["wins"] + m["ties"] + m["losses"] == LIMIT and m["invalid"] == 0
        assert m["missing_references"] == 0 and m["forced"] == m["verdicts"] == 2 * LIMIT
        assert by[(suite, "judge-pairwise")]["flag"] == f"mostly forced verdicts ({2 * LIMIT} of {2 * LIMIT})"
        r = by[(suite, "judge-scores")]["metrics"]
        assert (r["judgements"], r["unparseable"], r["runs"]) == (2 * LIMIT * 3, 2 * LIMIT * 3, 3)
        assert r["score_ratio"] is None and by[(suite, "judge-scores")]["flag"] == "no valid verdict"
        for m_name in ("judge-scores", "judge-pairwise"):
            lines = (report / f"predictions_{suite}_{m_name}.jsonl").read_text(encoding="utf-8").splitlines()
            assert len(lines) == LIMIT
    assert set(doc["duplicates"]) == {*MC, *OPEN}
    assert all(d["n_items"] == LIMIT for d in doc["duplicates"].values())
    for sample in doc["samples"].values():  # the report names the seed and the items used
        assert sample["seed"] == 0 and sample["drawn"] == LIMIT and len(sample["ids"]) == LIMIT
    assert len({i.rsplit("-", 1)[0] for i in doc["samples"]["arabic-mmlu"]["ids"]}) == LIMIT  # 8 subjects
    assert set(doc["backends"].values()) == {"transformers (batched)"}  # useVllm not asked
    md = (report / "summary.md").read_text(encoding="utf-8")
    assert f"| acva | {method} |" in md and "mostly forced verdicts" in md and "1 إلى 10" in md
    assert doc["samples"]["exams"]["ids"][0] in md


def test_vllm_only_where_it_can_run() -> None:
    from dhad_trainer.evaluation.runner import vllm_available

    assert eval_stage.generation_backend(False, "cuda:0") == ("transformers", "transformers (batched)")
    assert eval_stage.generation_backend(True, "cpu") == ("transformers", "transformers (batched; useVllm asked for vLLM: no GPU)")
    backend, note = eval_stage.generation_backend(True, "cuda:0")
    assert backend == ("vllm" if vllm_available() else "transformers")
    assert note == "vllm" or "vLLM is not installed or no GPU is visible" in note


def test_other_ranks_do_not_evaluate(tmp_path: Path) -> None:
    result, report = _run(tmp_path / "no-model", tmp_path, tmp_path, "loglikelihood", 0, rank=1)
    assert "skipped" in result.metrics and not report.exists()


def test_local_judge_runs_in_the_jobs_dtype_and_shares_its_weights(tiny) -> None:
    import torch

    model, _ = tiny
    spec = Judge.model_validate({"model": {"uri": str(model)}, "maxNewTokens": 4})
    pairwise, scores = eval_stage.make_judges(spec, ["judge-scores", "judge-pairwise"], device="cpu",
                                              dtype="bfloat16")
    assert next(pairwise.model.parameters()).dtype == torch.bfloat16  # was float32 whatever the job said
    assert scores.runner.model is pairwise.model  # one copy of the judge for both metrics
    own = Judge.model_validate({"model": {"uri": str(model), "dtype": "float32"}})
    _, alone = eval_stage.make_judges(own, ["judge-scores"], device="cpu", dtype="bfloat16")
    assert alone.runner.dtype == torch.float32  # judge.model.dtype wins over the job's


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

    # the tiny manifest: method, limit and the compared base model from the file, suites and locations
    # from the flags; its base model is an s3:// URI, so locally it must be given as a folder
    manifest = REPO / "examples" / "tiny" / "eval.yaml"
    common[-1] = str(tmp_path / "b")
    with pytest.raises(SystemExit, match="evaluation.compare base: its model is not a local folder"):
        main(["eval", "-f", str(manifest), *common, "--suites", "exams"])
    common += ["--model", f"base={model}"]
    assert main(["eval", "-f", str(manifest), *common, "--suites", "exams", "--exclude-duplicates"]) == 0
    doc = json.loads((tmp_path / "b" / "report" / "results.json").read_text(encoding="utf-8"))
    assert list(doc["headline"]) == ["exams/loglikelihood", "base:exams/loglikelihood"]
    assert doc["models"] == [model.name, "base"] and doc["suites"][0]["metrics"]["n"] == 24
    assert doc["headline"]["exams/loglikelihood"] == doc["headline"]["base:exams/loglikelihood"]  # same weights
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
