"""The Pipeline kind's typed API: templates from the job kinds, references between stages, gate scores,
defaults applied as a whole, cache keys, and the walk (the decisions the operator and local mode share)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from dhad_api import pipeline as P
from dhad_api.jobs import parse_spec
from dhad_api.scores import produced_scores
from dhad_api.stages import Evaluation

REPO = Path(__file__).resolve().parents[2]
TINY = yaml.safe_load((REPO / "examples" / "tiny" / "pipeline.yaml").read_text())
GPU = yaml.safe_load((REPO / "examples" / "gpu" / "acegpt-7b-pipeline.yaml").read_text())
IMAGE = "ghcr.io/dhad/trainer:0.1.0"


def spec(doc: dict = TINY, **changes) -> P.PipelineSpec:
    body = copy.deepcopy(doc["spec"])
    body.update(changes)
    return P.parse_pipeline(body)


def stage(body: dict, name: str) -> dict:
    return next(s for s in body["stages"] if s["name"] == name)


@pytest.mark.parametrize("doc", [TINY, GPU], ids=["tiny", "gpu"])
def test_examples_parse_and_every_stage_validates_with_the_defaults(doc):
    parsed = spec(doc)
    assert P.validate(parsed) is None
    assert [s.kind.value for s in parsed.stages] == ["PretrainJob", "SFTJob", "RLAIFJob", "EvalJob"]
    assert len(doc["metadata"]["name"]) <= P.PIPELINE_NAME_MAX


def test_a_stage_field_replaces_the_default_as_a_whole_and_unset_fields_take_it():
    parsed = spec()
    sft = next(s for s in parsed.stages if s.name == "sft")
    rlaif = next(s for s in parsed.stages if s.name == "rlaif")
    merged_sft = P.merged_spec(parsed, sft, {"pretrain": "s3://dhad-demo/x/model"})
    merged_rlaif = P.merged_spec(parsed, rlaif, {"sft": "s3://dhad-demo/y/model"})
    # sft sets resources {nodes 2, cpu 1, 4Gi}: nothing of the default's (1 node, cpu 2, 6Gi) leaks in
    assert merged_sft["resources"] == {"nodes": 2, "gpusPerNode": 0, "cpu": "1", "memory": "4Gi", "sharedMemory": "256Mi", "extra": {}}
    assert merged_rlaif["resources"]["cpu"] == "2" and merged_rlaif["resources"]["memory"] == "6Gi"
    assert merged_rlaif["storage"]["bucket"] == "dhad-demo" and merged_rlaif["checkpoint"]["intervalSteps"] == 10
    # fromJob naming a stage became that stage's output, everywhere a model is referenced
    assert merged_sft["model"]["uri"] == "s3://dhad-demo/x/model" and "fromJob" not in merged_sft["model"]
    assert merged_rlaif["feedback"]["judge"]["model"] == {"uri": "s3://dhad-demo/y/model", "dtype": "auto", "attention": "auto"}
    assert parse_spec("RLAIFJob", merged_rlaif).model.uri == "s3://dhad-demo/y/model"


def test_templates_leave_shared_fields_empty_so_the_apiserver_fills_in_no_default():
    from dhad_api.crd import model_schema

    schema = model_schema(P.SFTStageTemplate)
    for key in P.SHARED_ALIASES:
        assert "default" not in schema["properties"][key], key
    assert "storage" not in schema.get("required", []) and "model" in schema["required"]


def test_the_reference_sites_cover_every_model_a_stage_or_gate_can_name():
    assert {s.where for s in P.SITES} >= {
        "spec.stages[].sft.model.fromJob.name", "spec.stages[].sft.respond.teacher.model.fromJob.name",
        "spec.stages[].rlaif.feedback.judge.model.fromJob.name", "spec.stages[].rlaif.policy.rewardModel.fromJob.name",
        "spec.stages[].eval.evaluation.judge.model.fromJob.name", "spec.stages[].gate.evaluation.judge.model.fromJob.name",
    }


def bad(changes) -> dict:
    body = copy.deepcopy(TINY["spec"])
    changes(body)
    return body


BAD = [
    ("unknown stage", lambda b: stage(b, "sft")["sft"]["model"]["fromJob"].update(name="pretrian"), "names no stage of this pipeline"),
    ("forward reference", lambda b: stage(b, "sft")["sft"]["model"].update(fromJob={"kind": "RLAIFJob", "name": "rlaif"}),
     "must name an earlier stage"),
    ("self reference", lambda b: stage(b, "pretrain")["pretrain"].update(model={"fromJob": {"kind": "PretrainJob", "name": "pretrain"}}),
     "must name an earlier stage"),
    ("kind mismatch", lambda b: stage(b, "rlaif")["rlaif"]["model"]["fromJob"].update(kind="PretrainJob"),
     "fromJob.kind must be the kind of the stage it names"),
    ("judge kind mismatch", lambda b: stage(b, "rlaif")["rlaif"]["feedback"]["judge"]["model"]["fromJob"].update(kind="RLAIFJob"),
     "spec.stages[].rlaif.feedback.judge.model.fromJob.name: fromJob.kind must be"),
    ("gate on a score its suites do not produce", lambda b: stage(b, "sft")["gate"]["require"][0].update(score="arabic-mmlu/loglikelihood"),
     "gate: require[].score must be a score"),
    ("gate on the other method", lambda b: stage(b, "sft")["gate"]["require"][0].update(score="acva/generate"),
     "gate: require[].score must be a score"),
    ("two kinds in one stage", lambda b: stage(b, "eval").update(sft={"model": {"uri": "s3://dhad-demo/m"}, "data": [{"uri": "/d.jsonl"}]}),
     "set exactly one of pretrain, sft, rlaif and eval"),
    ("gate on an eval stage", lambda b: stage(b, "eval").update(gate=copy.deepcopy(stage(b, "sft")["gate"])),
     "a gate needs a stage that outputs a model"),
    ("duplicate names", lambda b: stage(b, "eval").update(name="sft"), "names must be unique"),
    ("no storage anywhere", lambda b: b["defaults"].pop("storage"), "defaults.storage: set storage here or in every stage"),
    ("condition without a threshold", lambda b: stage(b, "sft")["gate"]["require"][0].pop("atLeast"), "needs atLeast, atMost or maxDrop"),
    ("stage suspended on its own", lambda b: stage(b, "sft")["sft"].update(suspend=True), "set the Pipeline's spec.suspend"),
]


@pytest.mark.parametrize("case,change,fragment", BAD, ids=[c[0] for c in BAD])
def test_the_models_reject_what_the_crd_rules_reject(case, change, fragment):
    with pytest.raises(ValidationError) as error:
        P.parse_pipeline(bad(change))
    assert fragment in str(error.value)


def test_a_rule_cel_cannot_see_is_a_failed_walk_naming_the_field():
    """RLAIF's batch rule needs resources, which come from the defaults: checked once they are applied."""
    body = copy.deepcopy(TINY["spec"])
    stage(body, "rlaif")["rlaif"]["policy"]["training"]["microBatchSize"] = 3
    parsed = P.parse_pipeline(body)  # accepted: the rule mentions a shared field
    message = P.validate(parsed)
    assert message and message.startswith("spec.stages[2].rlaif") and "generationsPerPrompt" in message
    result = P.walk("tiny-recipe", parsed, {}, {}, IMAGE)
    assert result.outcome.value == "Failed" and result.reason == "InvalidSpec" and not result.steps


