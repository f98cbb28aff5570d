"""Pipelines in the operator's caches and Router: which watch events (and which of our own writes'
answers) wake a pipeline or its stage jobs, and what Controller.observe_pipeline reads from the caches
(stage jobs by owner UID, the namespace's step cache). Objects go through observe.slim and the Stores
exactly as the informers and Kube._remember put them; plans come from the real pipeline.decide."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path

import yaml

from dhad_operator import observe
from dhad_operator.controller import Controller
from dhad_operator.handlers import Router
from dhad_operator.k8s import JOB_KINDS, PIPELINE, STEP_CACHE, Kube
from dhad_operator.pipeline import decide
from dhad_operator.render import Defaults

REPO = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
DEFAULTS = Defaults(trainer_image="ghcr.io/dhad/trainer:0.1.0")
KEY = (PIPELINE, "ml", "tiny-recipe")
# The status of a pretrain stage job that finished with a model (what the next stage reads)
PRETRAIN_DONE = {"state": "Succeeded", "startTime": "2026-01-01T12:00:05Z", "completionTime": "2026-01-01T12:10:00Z",
                 "outputModel": "s3://dhad-demo/dhad/ml/x/pretrain/model"}


class Recorder:
    """Stands in for the work queue: what the router added and dropped."""

    def __init__(self):
        self.added: list = []
        self.dropped: list = []

    def add(self, key) -> None:
        self.added.append(key)

    def drop(self, key) -> None:
        self.dropped.append(key)


class Versions:
    def __init__(self):
        self.next = 100

    def __call__(self) -> str:
        self.next += 1
        return str(self.next)


def pipeline_object(name: str = "tiny-recipe", uid: str = "uid-p1", version: str = "10") -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "pipeline.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": "ml", "uid": uid, "generation": 1, "resourceVersion": version,
                       "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"},
                       "managedFields": [{"manager": "kubectl"}]}
    return doc


def setup():
    kube = Kube(rest=None)
    recorder = Recorder()
    router = Router(kube, recorder)
    kube._on_change = router.on_change  # what Kube.start wires: our writes' answers reach the router as ours=True
    return kube, Controller(kube, DEFAULTS), router, recorder


def deliver(kube, router, kind: str, raw: dict) -> None:
    """What an informer does with a watch event: slim, store, and call the router if stored."""
    change = kube.stores[kind].put(observe.slim(kind, raw, JOB_KINDS))
    assert change is not None, "the test's event must be newer than the cache"
    router.on_change(kind, *change)


def created(manifest: dict, uid: str, version: str) -> dict:
    """A create's answer as the apiserver gives it."""
    obj = copy.deepcopy(manifest)
    obj["metadata"].update(uid=uid, resourceVersion=version, creationTimestamp="2026-01-01T12:00:00Z",
                           managedFields=[{"manager": "dhad-operator"}])
    return obj


def plan_for(kube, controller, name: str = "tiny-recipe"):
    obj = kube.cached(PIPELINE, "ml", name)
    return decide(obj, controller.observe_pipeline(obj), NOW, DEFAULTS)


def test_a_pipeline_event_wakes_it_and_its_deletion_drops_it():
    kube, _, router, recorder = setup()
    raw = pipeline_object()
    deliver(kube, router, PIPELINE, raw)
    assert recorder.added == [KEY]
    cached = kube.cached(PIPELINE, "ml", "tiny-recipe")
    assert "annotations" not in cached["metadata"] and "managedFields" not in cached["metadata"]  # slim: nothing decide skips
    recorder.added.clear()
    annotated = copy.deepcopy(raw)
    annotated["metadata"].update(resourceVersion="11", annotations={"note": "x"})
    deliver(kube, router, PIPELINE, annotated)
    assert recorder.added == []  # an annotation the reconcile does not read wakes nothing
    annotated["metadata"].update(resourceVersion="12", annotations={"dhad.dev/retry": "sft"})
    deliver(kube, router, PIPELINE, annotated)
    assert recorder.added == [KEY]
    assert kube.cached(PIPELINE, "ml", "tiny-recipe")["metadata"]["annotations"] == {"dhad.dev/retry": "sft"}
    change = kube.stores[PIPELINE].remove(observe.slim(PIPELINE, {**annotated, "metadata": {**annotated["metadata"], "resourceVersion": "13"}}))
    router.on_change(PIPELINE, *change)
    assert recorder.dropped == [KEY]


