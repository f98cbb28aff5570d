"""The Pipeline reconcile (operator/dhad_operator/pipeline.decide) as a table: a pipeline object and what
exists (its child jobs, the cache ConfigMaps) in, a plan out. A tiny in-memory "cluster" applies each plan
the way k8s.py does, and child jobs are finished by hand, as their own reconcile would."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from dhad_operator.pipeline import PipelineObserved, decide
from dhad_operator.render import Defaults

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DEFAULTS = Defaults(trainer_image="ghcr.io/dhad/trainer:0.1.0")


def pipeline(name: str = "tiny-recipe", uid: str = "uid-p1", **spec_changes) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "pipeline.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "ml", "uid": uid, "generation": 1}
    doc["spec"].update(spec_changes)
    return doc


class Cluster:
    """Child jobs and cache ConfigMaps by name, changed only through plans (and `finish`)."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict] = {}
        self.cache: dict[str, dict] = {}
        self.created: list[str] = []

    def observed(self) -> PipelineObserved:
        return PipelineObserved(children=copy.deepcopy(list(self.jobs.values())), cache=copy.deepcopy(list(self.cache.values())))

    def reconcile(self, obj: dict):
        plan = decide(obj, self.observed(), NOW, DEFAULTS)
        obj["status"] = plan.status
        for manifest in plan.create:
            store = self.cache if manifest["kind"] == "ConfigMap" else self.jobs
            if manifest["metadata"]["name"] not in store:  # AlreadyExists is success
                store[manifest["metadata"]["name"]] = copy.deepcopy(manifest)
                if manifest["kind"] != "ConfigMap":
                    self.created.append(manifest["metadata"]["name"])
        for _, name in plan.delete:
            del self.jobs[name]
        for _, name, suspend in plan.suspend:
            self.jobs[name]["spec"]["suspend"] = suspend
        if plan.remove_retry_annotation:
            obj["metadata"].get("annotations", {}).pop("dhad.dev/retry", None)
        return plan

    def finish(self, name: str, state: str = "Succeeded", scores: dict | None = None, **status) -> None:
        job = self.jobs[name]
        body = {"state": state, "startTime": "2026-01-01T10:00:00Z", "completionTime": "2026-01-01T11:00:00Z", **status}
        if state == "Succeeded" and job["kind"] != "EvalJob":
            body["outputModel"] = f"s3://dhad-demo/dhad/ml/{name}-u/{'policy' if job['kind'] == 'RLAIFJob' else job['kind'][:-3].lower()}/model"
        if scores is not None:
            body["scores"] = scores
        if state == "Failed":
            body["conditions"] = [{"type": "Failed", "status": "True", "reason": status.pop("reason", "BackoffLimitExceeded"),
                                   "message": "restartPolicy.maxRestarts (3) used up"}]
        job["status"] = body

    def running(self) -> list[str]:
        return [n for n, j in self.jobs.items() if (j.get("status") or {}).get("state") not in ("Succeeded", "Failed")]


GOOD = {"gate": {"acva/loglikelihood": 0.5, "arabic-mmlu/loglikelihood": 0.30}, "base": {"arabic-mmlu/loglikelihood": 0.35}}


def drive(cluster: Cluster, obj: dict, scores=GOOD, limit: int = 12) -> dict:
    """Reconciles, finishes whatever runs (evaluations with `scores` by role), until nothing runs."""
    for _ in range(limit):
        cluster.reconcile(obj)
        running = cluster.running()
        if not running:
            return obj["status"]
        for name in running:
            role = cluster.jobs[name]["metadata"]["labels"]["dhad.dev/pipeline-role"]
            cluster.finish(name, scores=scores.get(role) if cluster.jobs[name]["kind"] == "EvalJob" else None)
    raise AssertionError("still running")


def test_the_first_stage_is_a_child_owned_by_the_pipeline_and_nothing_else_starts():
    cluster, obj = Cluster(), pipeline()
    plan = cluster.reconcile(obj)
    (job,) = cluster.jobs.values()
    assert job["kind"] == "PretrainJob" and job["metadata"]["name"].startswith("tiny-recipe-pretrain-")
    assert job["metadata"]["ownerReferences"] == [{"apiVersion": "dhad.dev/v1alpha1", "kind": "Pipeline", "name": "tiny-recipe",
                                                   "uid": "uid-p1", "controller": True, "blockOwnerDeletion": True}]
    assert job["metadata"]["labels"] == {"dhad.dev/pipeline": "tiny-recipe", "dhad.dev/pipeline-stage": "pretrain",
                                         "dhad.dev/pipeline-role": "stage"}
    assert job["spec"]["suspend"] is False and job["spec"]["image"] == DEFAULTS.trainer_image
    status = plan.status
    assert status["state"] == "Running" and status["stage"] == "pretrain" and status["progress"] == "0/4"
    assert [s["name"] for s in status["stages"]] == ["pretrain"] and status["observedGeneration"] == 1
    assert ("Normal", "StageStarted", f"stage pretrain: created PretrainJob {job['metadata']['name']}") in plan.events
    again = cluster.reconcile(obj)
    assert not again.create and not again.events and again.status == status  # idempotent, and quiet


