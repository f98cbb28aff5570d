"""`decide` as a table: hand-built Jobs and Pods (camelCase, as the API returns them) -> the Plan."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from dhad_api.naming import STAGE_CODES
from dhad_api.status import JobStatus
from dhad_operator.reconcile import Foreign, Observed, Plan, Rejection, decide, progress_of
from dhad_operator.render import Defaults, Owner, namespace_child_names, static_child_names
from dhad_operator.status import fit_status, rfc3339

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
UID = "7a6b0c2d-0000-4000-8000-000000000001"
ROOT = f"s3://dhad-demo/dhad/ml/tiny-sft-{UID}"
BASE = "s3://dhad-demo/models/tiny-base"


def job_obj(example: str = "sft", status: dict | None = None, **changes) -> dict:
    """A tiny example as the apiserver returns it, starting from a model URI (no fromJob), 2 nodes."""
    doc = yaml.safe_load((REPO / "examples" / "tiny" / f"{example}.yaml").read_text())
    doc["metadata"].update(namespace="ml", uid=UID, generation=1)
    doc["spec"]["model"] = {"uri": BASE}
    doc["spec"]["resources"]["nodes"] = 2
    if example == "rlaif":
        doc["spec"]["feedback"]["judge"]["model"] = {"uri": BASE}
    doc["spec"].update(copy.deepcopy(changes))
    doc["status"] = copy.deepcopy(status or {})
    return doc


def decide_at(obj: dict, observed: Observed | None = None, now: datetime = NOW) -> Plan:
    return decide(obj, observed or Observed(), now, Defaults())


def then(obj: dict, plan: Plan) -> dict:
    """The object after the operator patched the plan's status."""
    return {**obj, "status": copy.deepcopy(plan.status)}


def owned_by(uid: str) -> list[dict]:
    return [{"apiVersion": "x", "kind": "x", "name": "x", "uid": uid, "controller": True}]


def job_uid(stage: str, attempt: int) -> str:
    return f"uid-job-{stage}-{attempt}"


def k8s_job(stage: str, attempt: int, finished: str | None = None, suspend: bool = False,
            deleting: bool = False, name: str = "tiny-sft") -> dict:
    meta = {"name": f"{name}-{STAGE_CODES[stage]}-{attempt}", "namespace": "ml", "uid": job_uid(stage, attempt),
            "labels": {"dhad.dev/job": name, "dhad.dev/stage": stage, "dhad.dev/attempt": str(attempt)},
            "ownerReferences": owned_by(UID), "creationTimestamp": rfc3339(NOW)}
    if deleting:
        meta["deletionTimestamp"] = rfc3339(NOW)
    conditions = [{"type": finished, "status": "True"}] if finished else []
    return {"metadata": meta, "spec": {"suspend": suspend}, "status": {"conditions": conditions}}


def pod(stage: str, attempt: int, index: int = 0, phase: str = "Running", name: str = "tiny-sft", **status) -> dict:
    return {"metadata": {"name": f"{name}-{STAGE_CODES[stage]}-{attempt}-{index}-x", "ownerReferences": owned_by(job_uid(stage, attempt)),
                         "labels": {"dhad.dev/stage": stage, "dhad.dev/attempt": str(attempt)}},
            "spec": {"nodeName": f"node-{index}"}, "status": {"phase": phase, **status}}


def children(name: str = "tiny-sft", kind: str = "SFTJob") -> set[tuple[str, str]]:
    """Every static child of the job exists and is ours."""
    return set(static_child_names(Owner(kind, name, "ml", UID)))


ALL = children()
SHARED = set(namespace_child_names())  # the namespace's Service exists and is ours


def exited(stage: str, attempt: int, code: int, message: str = "", index: int = 0, reason: str = "Error") -> dict:
    term = {"exitCode": code, "reason": reason, "message": message}
    return pod(stage, attempt, index, "Failed", containerStatuses=[{"name": "trainer", "state": {"terminated": term}}])


def running(stage: str = "sft", attempt: int = 1, nodes: int = 2, name: str = "tiny-sft") -> list[dict]:
    return [pod(stage, attempt, i, name=name) for i in range(nodes)]


def condition(status: dict, type_: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), None)


def started(example: str = "sft", **changes) -> tuple[dict, Plan]:
    """The object after its first reconcile created attempt 1, and that plan."""
    obj = job_obj(example, **changes)
    plan = decide_at(obj)
    return then(obj, plan), plan


def running_obj(**changes) -> dict:
    obj, _ = started(**changes)
    return then(obj, decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED)))


def test_new_job_creates_static_children_and_attempt_1():
    plan = decide_at(job_obj())
    assert [c["kind"] for c in plan.create] == ["Service", "ConfigMap", "ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    assert plan.create[0]["metadata"]["name"] == "dhad-workers" and "ownerReferences" not in plan.create[0]["metadata"]
    assert plan.create[-1]["metadata"]["name"] == "tiny-sft-sft-1"
    s = plan.status
    assert (s["attempt"], s["stage"], s["state"], s["startTime"], s["attemptStartTime"]) == (1, "sft", "Pending", rfc3339(NOW), rfc3339(NOW))
    assert s["observedGeneration"] == 1 and s["resolvedModel"] == BASE
    assert condition(s, "Created")["status"] == "True"
    assert s["stages"] == [{"name": "sft", "state": "Pending", "attempt": 1, "startTime": rfc3339(NOW)}]
    job_json = json.loads(plan.create[1]["data"]["job.json"])
    assert job_json["resolved"] == {"modelUri": BASE, "outputRoot": ROOT}


def test_decide_twice_is_idempotent():
    obj, first = started()
    again = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], children=ALL, shared=SHARED))
    assert again.create == [] and again.delete_jobs == [] and again.status["attempt"] == 1
    assert again.status == first.status and again.events == []


def test_a_job_whose_status_write_was_lost_is_taken_as_the_current_attempt():
    """The Job is created before status records it: a crash in between leaves Job 1 and no status."""
    obj = job_obj()
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], children=ALL, shared=SHARED))
    assert plan.create == [] and plan.status["attempt"] == 1 and plan.status["attemptStartTime"] == rfc3339(NOW)
    assert condition(plan.status, "Created")["status"] == "True" and plan.status["stages"][0]["attempt"] == 1


