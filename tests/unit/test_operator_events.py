"""The event filters, one case each: a watch event the filter drops (the object's cached, slim form did
not change) wakes no job, and cannot change decide()'s output; and, as a control, the events that
matter do wake the job and do change it. Objects are shaped as the apiserver returns them."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime

import pytest

from dhad_operator import observe
from dhad_operator.controller import Controller
from dhad_operator.handlers import Router, model_references
from dhad_operator.k8s import JOB_KINDS, Kube
from dhad_operator.reconcile import Observed, decide
from dhad_operator.render import Defaults, Owner, namespace_children, static_children, training_job
from tests.unit.test_reconcile import job_obj

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
UID = "7a6b0c2d-0000-4000-8000-000000000001"
JOB_UID = "11111111-0000-4000-8000-00000000000a"


class Recorder:
    """Stands in for the work queue: what the router added."""

    def __init__(self):
        self.added: list = []

    def add(self, key) -> None:
        self.added.append(key)

    def drop(self, key) -> None:
        pass


def api_object(manifest: dict, uid: str, version: int) -> dict:
    """A rendered manifest as the apiserver returns it: uid, resourceVersion, managedFields."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].update(uid=uid, resourceVersion=str(version), creationTimestamp="2025-03-01T11:59:00Z",
                           managedFields=[{"manager": "dhad-operator", "operation": "Update"}])
    return obj


