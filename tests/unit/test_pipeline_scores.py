"""Pipeline gates name scores by dhad_api.scores.produced_scores (the apiserver checks gates against it);
the eval stage must write exactly those keys, for multiple-choice and judged suites, so a gate never
waits for a score that cannot come."""

from __future__ import annotations

import json

import pytest

from dhad_api.jobs import EvalJobSpec
from dhad_api.scores import produced_scores
from dhad_trainer.stages import eval as eval_stage
from dhad_trainer.stages.base import StageRun
from tests.conftest import ACEGPT as BENCH


@pytest.mark.benchmarks  # reads the real AceGPT files: skipped where they are absent, a failure under CI
def test_the_eval_stage_writes_exactly_the_keys_a_gate_may_name(tmp_path):
    from dhad_trainer.cli import main
    from dhad_trainer.local.tiny import init_tiny_model

    model = init_tiny_model(tmp_path / "tiny", max_position=128)
    refs = tmp_path / "refs"
    assert main(["eval-references", "--model", str(model), "--benchmarks", str(BENCH), "--output", str(refs),
                 "--suites", "vicuna-80", "--limit", "2", "--max-new-tokens", "8"]) == 0
    spec = EvalJobSpec.model_validate({
        "model": {"uri": str(model)}, "storage": {"bucket": "dhad-test"},
        "evaluation": {"suites": ["acva", "exams", "vicuna-80"], "method": "loglikelihood", "limit": 2, "batchSize": 4,
                       "benchmarks": str(BENCH), "referenceAnswers": str(refs),
                       "judge": {"model": {"uri": str(model)}, "maxNewTokens": 1}},
    })
    result = eval_stage.run(StageRun(spec, "eval", model, tmp_path / "work", tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report" / "results.json").read_text(encoding="utf-8"))
    # a judged figure the report flags (the tiny judge's verdicts are forced) is kept out of the scores, under the same key
    assert set(result.metrics["scores"]) | set(report["flagged"]) == set(produced_scores(spec.evaluation))
    assert {"acva/loglikelihood", "exams/loglikelihood"} <= set(result.metrics["scores"])