def test_stages_run_in_order_and_the_last_models_output_is_promoted():
    cluster, obj = Cluster(), pipeline()
    status = drive(cluster, obj)
    kinds = [cluster.jobs[n]["kind"] + "/" + cluster.jobs[n]["metadata"]["labels"]["dhad.dev/pipeline-role"] for n in cluster.created]
    assert kinds == ["PretrainJob/stage", "SFTJob/stage", "EvalJob/gate", "RLAIFJob/stage", "EvalJob/gate", "EvalJob/base", "EvalJob/stage"]
    sft = cluster.jobs[cluster.created[1]]
    pretrain_output = cluster.jobs[cluster.created[0]]["status"]["outputModel"]
    assert sft["spec"]["model"]["uri"] == pretrain_output  # outputs passed on as resolved URIs
    base = cluster.jobs[cluster.created[5]]
    assert base["spec"]["model"]["uri"] == cluster.jobs[cluster.created[1]]["status"]["outputModel"]  # the rlaif stage's input
    assert status["state"] == "Succeeded" and status["progress"] == "4/4" and "stage" not in status
    assert status["outputModel"] == cluster.jobs[cluster.created[3]]["status"]["outputModel"]
    assert all(s["durationSeconds"] == 3600 and not s.get("cached") for s in status["stages"])
    assert status["completionTime"] == "2026-01-01T12:00:00Z"
    assert len(cluster.cache) == 7  # one entry per finished child


def test_a_gate_below_its_threshold_fails_the_pipeline_and_promotes_nothing():
    cluster, obj = Cluster(), pipeline()
    status = drive(cluster, obj, scores={"gate": {"acva/loglikelihood": 0.1}})
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["state"] == "Failed" and failed["reason"] == "GateFailed"
    assert "gate of stage sft failed: acva/loglikelihood = 0.1000 < atLeast 0.2" in failed["message"]
    assert "outputModel" not in status and status["stage"] == "sft/gate" and status["progress"] == "1/4"
    assert [cluster.jobs[n]["kind"] for n in cluster.created] == ["PretrainJob", "SFTJob", "EvalJob"]  # no RLAIF


def test_a_failed_gate_after_an_earlier_success_removes_the_promoted_model():
    cluster, obj = Cluster(), pipeline()
    assert drive(cluster, obj)["outputModel"]
    changed = copy.deepcopy(obj)
    changed["metadata"]["generation"] = 2
    changed["spec"]["stages"][2]["gate"]["require"][0]["maxDrop"] = 0.01
    status = drive(cluster, changed, scores=GOOD)
    assert status["state"] == "Failed" and "outputModel" not in status
    assert "more than maxDrop 0.01" in next(c["message"] for c in status["conditions"] if c["type"] == "Failed")


def test_a_changed_stage_reruns_with_every_stage_after_it_and_the_old_jobs_go():
    cluster, obj = Cluster(), pipeline()
    drive(cluster, obj)
    before = dict(cluster.jobs)
    changed = copy.deepcopy(obj)
    changed["metadata"]["generation"] = 2
    changed["spec"]["stages"][2]["rlaif"]["policy"]["training"]["maxSteps"] = 5
    plan = cluster.reconcile(changed)
    stale = {n for n in before if before[n]["metadata"]["labels"]["dhad.dev/pipeline-stage"] in ("rlaif", "eval")}
    assert {n for _, n in plan.delete} == stale  # rlaif, its gate and baseline, eval: deleted (outputs stay in S3)
    assert [c["kind"] for c in plan.create] == ["RLAIFJob"]
    status = drive(cluster, changed)
    kept = [n for n in before if n not in stale]
    assert all(n in cluster.jobs for n in kept)  # pretrain, sft and sft's gate did not run again
    rerun = [cluster.jobs[n]["metadata"]["labels"]["dhad.dev/pipeline-stage"] + "/" + cluster.jobs[n]["metadata"]["labels"]["dhad.dev/pipeline-role"]
             for n in cluster.created[7:]]
    assert rerun == ["rlaif/stage", "rlaif/gate", "eval/stage"]  # the baseline (sft's output) came from the cache
    assert status["state"] == "Succeeded" and status["stages"][2]["gate"]["state"] == "Succeeded"


def test_another_pipeline_with_the_same_stages_reuses_the_cache_and_runs_nothing():
    cluster, obj = Cluster(), pipeline()
    first = drive(cluster, obj)
    other = pipeline(name="tiny-again", uid="uid-p2")
    plan = cluster.reconcile(other)
    status = plan.status
    assert not [c for c in plan.create if c["kind"] != "ConfigMap"] and status["state"] == "Succeeded"
    assert [s["cached"] for s in status["stages"]] == [True, True, True, True]
    assert status["stages"][1]["cachedFrom"] == "tiny-recipe/sft" and status["stages"][1]["gate"]["cached"] is True
    assert status["outputModel"] == first["outputModel"]
    assert sum(1 for e in plan.events if e[1] == "StageCached") == 4