def test_produced_scores_follow_suites_method_and_open_ended_metrics():
    ev = Evaluation(suites=["acva", "vicuna-80"], method="loglikelihood", judge={"model": {"uri": "/j"}}, reference_answers="/r")
    assert produced_scores(ev) == ["acva/loglikelihood", "vicuna-80/judge-scores", "vicuna-80/judge-pairwise"]
    one = ev.model_copy(update={"open_ended_metrics": ["judge-pairwise"]})
    assert produced_scores(one) == ["acva/loglikelihood", "vicuna-80/judge-pairwise"]


# ------------------------------------------------------------------------------------ cache keys
def key_of(parsed: P.PipelineSpec, name: str, outputs=None, trainer=IMAGE) -> str:
    s = next(x for x in parsed.stages if x.name == name)
    return P.cache_key(s.kind, P.merged_spec(parsed, s, outputs or {"pretrain": "s3://dhad-demo/a/model", "sft": "s3://dhad-demo/b/model"}), trainer)


def test_cache_key_ignores_how_a_job_runs_but_not_what_it_makes():
    base = spec()
    key = key_of(base, "sft")
    body = copy.deepcopy(TINY["spec"])
    sft = stage(body, "sft")["sft"]
    sft["restartPolicy"] = {"maxRestarts": 9}
    sft["podTemplate"] = {"labels": {"team": "a"}}
    sft["checkpoint"] = {"intervalSteps": 5}
    sft["queueName"] = "gpu"
    assert key_of(P.parse_pipeline(body), "sft") == key
    sft["training"]["learningRate"] = 0.0004
    assert key_of(P.parse_pipeline(body), "sft") != key
    assert key_of(base, "sft", {"pretrain": "s3://dhad-demo/other/model"}) != key  # another input model
    assert key_of(base, "sft", trainer="ghcr.io/dhad/trainer:0.2.0") != key  # another trainer
    explicit = copy.deepcopy(TINY["spec"])
    stage(explicit, "sft")["sft"]["training"]["packing"] = True  # the default, written out
    assert key_of(P.parse_pipeline(explicit), "sft") == key