def test_a_job_deleted_by_hand_never_has_its_attempt_number_reused():
    obj = running_obj()
    old_pods = [pod("sft", 1, 0, "Running"), pod("sft", 1, 1, "Running")]
    plan = decide_at(obj, Observed(children=ALL, shared=SHARED, labelled_pods=old_pods))  # Job 1 gone, its pods still stopping
    s = plan.status
    assert plan.create == [] and (s["endedAttempt"], s["disruptions"], s["state"]) == (1, 1, "Restarting")
    assert condition(s, "Restarting")["reason"] == "JobDeleted" and plan.restart_reason == "JobDeleted"
    obj = then(obj, plan)
    still = decide_at(obj, Observed(children=ALL, shared=SHARED, labelled_pods=[pod("sft", 1, 0, "Running")]))
    assert still.create == [] and still.status == obj["status"]
    gone = decide_at(obj, Observed(children=ALL, shared=SHARED, labelled_pods=[exited("sft", 1, 143)]))  # terminal pods hold nothing
    assert [c["metadata"]["name"] for c in gone.create] == ["tiny-sft-sft-2"] and gone.status["attempt"] == 2
    assert gone.status.get("restarts", 0) == 0


def test_running_pods_make_the_job_running():
    obj, _ = started()
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED))
    assert plan.status["state"] == "Running" and condition(plan.status, "Running")["status"] == "True"
    assert plan.status["stages"][0]["state"] == "Running" and plan.create == []
    assert plan.requeue_after == 1800  # the hang timer (hangTimeoutSeconds from attemptStartTime), not a poll
    assert any(e[1] == "Running" for e in plan.events)
    half = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running()[:1] + [pod("sft", 1, 1, "Pending")]))
    assert half.status["state"] == "Pending"


def test_progress_report_is_copied_into_status():
    obj = running_obj()
    report = {"stage": "sft", "step": 5, "totalSteps": 20, "loss": 2.5, "tokensPerSecond": 900.0,
              "updatedAt": rfc3339(NOW), "lastCheckpoint": f"{ROOT}/sft/checkpoints/step-000005"}
    config_map = {"data": {"progress": json.dumps(report)}}
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress=progress_of(config_map), children=ALL, shared=SHARED))
    assert plan.status["progress"] == {"step": 5, "totalSteps": 20, "loss": 2.5, "tokensPerSecond": 900.0,
                                       "updatedAt": rfc3339(NOW), "percent": 25}
    assert plan.status["lastCheckpoint"] == report["lastCheckpoint"]
    other = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress={**report, "stage": "respond"}))
    assert "progress" not in other.status and "lastCheckpoint" not in other.status
    assert progress_of({"data": {"progress": "not json"}}) == {"invalid": ["progress: not JSON"]} and progress_of(None) is None


def test_stage_figures_reach_status_as_numbers_only():
    obj = running_obj()
    figures = {"rewardMean": 0.42, "kl": 0.05, "forcedVerdicts": 12, "note": "text", "flag": True, "bad": float("nan"),
               **{f"extra{i:02d}": i for i in range(20)}}
    report = {"stage": "sft", "step": 3, "figures": figures}
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress=report, children=ALL, shared=SHARED))
    kept = plan.status["progress"]["figures"]
    assert len(kept) == 16 and all(isinstance(v, float) for v in kept.values())
    assert {"rewardMean": 0.42, "kl": 0.05, "forcedVerdicts": 12.0}.items() <= kept.items()
    assert not {"note", "flag", "bad"} & kept.keys()
    JobStatus.model_validate({"progress": plan.status["progress"]})  # what the CRD schema admits


def failing(obj: dict, *pods: dict, now: datetime = NOW, attempt: int = 1) -> Plan:
    return decide_at(obj, Observed(jobs=[k8s_job("sft", attempt)], pods=list(pods), children=ALL, shared=SHARED), now)


def test_worker_failure_restarts_the_gang_after_backoff():
    obj = running_obj()
    message = json.dumps({"reason": "WorkerFailed", "message": "CUDA error: an illegal memory access"})
    plan = failing(obj, exited("sft", 1, 70, message), pod("sft", 1, 1))
    s = plan.status
    assert (s["endedAttempt"], s["restarts"], s["state"], s.get("disruptions", 0)) == (1, 1, "Restarting", 0)
    assert s["nextAttemptAfter"] == rfc3339(NOW + timedelta(seconds=10))
    assert plan.delete_jobs == ["tiny-sft-sft-1"] and plan.create == [] and plan.restart_reason == "WorkerFailed"
    assert "illegal memory access" in condition(s, "Restarting")["message"]
    obj = then(obj, plan)

    repeat = failing(obj, exited("sft", 1, 70, message), pod("sft", 1, 1))  # the same observation again
    assert repeat.status["restarts"] == 1 and repeat.create == []
    deleting = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, "Failed", deleting=True)], children=ALL, shared=SHARED), NOW + timedelta(seconds=3))
    assert deleting.create == [] and deleting.delete_jobs == [] and deleting.requeue_after is None  # woken by the deletion
    gone = decide_at(obj, Observed(children=ALL, shared=SHARED), NOW + timedelta(seconds=4))
    assert gone.create == [] and gone.requeue_after == 6
    assert decide_at(obj, Observed(jobs=[k8s_job("sft", 1, "Failed")], children=ALL, shared=SHARED), NOW + timedelta(seconds=11)).delete_jobs == ["tiny-sft-sft-1"]

    later = NOW + timedelta(seconds=11)
    second = decide_at(obj, Observed(children=ALL, shared=SHARED), later)
    assert [c["metadata"]["name"] for c in second.create] == ["tiny-sft-sft-2"]
    s2 = second.status
    assert (s2["attempt"], s2["restarts"], s2["attemptStartTime"], s2["state"]) == (2, 1, rfc3339(later), "Restarting")
    assert "nextAttemptAfter" not in s2 and s2["stages"][0]["attempt"] == 2
    # the second failure doubles the backoff
    again = failing(then(obj, second), exited("sft", 2, 70, index=1), now=later, attempt=2)
    assert again.status["restarts"] == 2 and again.status["nextAttemptAfter"] == rfc3339(later + timedelta(seconds=20))