def test_a_cache_entry_whose_name_is_not_its_key_is_not_trusted():
    cluster, obj = Cluster(), pipeline()
    drive(cluster, obj)
    for cm in cluster.cache.values():
        cm["metadata"]["name"] = "dhad-cache-" + "0" * 64
    plan = cluster.reconcile(pipeline(name="tiny-again", uid="uid-p2"))
    assert [c["kind"] for c in plan.create] == ["PretrainJob"]


def test_suspend_suspends_the_running_stage_starts_nothing_and_resume_undoes_it():
    cluster, obj = Cluster(), pipeline()
    cluster.reconcile(obj)
    (first,) = cluster.jobs
    obj["spec"]["suspend"] = True
    plan = cluster.reconcile(obj)
    assert plan.suspend == [("PretrainJob", first, True)] and plan.status["state"] == "Suspended"
    assert "spec.suspend is true: stage pretrain" in next(c["message"] for c in plan.status["conditions"] if c["type"] == "Suspended")
    cluster.finish(first)  # it had finished its last step anyway
    plan = cluster.reconcile(obj)
    assert not [c for c in plan.create if c["kind"] != "ConfigMap"] and plan.status["state"] == "Suspended"
    obj["spec"]["suspend"] = False
    plan = cluster.reconcile(obj)
    assert [c["kind"] for c in plan.create if c["kind"] != "ConfigMap"] == ["SFTJob"] and plan.status["state"] == "Running"


def test_a_failed_stage_is_retried_in_place_from_its_checkpoint_when_annotated():
    cluster, obj = Cluster(), pipeline()
    cluster.reconcile(obj)
    (first,) = cluster.jobs
    cluster.finish(first, "Failed", lastCheckpoint="s3://dhad-demo/dhad/ml/x/pretrain/checkpoints/step-000020")
    failed = cluster.reconcile(obj).status
    assert failed["state"] == "Failed" and "dhad.dev/retry=pretrain" in next(c["message"] for c in failed["conditions"] if c["type"] == "Failed")
    obj["metadata"]["annotations"] = {"dhad.dev/retry": "pretrain"}
    plan = cluster.reconcile(obj)
    assert plan.remove_retry_annotation and plan.delete == [("PretrainJob", first)]
    (retry,) = [c for c in plan.create if c["kind"] == "PretrainJob"]
    assert retry["spec"]["checkpoint"]["resumeFrom"] == "s3://dhad-demo/dhad/ml/x/pretrain/checkpoints/step-000020"
    assert plan.status["state"] == "Running" and plan.status["stages"][0]["retries"] == 1
    assert plan.status["retries"][0]["retries"] == 1 and "completionTime" not in plan.status
    assert ("Normal", "Retry", "stage pretrain: a new job resumes from the failed one's newest checkpoint") in plan.events
    assert "dhad.dev/retry" not in obj["metadata"]["annotations"]
    status = drive(cluster, obj)
    assert status["state"] == "Succeeded"


def test_a_retry_of_a_stage_that_did_not_fail_is_ignored_with_a_warning():
    cluster, obj = Cluster(), pipeline()
    obj["metadata"]["annotations"] = {"dhad.dev/retry": "sft"}
    plan = cluster.reconcile(obj)
    assert plan.remove_retry_annotation and any(e[1] == "RetryIgnored" for e in plan.events)


def test_what_cel_cannot_check_fails_the_pipeline_naming_the_field_before_anything_runs():
    cluster, obj = Cluster(), pipeline()
    obj["spec"]["stages"][2]["rlaif"]["policy"]["training"]["microBatchSize"] = 3
    plan = cluster.reconcile(obj)
    failed = next(c for c in plan.status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith("spec.stages[2].rlaif") and "generationsPerPrompt" in failed["message"]
    assert not cluster.jobs


def test_a_name_held_by_another_owner_is_never_adopted():
    cluster, obj = Cluster(), pipeline()
    plan = decide(obj, PipelineObserved(), NOW, DEFAULTS)
    name = plan.create[0]["metadata"]["name"]
    squatter = copy.deepcopy(plan.create[0])
    squatter["metadata"]["ownerReferences"] = [{"kind": "Pipeline", "name": "other", "uid": "uid-other", "controller": True}]
    squatter["status"] = {"state": "Succeeded", "outputModel": "s3://dhad-demo/elsewhere/model"}
    cluster.jobs[name] = squatter
    plan = cluster.reconcile(obj)
    assert not plan.create and any(e[1] == "NameTaken" for e in plan.events) and plan.status["stages"][0]["state"] == "Pending"


def test_a_deleted_pipeline_plans_nothing():
    obj = pipeline()
    obj["metadata"]["deletionTimestamp"] = "2026-01-01T12:00:00Z"
    plan = decide(obj, PipelineObserved(), NOW, DEFAULTS)
    assert not plan.create and not plan.delete and not plan.events


@pytest.mark.parametrize("role,expected", [("gate", "gate"), ("base", "base")])
def test_gate_children_are_labelled_by_role(role, expected):
    cluster, obj = Cluster(), pipeline()
    drive(cluster, obj)
    assert any(j["metadata"]["labels"]["dhad.dev/pipeline-role"] == expected for j in cluster.jobs.values())