# ------------------------------------------------------------------------------------------ walks
def succeed(result: P.Walk, children: dict, scores=None, output=True) -> list[str]:
    made = []
    for step in result.steps:
        if step.name in children:
            continue
        made.append(step.name)
        children[step.name] = P.ChildReport(
            state="Succeeded", output_model=f"s3://dhad-demo/out/{step.name}/model" if step.kind.value != "EvalJob" and output else None,
            scores=(scores or {}).get(step.role, {}), start_time="2026-01-01T00:00:00Z", completion_time="2026-01-01T00:02:00Z")
    return made


GOOD = {"gate": {"acva/loglikelihood": 0.5, "arabic-mmlu/loglikelihood": 0.30}, "base": {"arabic-mmlu/loglikelihood": 0.35}}


def run_through(parsed, children=None, cache=None, scores=GOOD, limit=20):
    children = {} if children is None else children
    cache = {} if cache is None else cache
    created = []
    for _ in range(limit):
        result = P.walk("tiny-recipe", parsed, children, cache, IMAGE, image=IMAGE)
        cache.update({e.key: e for e in result.cache_writes})
        if result.outcome.value != "Running":
            return result, created, children, cache
        created.append(succeed(result, children, scores))
    raise AssertionError("the walk did not finish")


def test_stages_run_in_order_one_at_a_time_and_a_gate_runs_with_its_baseline():
    result, created, _, _ = run_through(spec())
    assert result.outcome.value == "Succeeded"
    roles = [[name.split("-")[2:-1] for name in batch] for batch in created]
    assert roles == [[["pretrain"]], [["sft"]], [["sft", "gate"]], [["rlaif"]], [["rlaif", "gate"], ["rlaif", "base"]], [["eval"]]]
    assert result.output_model.endswith(f"/{result.stages[2]['job']}/model")  # the RLAIF model is promoted
    rlaif_gate = result.stages[2]["gate"]
    assert rlaif_gate["state"] == "Succeeded" and rlaif_gate["baselineScores"] == {"arabic-mmlu/loglikelihood": 0.35}


def test_the_first_step_of_each_child_carries_the_lineage_env_and_the_image():
    result = P.walk("tiny-recipe", spec(), {}, {}, IMAGE, image=IMAGE)
    (step,) = result.steps
    env = {e["name"]: e["value"] for e in step.spec["env"]}
    assert env == {"DHAD_PIPELINE": "tiny-recipe", "DHAD_PIPELINE_STAGE": "pretrain", "DHAD_CACHE_KEY": step.key}
    assert step.spec["image"] == IMAGE and parse_spec("PretrainJob", step.spec)
    assert len(step.name) <= 50


def test_a_gate_below_its_threshold_fails_the_pipeline_naming_gate_score_and_threshold():
    low = {**GOOD, "gate": {"acva/loglikelihood": 0.1}}
    result, created, _, _ = run_through(spec(), scores=low)
    assert result.outcome.value == "Failed" and result.reason == "GateFailed"
    assert "gate of stage sft" in result.message and "acva/loglikelihood = 0.1000 < atLeast 0.2" in result.message
    assert result.output_model is None and len(created) == 3  # pretrain, sft, the gate: rlaif never started
    assert result.stages[1]["gate"]["state"] == "Failed"


def test_a_drop_beyond_max_drop_fails_the_gate_against_the_input_models_score():
    drop = {"gate": {"acva/loglikelihood": 0.5, "arabic-mmlu/loglikelihood": 0.10}, "base": {"arabic-mmlu/loglikelihood": 0.35}}
    result, _, _, _ = run_through(spec(), scores=drop)
    assert result.reason == "GateFailed" and "0.2500 below the input model's 0.3500 (more than maxDrop 0.2)" in result.message