def test_a_failed_job_without_pods_counts_as_a_worker_failure():
    plan = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1, "Failed")], children=ALL, shared=SHARED))
    assert plan.status["restarts"] == 1 and plan.restart_reason == "WorkerFailed"


@pytest.mark.parametrize("code, reason", [(78, "BadConfig"), (65, "DataError")])
def test_bad_config_or_data_fails_at_once(code, reason):
    message = json.dumps({"reason": reason, "message": "spec.data[0].uri: s3://dhad-demo/x.jsonl does not exist"})
    plan = failing(running_obj(), exited("sft", 1, code, message), pod("sft", 1, 1))
    s = plan.status
    assert s["state"] == "Failed" and condition(s, "Failed")["reason"] == reason
    assert "does not exist" in condition(s, "Failed")["message"] and s["completionTime"] == rfc3339(NOW)
    assert s.get("restarts", 0) == 0 and "nextAttemptAfter" not in s and plan.delete_jobs == ["tiny-sft-sft-1"]
    assert s["stages"][0]["state"] == "Failed"


@pytest.mark.parametrize("failed", [
    exited("sft", 1, 143, json.dumps({"reason": "Preempted", "message": "SIGTERM; checkpoint saved"})),
    pod("sft", 1, 0, "Failed", reason="Evicted", message="The node was low on resource: memory."),
    pod("sft", 1, 0, "Failed", conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]),
], ids=["exit-143", "evicted", "disruption-target"])
def test_disruptions_restart_at_once_without_using_the_budget(failed):
    obj = running_obj(restartPolicy={"maxRestarts": 0})
    plan = failing(obj, failed, pod("sft", 1, 1))
    s = plan.status
    assert (s["disruptions"], s.get("restarts", 0), s["state"]) == (1, 0, "Restarting")
    assert s["nextAttemptAfter"] == rfc3339(NOW)
    second = decide_at(then(obj, plan), Observed(children=ALL, shared=SHARED))
    assert [c["metadata"]["name"] for c in second.create] == ["tiny-sft-sft-2"]
    assert second.status.get("restarts", 0) == 0


def test_oom_killed_is_a_counted_failure():
    plan = failing(running_obj(), exited("sft", 1, 137, reason="OOMKilled"))
    assert plan.status["restarts"] == 1 and condition(plan.status, "Restarting")["reason"] == "OOMKilled"


def test_restarts_beyond_max_restarts_fail_with_the_last_failure():
    obj = running_obj(restartPolicy={"maxRestarts": 1, "backoffSeconds": 1})
    obj["status"].update(restarts=1, attempt=2)
    obj["status"]["stages"][0]["attempt"] = 2
    message = json.dumps({"reason": "WorkerFailed", "message": "loss is NaN at attempt 2"})
    plan = failing(obj, exited("sft", 2, 70, message), attempt=2)
    failed = condition(plan.status, "Failed")
    assert plan.status["state"] == "Failed" and failed["reason"] == "BackoffLimitExceeded"
    assert "loss is NaN at attempt 2" in failed["message"] and plan.status["restarts"] == 2
    assert plan.delete_jobs == ["tiny-sft-sft-2"] and plan.create == []


def test_attempts_without_a_new_checkpoint_fail_with_no_progress():
    ckpt = f"{ROOT}/sft/checkpoints/step-000010"
    obj = running_obj(restartPolicy={"noProgressAttempts": 2})
    obj["status"].update(attemptsWithoutProgress=1, lastCheckpoint=ckpt, checkpointAtAttemptStart=ckpt)
    plan = failing(obj, exited("sft", 1, 70))
    assert plan.status["state"] == "Failed" and condition(plan.status, "Failed")["reason"] == "NoProgress"
    # a new checkpoint in the progress report resets the count
    newer = {"stage": "sft", "step": 20, "lastCheckpoint": f"{ROOT}/sft/checkpoints/step-000020"}
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=[exited("sft", 1, 70)], progress=newer, children=ALL, shared=SHARED))
    assert plan.status["state"] == "Restarting" and plan.status["attemptsWithoutProgress"] == 0


def test_rlaif_runs_feedback_reward_policy_then_succeeds():
    name = "tiny-rlaif"
    root = f"s3://dhad-demo/dhad/ml/{name}-{UID}"
    obj, plan = started("rlaif")
    kids = children("tiny-rlaif", "RLAIFJob")
    assert plan.create[-1]["metadata"]["name"] == "tiny-rlaif-fb-1"
    obj["status"].update(restarts=1, attempt=2, endedAttempt=1, attemptsWithoutProgress=1)
    obj["status"]["stages"][0]["attempt"] = 2
    done: list[dict] = []
    for stage, following in (("feedback", "reward"), ("reward", "policy")):
        attempt = obj["status"]["attempt"]
        plan = decide_at(obj, Observed(jobs=[*done, k8s_job(stage, attempt, "Complete", name=name)], children=kids, shared=SHARED))
        s = plan.status
        assert [c["metadata"]["name"] for c in plan.create] == [f"{name}-{STAGE_CODES[following]}-1"]
        assert (s["stage"], s["attempt"], s["endedAttempt"], s["attemptsWithoutProgress"], s["restarts"]) == (following, 1, 0, 0, 1)
        assert s["stages"][-2] | {"startTime": None} == {"name": stage, "state": "Succeeded", "attempt": attempt, "startTime": None,
                                                         "completionTime": rfc3339(NOW), "output": f"{root}/{stage}"}
        assert s["stages"][-1] == {"name": following, "state": "Pending", "attempt": 1, "startTime": rfc3339(NOW)}
        done.append(k8s_job(stage, attempt, "Complete", name=name))
        obj = then(obj, plan)
    plan = decide_at(obj, Observed(jobs=[*done, k8s_job("policy", 1, "Complete", name=name)], children=kids, shared=SHARED))
    s = plan.status
    assert s["state"] == "Succeeded" and s["outputModel"] == f"{root}/policy/model" and plan.create == []
    assert [e["name"] for e in s["stages"]] == ["feedback", "reward", "policy"] and s["completionTime"] == rfc3339(NOW)
    assert all(e["state"] == "Succeeded" for e in s["stages"])
    finished = decide_at(then(obj, plan), Observed(jobs=done, children=kids, shared=SHARED))
    assert finished.create == [] and finished.status["state"] == "Succeeded"