def world():
    """The tiny SFT job running attempt 1 on two pods, as the apiserver would show every object."""
    cr = job_obj()
    cr["apiVersion"] = "dhad.dev/v1alpha1"
    cr["metadata"].update(resourceVersion="100", annotations={"kubectl.kubernetes.io/last-applied-configuration": "{}"})
    cr["status"] = {"state": "Running", "stage": "sft", "attempt": 1, "attemptStartTime": "2025-03-01T11:59:00Z",
                    "startTime": "2025-03-01T11:59:00Z", "resolvedModel": "s3://dhad-demo/models/tiny-base"}
    owner = Owner("SFTJob", cr["metadata"]["name"], "ml", UID)
    from dhad_api.jobs import parse_spec

    spec = parse_spec("SFTJob", cr["spec"])
    made = [*namespace_children("ml"), *static_children(owner, spec, {"modelUri": "m"})]
    objects = [api_object(c, f"uid-{c['kind']}-{i}", 200 + i) for i, c in enumerate(made)]
    job = api_object(training_job(owner, spec, "sft", 1, Defaults()), JOB_UID, 300)
    job["status"] = {"active": 2, "ready": 2, "startTime": "2025-03-01T11:59:01Z", "uncountedTerminatedPods": {}, "terminating": 0}
    objects.append(job)
    for i in range(2):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": f"tiny-sft-sft-1-{i}-abcde", "namespace": "ml", "uid": f"uid-pod-{i}", "resourceVersion": str(400 + i),
            "labels": {**job["spec"]["template"]["metadata"]["labels"], "batch.kubernetes.io/job-completion-index": str(i)},
            "annotations": {"batch.kubernetes.io/job-completion-index": str(i)},
            "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": "tiny-sft-sft-1", "uid": JOB_UID, "controller": True}]},
            "spec": {"nodeName": f"gpu-node-{i}", "containers": [{"name": "trainer", "image": "x"}]},
            "status": {"phase": "Running", "podIP": f"10.0.0.{i}", "startTime": "2025-03-01T11:59:02Z",
                       "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "trainer", "ready": True, "restartCount": 0, "state": {"running": {"startedAt": "x"}}}]}}
        objects.append(pod)
    return cr, objects


def loaded():
    """A Kube whose caches hold the world, a controller over them, and a router recording adds."""
    cr, objects = world()
    kube = Kube(rest=None)
    for obj in [cr, *objects]:
        kube.stores[obj["kind"]].put(observe.slim(obj["kind"], obj, JOB_KINDS))
    controller = Controller(kube, Defaults())
    recorder = Recorder()
    router = Router(kube, recorder)
    return kube, controller, router, recorder


def plan_now(kube, controller) -> dict:
    obj = kube.cached("SFTJob", "ml", "tiny-sft")
    plan = decide(obj, controller.observe(obj), NOW, Defaults())
    return {"status": plan.status, "create": plan.create, "delete_jobs": plan.delete_jobs, "events": plan.events,
            "delete_children": plan.delete_children, "requeue_after": plan.requeue_after}


def deliver(kube, router, raw: dict) -> None:
    """What an informer does with a watch event: slim, store, and call the router if stored."""
    change = kube.stores[raw["kind"]].put(observe.slim(raw["kind"], raw, JOB_KINDS))
    assert change is not None, "the test's event must be newer than the cache"
    router.on_change(raw["kind"], *change)


def edit(objects: list[dict], kind: str, name_start: str, change) -> dict:
    raw = copy.deepcopy(next(o for o in objects if o["kind"] == kind and o["metadata"]["name"].startswith(name_start)))
    change(raw)
    raw["metadata"]["resourceVersion"] = str(int(raw["metadata"]["resourceVersion"]) + 1000)
    return raw


def _ready_flip(pod):
    pod["status"]["conditions"][0]["status"] = "False"
    pod["status"]["containerStatuses"][0]["ready"] = False


def _job_counters(job):
    job["status"].update(active=1, ready=1, terminating=1, uncountedTerminatedPods={"failed": ["x"]})


def _suspended_condition_and_labels(job):
    job["metadata"]["labels"]["team"] = "nlp"
    job["status"]["conditions"] = [{"type": "Suspended", "status": "False", "reason": "JobResumed"}]


def _progress_same_values(cm):
    cm["data"]["progress"] = json.dumps({"unknownKey": 1})  # same checked report as "{}": nothing


IGNORED = {
    "a pod's readiness flips": ("Pod", "tiny-sft-sft-1-0", _ready_flip),
    "a pod's IP, start time and restart count": ("Pod", "tiny-sft-sft-1-1", lambda p: p["status"].update(podIP="10.9.9.9", startTime="y")
                                                 or p["status"]["containerStatuses"][0].update(restartCount=1)),
    "a pod's annotations and managedFields": ("Pod", "tiny-sft-sft-1-0", lambda p: p["metadata"].update(
        annotations={"a": "b"}, managedFields=[{"manager": "kubelet"}])),
    "the Job controller's counters": ("Job", "tiny-sft-sft-1", _job_counters),
    "a Job's Suspended=False condition and foreign labels": ("Job", "tiny-sft-sft-1", _suspended_condition_and_labels),
    "the spec ConfigMap's data": ("ConfigMap", "tiny-sft-sft-spec", lambda c: c["data"].update({"job.json": "{}"})),
    "a progress report with nothing status uses": ("ConfigMap", "tiny-sft-sft-progress", _progress_same_values),
    "a ServiceAccount's secrets": ("ServiceAccount", "tiny-sft-sft-trainer", lambda s: s.update(secrets=[{"name": "t"}])),
    "a Service's clusterIP fields": ("Service", "dhad-workers", lambda s: s["spec"].update(ipFamilies=["IPv4"])),
    "a Role's annotations": ("Role", "tiny-sft-sft-trainer", lambda r: r["metadata"].update(annotations={"x": "y"})),
}


def after_event(kind: str, name: str, change) -> tuple[list, dict, dict]:
    """(keys the router added, the plan before, the plan after) for one edited object's watch event."""
    kube, controller, router, recorder = loaded()
    before = plan_now(kube, controller)
    _, objects = world()
    deliver(kube, router, edit(objects, kind, name, change))
    return recorder.added, before, plan_now(kube, controller)


@pytest.mark.parametrize("case", sorted(IGNORED))
def test_an_ignored_child_event_wakes_nothing_and_cannot_change_the_plan(case):
    added, before, after = after_event(*IGNORED[case])
    assert added == [] and after == before


def test_an_ignored_event_on_the_job_itself_wakes_nothing_and_cannot_change_the_plan():
    kube, controller, router, recorder = loaded()
    before = plan_now(kube, controller)
    cr, _ = world()
    cr["metadata"].update(resourceVersion="900", labels={"team": "nlp"}, annotations={"note": "x"}, finalizers=["f"],
                          managedFields=[{"manager": "kubectl"}])
    deliver(kube, router, cr)
    assert recorder.added == [] and plan_now(kube, controller) == before


def test_our_own_write_coming_back_is_not_stored_again():
    kube, controller, router, recorder = loaded()
    cr, objects = world()
    # the write's answer went into the cache first (Kube._remember); the watch then sends the same version
    assert kube.stores["SFTJob"].put(observe.slim("SFTJob", cr, JOB_KINDS)) is None
    assert kube.stores["Job"].put(observe.slim("Job", objects[-3], JOB_KINDS)) is None


def test_a_repeated_failed_create_event_wakes_nothing():
    kube, controller, router, recorder = loaded()
    event = {"kind": "Event", "metadata": {"name": "e1", "namespace": "ml", "uid": "uid-e1", "resourceVersion": "500"},
             "involvedObject": {"kind": "Job", "name": "tiny-sft-sft-1", "uid": JOB_UID}, "reason": "FailedCreate",
             "message": "Error creating: pods is forbidden: exceeded quota", "count": 1}
    deliver(kube, router, event)
    assert recorder.added == [("SFTJob", "ml", "tiny-sft")]  # the first one wakes the job
    before = plan_now(kube, controller)
    recorder.added.clear()
    deliver(kube, router, {**event, "count": 7, "lastTimestamp": "later", "metadata": {**event["metadata"], "resourceVersion": "501"}})
    assert recorder.added == [] and plan_now(kube, controller) == before


CONTROLS = {
    "a pod fails": ("Pod", "tiny-sft-sft-1-0", lambda p: p["status"].update(phase="Failed", containerStatuses=[
        {"name": "trainer", "state": {"terminated": {"exitCode": 70, "reason": "Error", "message": "boom"}}}])),
    "the Job completes": ("Job", "tiny-sft-sft-1", lambda j: j["status"].update(conditions=[{"type": "Complete", "status": "True"}])),
    "a progress report": ("ConfigMap", "tiny-sft-sft-progress", lambda c: c["data"].update(progress=json.dumps({"stage": "sft", "step": 4}))),
}


@pytest.mark.parametrize("case", sorted(CONTROLS))
def test_an_event_that_matters_wakes_the_job_and_changes_the_plan(case):
    added, before, after = after_event(*CONTROLS[case])
    assert added == [("SFTJob", "ml", "tiny-sft")] and after != before


def test_a_deleted_child_wakes_the_job_which_makes_it_again():
    kube, controller, router, recorder = loaded()
    _, objects = world()
    account = next(o for o in objects if o["kind"] == "ServiceAccount")
    change = kube.stores["ServiceAccount"].remove(observe.slim("ServiceAccount", {**account, "metadata": {**account["metadata"], "resourceVersion": "999"}}))
    router.on_change("ServiceAccount", *change)
    assert recorder.added == [("SFTJob", "ml", "tiny-sft")]
    assert [c["kind"] for c in plan_now(kube, controller)["create"]] == ["ServiceAccount"]


def test_a_waiting_job_is_woken_by_the_job_it_references():
    kube, controller, router, recorder = loaded()
    waiting = job_obj(model={"fromJob": {"kind": "PretrainJob", "name": "tiny-pretrain"}})
    waiting["metadata"].update(name="waits", uid="uid-waits", resourceVersion="10")
    waiting["apiVersion"] = "dhad.dev/v1alpha1"
    deliver(kube, router, waiting)
    recorder.added.clear()
    pretrain = {"apiVersion": "dhad.dev/v1alpha1", "kind": "PretrainJob", "spec": {},
                "metadata": {"name": "tiny-pretrain", "namespace": "ml", "uid": "uid-pt", "resourceVersion": "11"},
                "status": {"state": "Succeeded", "outputModel": "s3://m"}}
    deliver(kube, router, pretrain)
    assert ("SFTJob", "ml", "waits") in recorder.added
    assert model_references(waiting["spec"]) == {("PretrainJob", "tiny-pretrain")}


def test_a_node_event_wakes_nothing_and_the_cache_keeps_its_labels_for_the_plan():
    kube, controller, router, recorder = loaded()
    before = plan_now(kube, controller)
    node = {"kind": "Node", "apiVersion": "v1", "metadata": {
        "name": "gpu-node-0", "uid": "uid-node-0", "resourceVersion": "700", "managedFields": [{"manager": "kubelet"}],
        "labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.memory": "16384", "pool": "small"}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}], "allocatable": {"nvidia.com/gpu": "8"}}}
    deliver(kube, router, node)
    assert recorder.added == [] and plan_now(kube, controller) == before  # a started job is not re-planned
    assert kube.node_labels() == [node["metadata"]["labels"]]
    assert kube.stores["Node"].all() == [{"kind": "Node", "metadata": {k: node["metadata"][k] for k in ("name", "uid", "resourceVersion", "labels")}}]