def test_a_reapplied_pipeline_reuses_every_unchanged_stage_and_reruns_from_the_changed_one():
    first, _, children, cache = run_through(spec())
    again, created, _, _ = run_through(spec(), children={}, cache=cache)
    assert created == [] and again.outcome.value == "Succeeded"
    assert all(s["cached"] for s in again.stages) and again.output_model == first.output_model
    assert again.stages[1]["cachedFrom"] == "tiny-recipe/sft" and again.stages[1]["job"] == first.stages[1]["job"]
    body = copy.deepcopy(TINY["spec"])
    stage(body, "rlaif")["rlaif"]["policy"]["training"]["maxSteps"] = 5
    changed, created, _, _ = run_through(P.parse_pipeline(body), children={}, cache=cache)
    ran = [n.split("-")[2] for batch in created for n in batch]
    assert ran == ["rlaif", "rlaif", "eval"]  # rlaif, its gate (the baseline of sft's output is cached), eval
    assert [s.get("cached", False) for s in changed.stages] == [True, True, False, False]
    assert changed.output_model != first.output_model


def test_an_existing_child_is_the_stage_itself_not_a_cache_hit():
    first, _, children, cache = run_through(spec())
    again = P.walk("tiny-recipe", spec(), children, cache, IMAGE, image=IMAGE)
    assert again.outcome.value == "Succeeded" and not any(s.get("cached") for s in again.stages)


def test_a_stage_with_cache_false_runs_again():
    _, _, _, cache = run_through(spec())
    body = copy.deepcopy(TINY["spec"])
    stage(body, "pretrain")["cache"] = False
    result = P.walk("tiny-recipe", P.parse_pipeline(body), {}, cache, IMAGE, image=IMAGE)
    assert [s.stage for s in result.steps] == ["pretrain"]


def test_a_failed_stage_waits_for_a_retry_that_resumes_from_its_checkpoint():
    parsed = spec()
    first = P.walk("tiny-recipe", parsed, {}, {}, IMAGE, image=IMAGE)
    name = first.steps[0].name
    children = {name: P.ChildReport(state="Failed", reason="BackoffLimitExceeded", message="3 restarts used up",
                                    last_checkpoint="s3://dhad-demo/x/pretrain/checkpoints/step-000020")}
    failed = P.walk("tiny-recipe", parsed, children, {}, IMAGE, image=IMAGE)
    assert failed.outcome.value == "Failed" and failed.reason == "StageFailed"
    assert "BackoffLimitExceeded: 3 restarts used up" in failed.message and "dhad.dev/retry=pretrain" in failed.message
    assert [s.name for s in failed.steps] == [name]  # nothing new
    retried = P.walk("tiny-recipe", parsed, children, {}, IMAGE, image=IMAGE, retry="pretrain")
    assert retried.retried == "pretrain" and retried.outcome.value == "Running"
    (new,) = [s for s in retried.steps if s.name not in children]
    assert new.name != name and new.spec["checkpoint"]["resumeFrom"] == "s3://dhad-demo/x/pretrain/checkpoints/step-000020"
    assert retried.retries == [{"stage": "pretrain", "role": "stage", "key": new.key, "retries": 1,
                                "resumeFrom": "s3://dhad-demo/x/pretrain/checkpoints/step-000020"}]
    # the next walk, with the record kept, keeps the replacement and does not retry again
    later = P.walk("tiny-recipe", parsed, children, {}, IMAGE, retries=retried.retries, image=IMAGE, retry="pretrain")
    assert [s.name for s in later.steps] == [new.name] and later.retried is None


def test_a_retry_of_a_stage_that_did_not_fail_does_nothing():
    parsed = spec()
    result = P.walk("tiny-recipe", parsed, {}, {}, IMAGE, image=IMAGE, retry="sft")
    assert result.retried is None and len(result.steps) == 1


def test_child_names_fit_the_job_name_limit():
    from dhad_api.naming import MAX_NAME_LENGTH

    name = P.child_name("p" * P.PIPELINE_NAME_MAX, "s" * P.STAGE_NAME_MAX, "gate", "0" * 64, 99)
    assert len(name) == MAX_NAME_LENGTH