def test_sft_with_respond_runs_respond_first():
    respond = {"prompts": [{"uri": "s3://dhad-demo/p.jsonl", "schema": "prompt-completion"}],
               "teacher": {"endpoint": {"baseUrl": "https://llm.example.com/v1", "model": "t"}}}
    obj, plan = started(respond=respond)
    assert plan.create[-1]["metadata"]["name"] == "tiny-sft-rsp-1"
    plan = decide_at(obj, Observed(jobs=[k8s_job("respond", 1, "Complete")], children=ALL, shared=SHARED))
    assert plan.create[-1]["metadata"]["name"] == "tiny-sft-sft-1" and plan.status["stage"] == "sft"


def test_suspend_stops_the_attempt_and_unsuspend_starts_a_new_one():
    obj = running_obj()
    obj["spec"]["suspend"] = True
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED))
    s = plan.status
    assert plan.delete_jobs == ["tiny-sft-sft-1"] and s["state"] == "Suspended" and s["endedAttempt"] == s["attempt"] == 1
    assert plan.create == [] and any(e[1] == "Suspended" for e in plan.events)
    obj = then(obj, plan)
    pods_stopping = [exited("sft", 1, 143)]
    still = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, deleting=True)], pods=pods_stopping, children=ALL, shared=SHARED))
    assert still.delete_jobs == [] and still.create == [] and still.status.get("disruptions", 0) == 0 and not still.events
    obj["spec"]["suspend"] = False
    waiting = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, deleting=True)], children=ALL, shared=SHARED))
    assert waiting.create == [] and waiting.requeue_after is None  # woken when the old Job is gone
    resumed = decide_at(obj, Observed(children=ALL, shared=SHARED))
    assert [c["metadata"]["name"] for c in resumed.create] == ["tiny-sft-sft-2"]
    assert resumed.status["state"] == "Pending" and resumed.status.get("restarts", 0) == 0
    assert condition(resumed.status, "Suspended")["status"] == "False"


def test_active_deadline_fails_the_job_and_deletes_the_attempt():
    obj = running_obj(activeDeadlineSeconds=1200)
    later = NOW + timedelta(seconds=1200)
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED), later)
    assert plan.status["state"] == "Failed" and condition(plan.status, "Failed")["reason"] == "DeadlineExceeded"
    assert plan.delete_jobs == ["tiny-sft-sft-1"]
    early = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED), later - timedelta(seconds=1))
    assert early.status["state"] == "Running"


def test_from_job_waits_for_the_referenced_job_then_uses_its_model():
    obj = job_obj(model={"fromJob": {"kind": "PretrainJob", "name": "tiny-pretrain"}})
    ref = ("PretrainJob", "tiny-pretrain")
    missing = decide_at(obj, Observed(references={ref: None}))
    s = missing.status
    assert s["state"] == "Pending" and missing.create == [] and missing.requeue_after is None  # woken by that job
    assert condition(s, "Created") | {"lastTransitionTime": None} == {
        "type": "Created", "status": "False", "reason": "WaitingForModel", "lastTransitionTime": None, "observedGeneration": 1,
        "message": "waiting for PretrainJob tiny-pretrain (model): it does not exist yet"}
    pending = decide_at(obj, Observed(references={ref: {"status": {"state": "Running"}}}))
    assert "now Running" in condition(pending.status, "Created")["message"] and pending.create == []
    failed = decide_at(obj, Observed(references={ref: {"status": {"state": "Failed"}}}))
    assert condition(failed.status, "Created")["reason"] == "ReferencedJobFailed" and failed.status["state"] == "Pending"
    model = "s3://dhad-demo/dhad/ml/tiny-pretrain-u1/pretrain/model"
    ready = decide_at(obj, Observed(references={ref: {"status": {"state": "Succeeded", "outputModel": model}}}))
    job_json = json.loads(next(c for c in ready.create if c["metadata"]["name"] == "tiny-sft-sft-spec")["data"]["job.json"])
    assert job_json["resolved"]["modelUri"] == model and ready.status["resolvedModel"] == model
    assert condition(ready.status, "Created")["status"] == "True"


def test_ttl_after_finished_deletes_the_children_but_not_the_job():
    obj = running_obj(ttlSecondsAfterFinished=600)
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, "Complete")], children=ALL, shared=SHARED))
    assert plan.status["state"] == "Succeeded" and plan.status["outputModel"] == f"{ROOT}/sft/model"
    assert plan.requeue_after == 600 and not plan.delete_children
    obj = then(obj, plan)
    observed = Observed(jobs=[k8s_job("sft", 1, "Complete")], children=ALL, shared=SHARED)
    before = decide_at(obj, observed, NOW + timedelta(seconds=100))
    assert before.requeue_after == 500 and not before.delete_children and before.delete_jobs == []
    after = decide_at(obj, observed, NOW + timedelta(seconds=600))
    assert sorted(after.delete_children) == sorted([("Job", "tiny-sft-sft-1"), *ALL]) and after.create == []
    assert ("Service", "dhad-workers") not in after.delete_children  # the namespace's, not this job's
    assert condition(after.status, "ChildrenDeleted")["reason"] == "TTLExpired"
    assert [e[1] for e in after.events] == ["TTLExpired"]
    obj = then(obj, after)
    # children still going (their deletion events wake the job): deleted again, no second event
    again = decide_at(obj, Observed(children={("ConfigMap", "tiny-sft-sft-spec")}), NOW + timedelta(seconds=601))
    assert again.delete_children == [("ConfigMap", "tiny-sft-sft-spec")] and again.events == [] and again.status == obj["status"]
    assert not decide_at(obj, Observed(), NOW + timedelta(seconds=700)).delete_children  # nothing left


def test_finished_jobs_stop_any_job_still_running():
    obj = running_obj()
    failed = then(obj, failing(obj, exited("sft", 1, 78)))
    plan = decide_at(failed, Observed(jobs=[k8s_job("sft", 1)], children=ALL, shared=SHARED))
    assert plan.delete_jobs == ["tiny-sft-sft-1"] and plan.create == [] and plan.requeue_after is None