def test_the_cached_job_keeps_its_kueue_labels_which_its_batch_jobs_carry():
    cr, _ = world()
    cr["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high", "team": "nlp"}
    cached = observe.slim("SFTJob", cr, JOB_KINDS)
    assert cached["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a", "kueue.x-k8s.io/priority-class": "high"}
    cached["status"] = {}  # not started: the first reconcile creates attempt 1
    plan = decide(cached, Observed(), NOW, Defaults())
    job = next(c for c in plan.create if c["kind"] == "Job")
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a" and job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "high"


def _other_jobs(kube, router, recorder) -> None:
    """Beside tiny-sft: an unfinished job in the same namespace, a finished one, and one elsewhere."""
    for name, namespace, state in (("second", "ml", "Running"), ("done", "ml", "Succeeded"), ("elsewhere", "other", "Running")):
        cr = job_obj()
        cr["apiVersion"] = "dhad.dev/v1alpha1"
        cr["metadata"].update(name=name, namespace=namespace, uid=f"uid-{name}", resourceVersion="50")
        cr["status"] = {"state": state}
        deliver(kube, router, cr)
    recorder.added.clear()


def test_a_deleted_namespace_service_wakes_every_unfinished_job_of_its_namespace_which_makes_it_again():
    kube, controller, router, recorder = loaded()
    _other_jobs(kube, router, recorder)
    service = kube.cached("Service", "ml", "dhad-workers")
    change = kube.stores["Service"].remove({**service, "metadata": {**service["metadata"], "resourceVersion": "999"}})
    router.on_change("Service", *change)
    assert sorted(recorder.added) == [("SFTJob", "ml", "second"), ("SFTJob", "ml", "tiny-sft")]
    made = plan_now(kube, controller)["create"]
    assert [(c["kind"], c["metadata"]["name"]) for c in made] == [("Service", "dhad-workers")]


def test_a_namespace_service_someone_else_made_wakes_the_jobs_and_fails_them_naming_it():
    kube, controller, router, recorder = loaded()
    _other_jobs(kube, router, recorder)
    _, objects = world()
    theirs = edit(objects, "Service", "dhad-workers", lambda s: s["metadata"].update(labels={"app": "theirs"}))
    deliver(kube, router, theirs)
    assert sorted(recorder.added) == [("SFTJob", "ml", "second"), ("SFTJob", "ml", "tiny-sft")]
    plan = plan_now(kube, controller)
    failed = next(c for c in plan["status"]["conditions"] if c["type"] == "Failed")
    assert plan["status"]["state"] == "Failed" and failed["reason"] == "NameCollision" and "dhad-workers" in failed["message"]
    assert plan["create"] == []