def test_the_stage_job_the_pipeline_creates_is_reconciled_and_its_status_wakes_the_pipeline():
    kube, controller, router, recorder = setup()
    version = Versions()
    deliver(kube, router, PIPELINE, pipeline_object())
    plan = plan_for(kube, controller)
    [manifest] = plan.create
    assert manifest["kind"] == "PretrainJob" and manifest["metadata"]["ownerReferences"][0]["uid"] == "uid-p1"
    recorder.added.clear()
    kube._remember("PretrainJob", created(manifest, "uid-c1", version()))  # Kube.create's answer
    child = ("PretrainJob", "ml", manifest["metadata"]["name"])
    assert recorder.added == [child]  # the watch brings no newer version: the answer must wake the new job
    cached = kube.cached(*child)
    assert cached["metadata"]["labels"]["dhad.dev/pipeline"] == "tiny-recipe"
    assert controller.observe_pipeline(kube.cached(*KEY)).children == [cached]
    recorder.added.clear()
    assert not plan_for(kube, controller).create  # it exists now: nothing to create

    running = {**cached, "status": {"state": "Running", "startTime": "2026-01-01T12:00:05Z"}}
    kube._remember("PretrainJob", {**running, "metadata": {**cached["metadata"], "resourceVersion": version()}})  # its reconcile's status write
    assert recorder.added == [KEY]
    recorder.added.clear()

    raw = created(manifest, "uid-c1", version())
    raw["metadata"]["annotations"]["note"] = "x"
    raw["status"] = running["status"]
    deliver(kube, router, "PretrainJob", raw)
    assert recorder.added == []  # nothing the pipeline or the job reads changed

    raw = copy.deepcopy(raw)
    raw["metadata"]["resourceVersion"] = version()
    raw["status"] = copy.deepcopy(PRETRAIN_DONE)
    deliver(kube, router, "PretrainJob", raw)
    assert KEY in recorder.added
    after = plan_for(kube, controller)
    assert [m["kind"] for m in after.create] == ["SFTJob", "ConfigMap"]  # the next stage, and the step cache entry
    assert after.create[0]["spec"]["model"]["uri"] == "s3://dhad-demo/dhad/ml/x/pretrain/model"


def test_a_job_that_merely_carries_the_label_is_not_a_stage_of_the_pipeline():
    kube, controller, router, recorder = setup()
    deliver(kube, router, PIPELINE, pipeline_object())
    [manifest] = plan_for(kube, controller).create
    impostor = created(manifest, "uid-x", "50")
    impostor["metadata"]["ownerReferences"] = []  # someone applied a job with the pipeline's label and name
    deliver(kube, router, "PretrainJob", impostor)
    assert KEY in recorder.added
    assert controller.observe_pipeline(kube.cached(*KEY)).children == []
    assert [m["kind"] for m in plan_for(kube, controller).create] == ["PretrainJob"]  # Kube.create then meets a 409


def test_the_step_cache_informer_feeds_a_second_pipeline_which_reuses_the_stage():
    kube, controller, router, recorder = setup()
    version = Versions()
    deliver(kube, router, PIPELINE, pipeline_object())
    [manifest] = plan_for(kube, controller).create
    done = created(manifest, "uid-c1", version())
    done["status"] = copy.deepcopy(PRETRAIN_DONE)
    kube._remember("PretrainJob", done)
    [entry] = [m for m in plan_for(kube, controller).create if m["kind"] == "ConfigMap"]
    recorder.added.clear()
    kube._remember(STEP_CACHE, created(entry, "uid-cm", version()))  # Kube.create(..., cached_as=STEP_CACHE)
    assert recorder.added == []  # the cache wakes no one
    assert kube.stores["ConfigMap"].all() == []  # not in the job children's ConfigMap cache
    # an unrelated ConfigMap with the label but another name is ignored by the pipeline (not its key's name)
    deliver(kube, router, STEP_CACHE, {"kind": "ConfigMap", "apiVersion": "v1", "data": {"entry": "{}"},
                                       "metadata": {"name": "stray", "namespace": "ml", "uid": "u", "resourceVersion": version(),
                                                    "labels": {"dhad.dev/cache": "v1"}}})

    deliver(kube, router, PIPELINE, pipeline_object("again", "uid-p2", version()))
    plan = plan_for(kube, controller, "again")
    first = plan.status["stages"][0]
    assert first["cached"] is True and first["cachedFrom"] == "tiny-recipe/pretrain" and first["job"] == manifest["metadata"]["name"]
    assert [m["kind"] for m in plan.create] == ["SFTJob"]  # pretrain is not run again
    assert plan.create[0]["spec"]["model"]["uri"] == "s3://dhad-demo/dhad/ml/x/pretrain/model"


def test_our_suspend_patch_wakes_the_stage_job_and_enqueue_all_includes_pipelines():
    kube, controller, router, recorder = setup()
    deliver(kube, router, PIPELINE, pipeline_object())
    [manifest] = plan_for(kube, controller).create
    child = created(manifest, "uid-c1", "60")
    kube._remember("PretrainJob", child)
    recorder.added.clear()
    suspended = copy.deepcopy(child)
    suspended["spec"]["suspend"] = True
    suspended["metadata"]["resourceVersion"] = "61"
    kube._remember("PretrainJob", suspended)  # Kube.patch's answer
    assert recorder.added == [("PretrainJob", "ml", manifest["metadata"]["name"])]
    controller.queue.shutdown()
    added = []
    controller.queue.add = added.append
    controller.enqueue_all()
    assert KEY in added and ("PretrainJob", "ml", manifest["metadata"]["name"]) in added