def hung_obj(updated_at: datetime) -> dict:
    obj = running_obj()
    obj["status"]["progress"] = {"step": 3, "updatedAt": rfc3339(updated_at)}
    return obj


def test_no_progress_for_hang_timeout_restarts_the_attempt_as_hung():
    later = NOW + timedelta(seconds=2000)
    plan = failing(hung_obj(NOW + timedelta(seconds=100)), *running(), now=later)
    assert plan.status["state"] == "Restarting" and plan.restart_reason == "Hung"
    assert condition(plan.status, "Restarting")["reason"] == "Hung" and plan.delete_jobs == ["tiny-sft-sft-1"]
    assert plan.status["restarts"] == 1
    fine = failing(hung_obj(NOW + timedelta(seconds=1000)), *running(), now=later)
    assert fine.status["state"] == "Running" and fine.delete_jobs == []


def test_a_new_attempt_is_not_hung_by_the_previous_attempts_last_report():
    obj = hung_obj(NOW - timedelta(seconds=3000))  # attempt 1's last report, long ago
    obj["status"]["attemptStartTime"] = rfc3339(NOW)
    plan = failing(obj, *running(), now=NOW + timedelta(seconds=600))
    assert plan.status["state"] == "Running" and plan.restart_reason is None


def test_image_pull_back_off_is_a_condition_with_the_kubelets_message():
    obj, _ = started()
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "ghcr.io/dhad/trainer:0.1.0"'}
    stuck = pod("sft", 1, 0, "Pending", containerStatuses=[{"name": "trainer", "state": {"waiting": waiting}}])
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=[stuck, pod("sft", 1, 1, "Pending")], children=ALL, shared=SHARED))
    problem = condition(plan.status, "ImagePullBackOff")
    assert problem["status"] == "True" and "Back-off pulling image" in problem["message"]
    assert plan.status["state"] == "Pending" and plan.delete_jobs == []
    fixed = decide_at(then(obj, plan), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED))
    assert condition(fixed.status, "ImagePullBackOff")["status"] == "False" and fixed.status["state"] == "Running"


def unschedulable(since: datetime) -> dict:
    cond = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": rfc3339(since),
            "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}
    return pod("sft", 1, 0, "Pending", conditions=[cond])


def test_unschedulable_past_the_timeout_is_a_condition_not_a_failure():
    obj, _ = started()
    observed = Observed(jobs=[k8s_job("sft", 1)], pods=[unschedulable(NOW - timedelta(seconds=700))], children=ALL, shared=SHARED)
    plan = decide_at(obj, observed)
    cond = condition(plan.status, "Unschedulable")
    assert cond["status"] == "True" and "Insufficient nvidia.com/gpu" in cond["message"]
    assert plan.status["state"] == "Pending" and plan.delete_jobs == []
    recent = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=[unschedulable(NOW - timedelta(seconds=100))]))
    assert condition(recent.status, "Unschedulable") is None
    scheduled = decide_at(then(obj, plan), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED))
    assert condition(scheduled.status, "Unschedulable")["status"] == "False"


def test_kueue_queued_job_is_queued_until_admitted():
    obj, plan = started(queueName="team-a")
    assert plan.create[-1]["spec"]["suspend"] is True and plan.status["state"] == "Queued"
    queued = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, suspend=True)], children=ALL, shared=SHARED))
    assert queued.status["state"] == "Queued" and "team-a" in condition(queued.status, "Queued")["message"]
    assert queued.status == obj["status"]  # nothing new to write after the creation
    admitted = decide_at(then(obj, queued), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED))
    assert admitted.status["state"] == "Running" and condition(admitted.status, "Queued")["status"] == "False"


def test_an_invalid_spec_fails_with_the_field():
    obj = job_obj()
    obj["spec"]["training"]["learningRate"] = -1
    plan = decide_at(obj)
    failed = condition(plan.status, "Failed")
    assert plan.status["state"] == "Failed" and failed["reason"] == "InvalidSpec" and "training.learningRate" in failed["message"]
    assert plan.create == []


def test_a_started_job_ignores_its_references_afterwards():
    obj = job_obj(model={"fromJob": {"kind": "PretrainJob", "name": "tiny-pretrain"}})
    ref, model = ("PretrainJob", "tiny-pretrain"), "s3://dhad-demo/dhad/ml/tiny-pretrain-u1/pretrain/model"
    obj = then(obj, decide_at(obj, Observed(references={ref: {"status": {"state": "Succeeded", "outputModel": model}}})))
    for gone in (None, {"status": {"state": "Running"}}, {"status": {"state": "Succeeded", "outputModel": "s3://dhad-demo/other"}}):
        plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), references={ref: gone}, children=ALL, shared=SHARED))
        assert plan.status["state"] == "Running" and plan.status["resolvedModel"] == model
        done = decide_at(obj, Observed(jobs=[k8s_job("sft", 1, "Complete")], references={ref: gone}, children=ALL, shared=SHARED))
        assert done.status["state"] == "Succeeded"


def test_backoff_is_capped_and_failed_nodes_are_avoided():
    obj = running_obj(restartPolicy={"backoffSeconds": 100, "maxBackoffSeconds": 150, "avoidFailedNodes": True})
    obj["status"]["restarts"] = 2
    plan = failing(obj, exited("sft", 1, 70, index=1))
    assert plan.status["nextAttemptAfter"] == rfc3339(NOW + timedelta(seconds=150)) and plan.status["failedNodes"] == ["node-1"]
    later = NOW + timedelta(seconds=150)
    job = decide_at(then(obj, plan), Observed(children=ALL, shared=SHARED), later).create[0]
    terms = job["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == ["node-1"]


def test_a_name_held_by_another_owner_is_a_failed_condition_never_adoption():
    orphan = decide_at(job_obj(), Observed(foreign={("Job", "tiny-sft-sft-1"): Foreign("no owner")}))
    failed = condition(orphan.status, "Failed")
    assert orphan.status["state"] == "Failed" and failed["reason"] == "NameCollision"
    assert "Job tiny-sft-sft-1 already exists and belongs to no owner" in failed["message"]
    assert orphan.create == [] and orphan.status.get("attempt", 0) == 0 and "outputModel" not in orphan.status
    lag = decide_at(job_obj(), Observed(foreign={("ConfigMap", "tiny-sft-sft-spec"): Foreign("SFTJob tiny-sft (uid old)", owner_gone=True)}))
    assert lag.status["state"] == "Pending" and lag.create == [] and lag.status.get("attempt", 0) == 0
    assert condition(lag.status, "Created")["reason"] == "WaitingForGarbageCollection"
    assert "SFTJob tiny-sft (uid old)" in condition(lag.status, "Created")["message"]


def test_pods_count_only_when_their_job_is_ours():
    spoof = exited("sft", 1, 78, json.dumps({"reason": "BadConfig", "message": "spoofed"}))
    spoof["metadata"]["ownerReferences"] = owned_by("uid-someone-elses-job")
    plan = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1)], pods=[*running(), spoof], children=ALL, shared=SHARED))
    assert plan.status["state"] == "Running" and plan.delete_jobs == []


