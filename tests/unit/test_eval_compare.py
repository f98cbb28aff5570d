"""An EvalJob that compares several models: the spec, what the operator resolves, what the runtime hands
the stage, and the rules the apiserver and the trainer share."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dhad_api.jobs import EvalJobSpec, Job
from dhad_api.references import references, resolve_models
from dhad_trainer.runtime.worker import stage_inputs


def _spec(**evaluation) -> EvalJobSpec:
    return EvalJobSpec.model_validate({
        "model": {"fromJob": {"kind": "RLAIFJob", "name": "rl"}},
        "storage": {"bucket": "bkt"},
        "evaluation": {"suites": ["acva"], **evaluation},
    })


COMPARE = [
    {"name": "base", "model": {"uri": "s3://bkt/models/base"}},
    {"name": "sft", "model": {"fromJob": {"kind": "SFTJob", "name": "sft"}}},
]


def test_compared_models_are_resolved_like_the_model() -> None:
    spec = _spec(compare=COMPARE)
    assert references(spec) == {("RLAIFJob", "rl"), ("SFTJob", "sft")}  # the job waits for both
    done = {"status": {"state": "Succeeded", "outputModel": "s3://bkt/out/rl"}}
    resolved, waiting = resolve_models(spec, {("RLAIFJob", "rl"): done, ("SFTJob", "sft"): None})
    assert resolved == {} and "SFTJob sft (compare:sft)" in waiting[1]
    sft = {"status": {"state": "Succeeded", "outputModel": "s3://bkt/out/sft"}}
    resolved, waiting = resolve_models(spec, {("RLAIFJob", "rl"): done, ("SFTJob", "sft"): sft})
    assert waiting is None
    assert resolved == {"modelUri": "s3://bkt/out/rl",
                        "compareModelUris": {"base": "s3://bkt/models/base", "sft": "s3://bkt/out/sft"}}
    job = Job.model_validate({"kind": "EvalJob", "spec": spec.to_json_dict(), "resolved": resolved})
    inputs = stage_inputs(job, spec, "eval", "s3://bkt/root")
    assert inputs == {"compare-base": "s3://bkt/models/base", "compare-sft": "s3://bkt/out/sft"}
    assert resolve_models(_spec(), {("RLAIFJob", "rl"): done})[0] == {"modelUri": "s3://bkt/out/rl"}  # unchanged


def test_evaluation_defaults_and_rules() -> None:
    ev = _spec().evaluation
    assert (ev.runs, ev.seed, str(ev.limit_per), ev.use_vllm, ev.compare) == (3, 0, "total", False, [])
    assert [str(m) for m in ev.open_ended_metrics] == ["judge-scores", "judge-pairwise"]
    with pytest.raises(ValidationError, match="compare names must be unique"):
        _spec(compare=[COMPARE[0], {**COMPARE[1], "name": "base"}])
    with pytest.raises(ValidationError, match="openEndedMetrics must not repeat"):
        _spec(openEndedMetrics=["judge-scores", "judge-scores"])
    for bad in ({"runs": 0}, {"runs": 11}, {"limitPer": "topic"}, {"seed": -1},
                {"compare": [{"name": "Base", "model": {"uri": "s3://bkt/m"}}]},
                {"openEndedMetrics": ["win-rate"]}):
        with pytest.raises(ValidationError):
            _spec(**bad)
