"""Pipelines on the real control plane with kwok GPU nodes and the real operator: a 4-stage pipeline with a
gate runs its child jobs in order; a gate below its threshold stops it and promotes nothing; re-applying
with one changed stage re-runs only that stage and the ones after it; deleting it deletes its jobs and
keeps the step cache, so applying it again runs nothing; suspend/resume; a failed stage retried in place
from its checkpoint; what CEL cannot check fails it naming the field.

kwok stands in for the kubelet: a pod exits when the test sets `dhad.test/kwok-exit` on it (tests/harness/
kwok_stages). Evaluation scores reach a child EvalJob's status the way the trainer sends them: a merge
patch of the child's progress ConfigMap (tests/integration/test_operator_status.py does the same)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from kubernetes import client

from dhad_api.naming import config_map_name
from dhad_api.pipeline import PLURAL
from tests.conftest import wait_for
from tests.integration.jobs import PLURAL as JOB_PLURAL
from tests.integration.jobs import REPO, exit_pod, get, pods

pytestmark = pytest.mark.cluster
NAME = "recipe"
GATE_OK = {"acva/loglikelihood": 0.5}
CODES = {"PretrainJob": "pt", "SFTJob": "sft", "RLAIFJob": "rl", "EvalJob": "ev"}


def manifest() -> dict:
    """examples/tiny/pipeline.yaml made for kwok: one 8-GPU node per stage, no S3 (nothing runs a trainer)."""
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "pipeline.yaml").read_text())
    doc["metadata"] = {"name": NAME}
    spec = doc["spec"]
    spec["defaults"]["resources"] = {"nodes": 1, "gpusPerNode": 8}
    spec["defaults"]["restartPolicy"] = {"maxRestarts": 0, "backoffSeconds": 1}
    for stage in spec["stages"]:
        body = next(stage[k] for k in ("pretrain", "sft", "rlaif", "eval") if k in stage)
        body.pop("resources", None)
    spec["stages"][0]["pretrain"]["data"]["workers"] = 1
    return doc


def custom(kube):
    return client.CustomObjectsApi(kube)


def apply_pipeline(kube, namespace: str, doc: dict) -> dict:
    return custom(kube).create_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, doc, field_validation="Strict")


def pipeline(kube, namespace: str) -> dict:
    return custom(kube).get_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME)


def status(kube, namespace: str) -> dict:
    return pipeline(kube, namespace).get("status") or {}


def children(kube, namespace: str) -> dict[str, dict]:
    """Every Dhad job labelled for the pipeline, by name."""
    found = {}
    for plural in JOB_PLURAL.values():
        for item in custom(kube).list_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, plural,
                                                               label_selector=f"dhad.dev/pipeline={NAME}")["items"]:
            found[item["metadata"]["name"]] = item
    return found


def child_of(kube, namespace: str, stage: str, role: str = "stage", timeout: float = 60) -> dict:
    def one():
        found = [c for c in children(kube, namespace).values() if c["metadata"]["labels"]["dhad.dev/pipeline-stage"] == stage
                 and c["metadata"]["labels"]["dhad.dev/pipeline-role"] == role and not c["metadata"].get("deletionTimestamp")]
        return found[0] if len(found) == 1 else None

    return wait_for(one, timeout, f"the {role} job of stage {stage}")


def report(kube, namespace: str, child: dict, **progress) -> None:
    """What the trainer's rank 0 does: a merge patch of the job's progress ConfigMap."""
    name = config_map_name(child["metadata"]["name"], CODES[child["kind"]])[: -len("-spec")] + "-progress"
    wait_for(lambda: client.CoreV1Api(kube).read_namespaced_config_map(name, namespace), 30, f"ConfigMap {name}")
    client.CoreV1Api(kube).patch_namespaced_config_map(name, namespace, {"data": {"progress": json.dumps(progress)}})


def run_child(kube, namespace: str, child: dict, scores: dict | None = None, code: int = 0, timeout: float = 120) -> dict:
    """Plays the trainer for one child job: every pod of each sub-stage exits `code` (scores reported first)."""
    kind, name = child["kind"], child["metadata"]["name"]
    if scores is not None:
        report(kube, namespace, child, stage="eval", step=1, totalSteps=1, scores=scores, updatedAt="2026-01-01T00:00:00Z")
        wait_for(lambda: (get(kube, namespace, kind, name).get("status") or {}).get("scores") == scores, 30, f"{name} scores")

    def done():
        state = (get(kube, namespace, kind, name).get("status") or {}).get("state")
        if state in ("Succeeded", "Failed"):
            return state
        for pod in pods(kube, namespace, name, phase="Running"):
            if "dhad.test/kwok-exit" not in (pod.metadata.annotations or {}):
                exit_pod(kube, namespace, pod, code, json.dumps({"reason": "BadConfig", "message": "test"}) if code else "")
        return None

    wait_for(done, timeout, f"{kind} {name} finished", interval=0.5)
    return get(kube, namespace, kind, name)


def run_stage(kube, namespace: str, stage: str, gate_scores: dict | None = None, baseline_scores: dict | None = None) -> dict:
    made = run_child(kube, namespace, child_of(kube, namespace, stage))
    if gate_scores is not None:
        if baseline_scores is not None:
            run_child(kube, namespace, child_of(kube, namespace, stage, "base"), scores=baseline_scores)
        run_child(kube, namespace, child_of(kube, namespace, stage, "gate"), scores=gate_scores)
    return made


def wait_pipeline(kube, namespace: str, state: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (lambda s: s if s.get("state") == state else None)(status(kube, namespace)), timeout,
                    f"pipeline {state}")


def created_order(kube, namespace: str) -> list[str]:
    items = sorted(children(kube, namespace).values(), key=lambda c: (c["metadata"]["creationTimestamp"], c["metadata"]["name"]))
    return [f"{c['metadata']['labels']['dhad.dev/pipeline-stage']}/{c['metadata']['labels']['dhad.dev/pipeline-role']}" for c in items]


def run_all(kube, namespace: str) -> dict:
    pretrain = run_stage(kube, namespace, "pretrain")
    sft = run_stage(kube, namespace, "sft", GATE_OK)
    assert sft["spec"]["model"]["uri"] == pretrain["status"]["outputModel"]  # outputs passed on
    run_stage(kube, namespace, "rlaif", {"arabic-mmlu/loglikelihood": 0.30}, {"arabic-mmlu/loglikelihood": 0.35})
    run_child(kube, namespace, child_of(kube, namespace, "eval"), scores={"acva/loglikelihood": 0.5, "exams/loglikelihood": 0.3})
    return wait_pipeline(kube, namespace, "Succeeded")


def test_stages_run_in_order_then_a_changed_stage_reruns_with_those_after_it_and_delete_keeps_the_cache(kube, namespace, dhad_operator):
    apply_pipeline(kube, namespace, manifest())
    first = child_of(kube, namespace, "pretrain")
    assert first["metadata"]["ownerReferences"][0]["kind"] == "Pipeline" and first["metadata"]["ownerReferences"][0]["controller"]
    assert len(children(kube, namespace)) == 1  # nothing else starts before it
    done = run_all(kube, namespace)
    assert created_order(kube, namespace) == ["pretrain/stage", "sft/stage", "sft/gate", "rlaif/stage", "rlaif/base",
                                              "rlaif/gate", "eval/stage"]
    rlaif = child_of(kube, namespace, "rlaif")
    assert done["outputModel"] == rlaif["status"]["outputModel"] and done["progress"] == "4/4"
    assert [s["state"] for s in done["stages"]] == ["Succeeded"] * 4 and not any(s.get("cached") for s in done["stages"])
    assert done["stages"][1]["gate"]["scores"] == GATE_OK
    cache = client.CoreV1Api(kube).list_namespaced_config_map(namespace, label_selector="dhad.dev/cache").items
    assert len(cache) == 7

    kept = {n for n, c in children(kube, namespace).items() if c["metadata"]["labels"]["dhad.dev/pipeline-stage"] in ("pretrain", "sft")}
    changed = manifest()
    changed["spec"]["stages"][2]["rlaif"]["policy"]["training"]["maxSteps"] = 5
    custom(kube).patch_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME, {"spec": changed["spec"]})
    new_rlaif = wait_for(lambda: (lambda c: c if c["metadata"]["name"] != rlaif["metadata"]["name"] else None)(
        child_of(kube, namespace, "rlaif")), 60, "a new rlaif job")
    assert new_rlaif["spec"]["policy"]["training"]["maxSteps"] == 5
    wait_for(lambda: rlaif["metadata"]["name"] not in children(kube, namespace), 60, "the old rlaif job deleted")
    new_rlaif = run_child(kube, namespace, new_rlaif)
    run_child(kube, namespace, child_of(kube, namespace, "rlaif", "gate"), scores={"arabic-mmlu/loglikelihood": 0.31})
    run_child(kube, namespace, child_of(kube, namespace, "eval"), scores={"acva/loglikelihood": 0.55})
    again = wait_pipeline(kube, namespace, "Succeeded")
    assert kept <= set(children(kube, namespace))  # pretrain, sft and sft's gate were not run again
    assert again["stages"][2]["gate"]["baselineJob"] == done["stages"][2]["gate"]["baselineJob"]  # sft's score, cached
    assert again["outputModel"] == new_rlaif["status"]["outputModel"] != done["outputModel"]

    custom(kube).delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME)
    wait_for(lambda: not children(kube, namespace) and not client.CoreV1Api(kube).list_namespaced_pod(namespace).items, 90,
             "the pipeline's jobs and their pods garbage-collected")
    assert len(client.CoreV1Api(kube).list_namespaced_config_map(namespace, label_selector="dhad.dev/cache").items) == 10  # the cache stays
    apply_pipeline(kube, namespace, changed)
    cached = wait_pipeline(kube, namespace, "Succeeded")
    assert all(s["cached"] for s in cached["stages"]) and not children(kube, namespace)
    assert cached["outputModel"] == again["outputModel"]


def test_a_gate_below_its_threshold_stops_the_pipeline_and_promotes_nothing(kube, namespace, dhad_operator):
    apply_pipeline(kube, namespace, manifest())
    run_stage(kube, namespace, "pretrain")
    run_stage(kube, namespace, "sft", {"acva/loglikelihood": 0.1})
    failed = wait_pipeline(kube, namespace, "Failed")
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "GateFailed"
    assert "gate of stage sft failed: acva/loglikelihood = 0.1000 < atLeast 0.2" in condition["message"]
    assert "outputModel" not in failed and failed["stage"] == "sft/gate"
    assert created_order(kube, namespace) == ["pretrain/stage", "sft/stage", "sft/gate"]  # RLAIF never started
    events = client.CoreV1Api(kube).list_namespaced_event(namespace, field_selector=f"involvedObject.name={NAME}").items
    assert any(e.reason == "GateFailed" for e in events)


def test_suspend_suspends_the_running_stage_and_resume_continues(kube, namespace, dhad_operator):
    apply_pipeline(kube, namespace, manifest())
    run_stage(kube, namespace, "pretrain")
    sft = child_of(kube, namespace, "sft")
    name = sft["metadata"]["name"]
    wait_for(lambda: pods(kube, namespace, name, phase="Running"), 60, "sft running")
    custom(kube).patch_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME, {"spec": {"suspend": True}})
    wait_pipeline(kube, namespace, "Suspended")
    wait_for(lambda: get(kube, namespace, "SFTJob", name)["spec"]["suspend"] is True, 30, "the sft job suspended")
    wait_for(lambda: not pods(kube, namespace, name), 60, "its pods gone")
    custom(kube).patch_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME, {"spec": {"suspend": False}})
    wait_for(lambda: get(kube, namespace, "SFTJob", name)["spec"]["suspend"] is False, 30, "the sft job resumed")
    resumed = run_child(kube, namespace, get(kube, namespace, "SFTJob", name))
    assert resumed["status"]["attempt"] == 2 and resumed["status"].get("restarts", 0) == 0
    child_of(kube, namespace, "sft", "gate")  # the pipeline went on
    assert wait_pipeline(kube, namespace, "Running")["stage"] == "sft/gate"


def test_a_failed_stage_is_retried_in_place_from_its_newest_checkpoint(kube, namespace, dhad_operator):
    apply_pipeline(kube, namespace, manifest())
    run_stage(kube, namespace, "pretrain")
    sft = child_of(kube, namespace, "sft")
    wait_for(lambda: pods(kube, namespace, sft["metadata"]["name"], phase="Running"), 60, "sft running")
    checkpoint = "s3://dhad-demo/dhad/x/sft/checkpoints/step-000010"
    report(kube, namespace, sft, stage="sft", step=10, totalSteps=20, lastCheckpoint=checkpoint, updatedAt="2026-01-01T00:00:00Z")
    wait_for(lambda: get(kube, namespace, "SFTJob", sft["metadata"]["name"])["status"].get("lastCheckpoint") == checkpoint, 30, "checkpoint")
    run_child(kube, namespace, sft, code=78)  # BadConfig: the job fails without restarts
    failed = wait_pipeline(kube, namespace, "Failed")
    assert "dhad.dev/retry=sft" in next(c["message"] for c in failed["conditions"] if c["type"] == "Failed")
    custom(kube).patch_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL, NAME,
                                                {"metadata": {"annotations": {"dhad.dev/retry": "sft"}}})
    retry = wait_for(lambda: (lambda c: c if c["metadata"]["name"] != sft["metadata"]["name"] else None)(
        child_of(kube, namespace, "sft")), 60, "the retry job")
    assert retry["spec"]["checkpoint"]["resumeFrom"] == checkpoint
    wait_for(lambda: "dhad.dev/retry" not in (pipeline(kube, namespace)["metadata"].get("annotations") or {}), 30, "annotation removed")
    run_child(kube, namespace, retry)
    running = wait_pipeline(kube, namespace, "Running")
    assert running["stages"][1]["retries"] == 1 and running["stages"][1]["resumeFrom"] == checkpoint


def test_a_rule_cel_cannot_check_fails_the_pipeline_naming_the_field(kube, namespace, dhad_operator):
    doc = manifest()
    doc["spec"]["stages"][2]["rlaif"]["policy"]["generationsPerPrompt"] = 7  # 8 GPUs (defaults.resources) x 1 x 1: not divisible
    apply_pipeline(kube, namespace, copy.deepcopy(doc))
    failed = wait_pipeline(kube, namespace, "Failed")
    condition = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "InvalidSpec" and condition["message"].startswith("spec.stages[2].rlaif")
    assert "generationsPerPrompt" in condition["message"] and not children(kube, namespace)