def test_a_missing_child_is_made_again_while_the_attempt_runs():
    lost = ("ServiceAccount", "tiny-sft-sft-trainer")
    plan = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL - {lost}, shared=SHARED))
    assert [(c["kind"], c["metadata"]["name"]) for c in plan.create] == [lost]
    assert plan.status["attempt"] == 1 and plan.status["state"] == "Running"


def test_the_namespace_service_is_made_again_by_a_running_job_that_finds_it_missing():
    plan = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL))
    assert [(c["kind"], c["metadata"]["name"]) for c in plan.create] == [("Service", "dhad-workers")]
    assert "ownerReferences" not in plan.create[0]["metadata"]  # deleting this job must leave it to the others
    assert plan.status["attempt"] == 1 and plan.status["state"] == "Running"


def test_a_namespace_service_not_ours_fails_the_job_naming_it_and_is_never_adopted():
    theirs = {("Service", "dhad-workers"): Foreign("no owner")}
    plan = decide_at(job_obj(), Observed(foreign=theirs))
    failed = condition(plan.status, "Failed")
    assert plan.status["state"] == "Failed" and failed["reason"] == "NameCollision"
    assert "Service dhad-workers" in failed["message"] and "app.kubernetes.io/managed-by=dhad-operator" in failed["message"]
    assert plan.create == [] and plan.status.get("attempt", 0) == 0  # no Job whose pods would resolve through it
    later = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, foreign=theirs))
    assert later.status["state"] == "Failed" and condition(later.status, "Failed")["reason"] == "NameCollision"
    going = decide_at(job_obj(), Observed(foreign={("Service", "dhad-workers"): Foreign("no owner", owner_gone=True)}))
    assert going.status["state"] == "Pending" and condition(going.status, "Created")["reason"] == "WaitingForGarbageCollection"
    assert going.create == []


def test_a_child_the_apiserver_rejects_fails_the_job_with_its_message():
    message = 'Job.batch "tiny-sft-sft-1" is invalid: spec.template.spec.volumes[2].hostPath.path: Required value'
    plan = decide_at(job_obj(), Observed(rejected={("Job", "tiny-sft-sft-1"): Rejection(422, message)}))
    failed = condition(plan.status, "Failed")
    assert plan.status["state"] == "Failed" and failed["reason"] == "ChildRejected" and message in failed["message"]
    assert plan.create == [] and plan.status.get("attempt", 0) == 0 and ("Warning", "ChildRejected") == plan.events[-1][:2]
    quota = 'configmaps "tiny-sft-sft-spec" is forbidden: exceeded quota: cms, requested: configmaps=1, used: configmaps=4, limited: configmaps=4'
    waiting = decide_at(job_obj(), Observed(rejected={("ConfigMap", "tiny-sft-sft-spec"): Rejection(403, quota)}))
    created = condition(waiting.status, "Created")
    assert waiting.status["state"] == "Pending" and (created["status"], created["reason"]) == ("False", "ChildNotCreated")
    assert "exceeded quota" in created["message"] and waiting.create == [] and waiting.status.get("attempt", 0) == 0
    again = decide_at(then(job_obj(), waiting), Observed(rejected={("ConfigMap", "tiny-sft-sft-spec"): Rejection(403, quota)}))
    assert again.events == []  # the same refusal is not announced twice


PSA = ('Error creating: pods "tiny-sft-sft-1-0-x" is forbidden: violates PodSecurity "restricted:latest": unrestricted '
       'capabilities (container "trainer" must not include "IPC_LOCK" in securityContext.capabilities.add)')


def test_pods_that_admission_refuses_fail_the_job_or_wait_for_quota():
    obj, _ = started()
    refused = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], children=ALL, shared=SHARED, pod_errors={job_uid("sft", 1): PSA}))
    failed = condition(refused.status, "Failed")
    assert refused.status["state"] == "Failed" and failed["reason"] == "PodsRejected" and "IPC_LOCK" in failed["message"]
    assert refused.delete_jobs == ["tiny-sft-sft-1"]
    quota = 'Error creating: pods "tiny-sft-sft-1-1-y" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=8'
    waiting = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running()[:1], children=ALL, shared=SHARED, pod_errors={job_uid("sft", 1): quota}))
    created = condition(waiting.status, "Created")
    assert waiting.status["state"] == "Pending" and created["reason"] == "PodsNotCreated" and "exceeded quota" in created["message"]
    assert waiting.delete_jobs == [] and any(e[1] == "PodsNotCreated" for e in waiting.events)
    # the quota freed: all pods exist, the old event does not matter any more
    later = decide_at(then(obj, waiting), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED, pod_errors={job_uid("sft", 1): quota}))
    assert later.status["state"] == "Running" and condition(later.status, "Created")["status"] == "True"


def test_values_from_the_trainer_are_checked_before_they_reach_status():
    report = {"stage": "sft", "step": 5, "totalSteps": 20, "loss": float("nan"), "epoch": "one",
              "scores": {"acc": "high", "f1": 0.5, "mmlu": True}, "lastCheckpoint": "s3://dhad-demo/" + "a" * 5000,
              "updatedAt": rfc3339(NOW)}
    progress = progress_of({"data": {"progress": json.dumps(report)}})
    obj = running_obj()
    plan = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress=progress, children=ALL, shared=SHARED))
    s = plan.status
    assert s["scores"] == {"f1": 0.5} and len(s["lastCheckpoint"]) == 1024 and s["progress"]["step"] == 5
    assert "loss" not in s["progress"] and "epoch" not in s["progress"]
    invalid = condition(s, "InvalidProgressReport")
    assert invalid["status"] == "True" and "scores.acc" in invalid["message"] and "loss" in invalid["message"]
    assert fit_status(s) == (s, [])  # what is written is exactly what the CRD holds
    obj["spec"]["suspend"] = True  # and the job still obeys its spec
    suspended = decide_at(then(obj, plan), Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress=progress, children=ALL, shared=SHARED))
    assert suspended.status["state"] == "Suspended" and suspended.delete_jobs == ["tiny-sft-sft-1"]
    fixed = decide_at(then(obj, plan) | {"spec": job_obj()["spec"]},
                      Observed(jobs=[k8s_job("sft", 1)], pods=running(), progress=progress_of({"data": {"progress": json.dumps({"stage": "sft", "step": 6})}}), children=ALL, shared=SHARED))
    assert condition(fixed.status, "InvalidProgressReport")["status"] == "False"


def test_fit_status_prunes_defaults_cuts_and_drops():
    status, problems = fit_status({"state": "Running", "unknown": 1, "attempt": 2.0, "restarts": -1, "report": "x" * 2000,
                                   "failedNodes": [f"n{i}" for i in range(40)], "conditions": [{"type": "Running"}]})
    assert "unknown" not in status and status["attempt"] == 2 and status["restarts"] == 0  # dropped, then defaulted
    assert len(status["report"]) == 1024 and len(status["failedNodes"]) == 32
    assert status["conditions"] == []  # a condition without status cannot be written
    assert any("restarts" in p for p in problems) and any("failedNodes" in p for p in problems)


def test_timers_are_the_next_due_moment():
    deadline = decide_at(running_obj(activeDeadlineSeconds=1200, restartPolicy={"hangTimeoutSeconds": 0}),
                         Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL, shared=SHARED), NOW + timedelta(seconds=200))
    assert deadline.requeue_after == 1000
    obj, _ = started(restartPolicy={"unschedulableTimeoutSeconds": 600})
    stuck = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=[unschedulable(NOW - timedelta(seconds=100))], children=ALL, shared=SHARED))
    assert stuck.requeue_after == 500
    failed = failing(running_obj(restartPolicy={"backoffSeconds": 40}), exited("sft", 1, 70))
    assert failed.requeue_after == 40


def test_independent_pods_are_retried_by_the_job_and_end_the_attempt_only_with_it(monkeypatch):
    from dhad_api.jobs import StagePods
    from dhad_operator import reconcile, render

    def shape(kind, spec, stage):
        return StagePods(3, 1, 0, False)

    monkeypatch.setattr(render, "stage_pods", shape)
    monkeypatch.setattr(reconcile, "stage_pods", shape)
    obj, plan = started(restartPolicy={"maxRestarts": 2})
    job = plan.create[-1]["spec"]
    assert (job["completions"], job["parallelism"], job["backoffLimitPerIndex"], job["maxFailedIndexes"]) == (3, 3, 2, 0)
    assert "backoffLimit" not in job
    assert job["podFailurePolicy"]["rules"][0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [65, 78]}}
    assert job["podFailurePolicy"]["rules"][1]["action"] == "Ignore"
    env = {e["name"]: e.get("value") for e in job["template"]["spec"]["containers"][0]["env"]}
    assert (env["NNODES"], env["NPROC_PER_NODE"]) == ("3", "1")
    one_failed = [exited("sft", 1, 70, index=0), pod("sft", 1, 1), pod("sft", 1, 2)]
    going = decide_at(obj, Observed(jobs=[k8s_job("sft", 1)], pods=one_failed, children=ALL, shared=SHARED))
    assert going.status["state"] == "Running" and going.delete_jobs == [] and going.status.get("restarts", 0) == 0
    over = decide_at(then(obj, going), Observed(jobs=[k8s_job("sft", 1, "Failed")], pods=one_failed, children=ALL, shared=SHARED))
    assert over.status["state"] == "Restarting" and over.status["restarts"] == 1 and over.restart_reason == "WorkerFailed"
    bad = [exited("sft", 1, 78, json.dumps({"reason": "BadConfig", "message": "spec.data[0]: missing"})), pod("sft", 1, 1)]
    done = decide_at(then(obj, going), Observed(jobs=[k8s_job("sft", 1, "Failed")], pods=bad, children=ALL, shared=SHARED))
    assert done.status["state"] == "Failed" and condition(done.status, "Failed")["reason"] == "BadConfig"


def prepare_obj(**status) -> dict:
    """A PretrainJob in its prepare sub-stage (3 workers), attempt 1 created."""
    obj = job_obj("pretrain", data={**yaml.safe_load((REPO / "examples" / "tiny" / "pretrain.yaml").read_text())["spec"]["data"],
                                    "workers": 3})
    obj["metadata"]["name"] = "tiny-sft"
    plan = decide_at(obj)
    assert [c["metadata"]["name"] for c in plan.create if c["kind"] == "Job"] == ["tiny-sft-dp-1"]
    return then(obj, plan)


def test_a_failed_prepare_worker_is_left_to_the_job_to_retry_alone():
    obj = prepare_obj()
    pods = [pod("prepare", 1, 0), exited("prepare", 1, 70, "worker 1: boom", index=1), pod("prepare", 1, 2)]
    plan = decide_at(obj, Observed(jobs=[k8s_job("prepare", 1)], pods=pods, children=children(kind="PretrainJob"), shared=SHARED))
    assert not plan.delete_jobs and not plan.create and plan.status.get("restarts", 0) == 0
    assert plan.status["state"] == "Running" and plan.status["attempt"] == 1


def test_a_prepare_job_that_failed_ends_the_attempt_with_its_pods_reason():
    obj = prepare_obj()
    retried = decide_at(obj, Observed(jobs=[k8s_job("prepare", 1, "Failed")],
                                      pods=[exited("prepare", 1, 70, "out of retries", index=1)], children=children(kind="PretrainJob"), shared=SHARED))
    assert retried.delete_jobs == ["tiny-sft-dp-1"] and retried.status["restarts"] == 1
    assert retried.status["state"] == "Restarting"
    bad = decide_at(obj, Observed(jobs=[k8s_job("prepare", 1, "Failed")],
                                  pods=[exited("prepare", 1, 65, json.dumps({"reason": "DataError", "message": "s3://x: empty dataset"}),
                                                index=2)], children=children(kind="PretrainJob"), shared=SHARED))
    assert bad.status["state"] == "Failed" and condition(bad.status, "Failed")["reason"] == "DataError"
    assert "empty dataset" in condition(bad.status, "Failed")["message"] and bad.status.get("restarts", 0) == 0


def test_a_complete_prepare_job_starts_the_pretrain_gang():
    obj = prepare_obj()
    plan = decide_at(obj, Observed(jobs=[k8s_job("prepare", 1, "Complete")], children=children(kind="PretrainJob"), shared=SHARED))
    assert plan.status["stage"] == "pretrain"
    assert [c["metadata"]["name"] for c in plan.create] == ["tiny-sft-pt-1"]
    assert plan.create[0]["spec"]["backoffLimit"] == 0 and plan.create[0]["spec"]["completions"] == 2


SMALL, HUGE = {"pool": "small", "nvidia.com/gpu.memory": "16384"}, {"pool": "huge", "nvidia.com/gpu.memory": str(10 * 1024 * 1024)}
LLAMA_7B = {"uri": "hf://meta-llama/Llama-2-7b-hf"}  # full fine-tuning, ddp on one GPU: about 113 GiB per GPU


@pytest.mark.parametrize(("changes", "nodes", "specs", "planned", "reason", "failed"), [
    ({}, [SMALL], {}, "Unknown", "PlanNotChecked", False),  # a CPU job: nothing to plan
    ({"model": {"uri": BASE}, "resources": {"nodes": 1, "gpusPerNode": 1}}, [SMALL], {}, "Unknown", "PlanNotChecked", False),
    ({"model": LLAMA_7B, "resources": {"nodes": 1, "gpusPerNode": 1}}, [], {}, "Unknown", "PlanNotChecked", False),
    ({"model": LLAMA_7B, "resources": {"nodes": 1, "gpusPerNode": 1}}, [SMALL, HUGE], {}, "False", "PlanExceedsGPUMemory", True),
    ({"model": LLAMA_7B, "resources": {"nodes": 1, "gpusPerNode": 1}, "podTemplate": {"nodeSelector": {"pool": "huge"}}},
     [SMALL, HUGE], {}, "True", "PlanFits", False),
    ({"model": LLAMA_7B, "resources": {"nodes": 1, "gpusPerNode": 1}, "plan": {"enforce": False}}, [SMALL], {}, "False", "PlanExceedsGPUMemory", False),
    ({"model": LLAMA_7B, "resources": {"nodes": 1, "gpusPerNode": 1}, "plan": {"gpuMemory": "10Ti"}}, [SMALL], {}, "True", "PlanFits", False),
    # through model.fromJob: the referenced job's spec, from the cache, names the architecture
    ({"model": {"fromJob": {"kind": "PretrainJob", "name": "base"}}, "resources": {"nodes": 1, "gpusPerNode": 1}}, [SMALL],
     {("PretrainJob", "base"): job_obj("pretrain", model=LLAMA_7B)["spec"]}, "False", "PlanExceedsGPUMemory", True),
    ({"model": {"fromJob": {"kind": "PretrainJob", "name": "base"}}, "resources": {"nodes": 1, "gpusPerNode": 1}}, [SMALL],
     {("PretrainJob", "base"): {"model": "not a spec"}}, "Unknown", "PlanNotChecked", False),
], ids=["cpu", "unknown-architecture", "unknown-gpu", "smallest-node-too-small", "node-selector-picks-a-big-gpu",
        "not-enforced", "gpu-memory-set", "from-job-too-big", "from-job-invalid"])
def test_the_planned_condition_refuses_a_job_that_cannot_fit_before_any_child_exists(changes, nodes, specs, planned, reason, failed):
    obj = job_obj("sft", **changes)
    plan = decide_at(obj, Observed(nodes=nodes, job_specs=specs))
    assert condition(plan.status, "Planned")["status"] == planned, condition(plan.status, "Planned")
    assert condition(plan.status, "Planned")["reason"] == reason
    if failed:
        assert plan.status["state"] == "Failed" and condition(plan.status, "Failed")["reason"] == "PlanExceedsGPUMemory"
        assert plan.create == [] and ("Warning", "PlanExceedsGPUMemory", condition(plan.status, "Planned")["message"]) in plan.events
        assert "more than the 16.0 GiB" in condition(plan.status, "Planned")["message"]
    else:
        assert plan.status["state"] != "Failed"
        waits_for_reference = "fromJob" in changes.get("model", {})  # the referenced job is not in observed.references
        assert any(c["kind"] == "Job" for c in plan.create) != waits_for_reference


def test_the_plan_is_checked_until_the_job_starts_and_not_after():
    obj, plan = started("sft", model=LLAMA_7B, resources={"nodes": 1, "gpusPerNode": 1})
    assert plan.status.get("startTime") and condition(plan.status, "Planned")["status"] == "Unknown"
    later = decide_at(obj, Observed(nodes=[SMALL], children=ALL, shared=SHARED, jobs=[k8s_job("sft", 1)]))
    assert later.status["state"] != "Failed"  # a started job is never refused by a plan (nodes came later)
    assert condition(later.status, "Planned")["status"] == "Unknown"


def test_a_child_refused_while_the_attempt_runs_fails_the_job_and_stops_its_job():
    """The Role is made after the Job (Kube.execute, off the Job's path): a name held by another owner
    is found once the Job runs, and a Failed job keeps no Job running."""
    role = ("Role", "tiny-sft-sft-trainer")
    plan = decide_at(running_obj(), Observed(jobs=[k8s_job("sft", 1)], pods=running(), children=ALL - {role}, shared=SHARED,
                                             foreign={role: Foreign("no owner")}))
    assert plan.status["state"] == "Failed" and condition(plan.status, "Failed")["reason"] == "NameCollision"
    assert plan.delete_jobs == ["tiny-sft-sft-1"] and plan.create == []
