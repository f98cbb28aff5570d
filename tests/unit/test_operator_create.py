"""Kube.create when the name is taken (409): the namespace's Service is ours by its label, a job's child
by its controller UID. The apiserver is replaced by a fake that answers 409 and then the stored
object: the race it stands for (two jobs' reconciles creating the Service in the same instant, or a
cache a moment behind) cannot be produced on demand by the real one.

Kube.execute's order on a new job: what the Job's pods need, then the Job, then (in the background)
the progress ConfigMap, Role and RoleBinding; a refused background create reaches the next reconcile.
The fake records the order, which the real apiserver's audit log would show only with races between
threads (tests/integration/test_operator_ownership.py has the refused Role on the real one)."""

from __future__ import annotations

import threading

from dhad_api.jobs import parse_spec
from dhad_operator.k8s import ApiError, Kube
from dhad_operator.reconcile import Observed
from dhad_operator.render import Owner, namespace_children, static_children
from tests.unit.test_reconcile import UID, decide_at, job_obj


class TakenName:
    """Answers every POST with 409 and every GET with `existing`; records the calls."""

    def __init__(self, existing: dict):
        self.existing, self.calls = existing, []

    def request(self, method, path, query=None, body=None, verb=None, timeout=None, content_type=None):
        self.calls.append((method, path))
        if method == "POST":
            raise ApiError(409, "AlreadyExists", "already exists")
        return self.existing


def stored(manifest: dict, **meta) -> dict:
    return {**manifest, "metadata": {**manifest["metadata"], "uid": "uid-stored", "resourceVersion": "7", **meta}}


def test_a_namespace_service_another_job_just_made_counts_as_made_and_is_cached():
    (service,) = namespace_children("ml")
    kube = Kube(TakenName(stored(service)))
    assert kube.create(service, UID) is None
    assert kube.cached("Service", "ml", "dhad-workers")["metadata"]["uid"] == "uid-stored"
    assert kube.rest.calls == [("POST", "/api/v1/namespaces/ml/services"), ("GET", "/api/v1/namespaces/ml/services/dhad-workers")]


def test_a_namespace_service_without_our_label_is_a_409_rejection_not_adoption():
    (service,) = namespace_children("ml")
    theirs = stored(service, labels={"app": "theirs"})
    kube = Kube(TakenName(theirs))
    rejection = kube.create(service, UID)
    assert rejection is not None and rejection.code == 409 and rejection.owner == "no owner"
    assert kube.cached("Service", "ml", "dhad-workers") is None


def test_a_child_with_our_label_but_another_owner_is_still_not_ours():
    """The label decides only for objects no job owns: a job's children stay ours by UID alone."""
    obj = job_obj()
    owner = Owner("SFTJob", obj["metadata"]["name"], "ml", UID)
    config_map = static_children(owner, parse_spec("SFTJob", obj["spec"]), {})[0]
    other = [{**config_map["metadata"]["ownerReferences"][0], "uid": "uid-another-job"}]
    labelled = stored(config_map, ownerReferences=other, labels={**config_map["metadata"]["labels"], "app.kubernetes.io/managed-by": "dhad-operator"})
    rejection = Kube(TakenName(labelled)).create(config_map, UID)
    assert rejection is not None and rejection.code == 409 and "uid-another-job" in rejection.owner


class Recording:
    """Answers every POST with the body as stored, except `refuse`: {kind: ApiError}; records POSTed kinds."""

    def __init__(self, refuse: dict | None = None, existing: dict | None = None):
        self.refuse, self.existing, self.posted = refuse or {}, existing, []
        self.lock = threading.Lock()

    def request(self, method, path, query=None, body=None, verb=None, timeout=None, content_type=None):
        if method == "GET":
            return self.existing
        kind = body.get("kind", "Event")
        with self.lock:
            self.posted.append(kind if kind != "ConfigMap" else ("progress ConfigMap" if "progress" in body["data"] else "spec ConfigMap"))
        if kind in self.refuse:
            raise self.refuse[kind]
        if method == "PUT":
            return body
        return stored(body)


def first_reconcile(rest) -> tuple[Kube, list, threading.Event]:
    obj = {**job_obj(), "metadata": {**job_obj()["metadata"], "resourceVersion": "1"}}
    kube, woken, done = Kube(rest), [], threading.Event()
    kube.wake = lambda key, failed: (woken.append((key, failed)), done.set())
    plan = decide_at(obj, Observed())
    assert kube.execute(obj, plan, "2025-03-01T12:00:00Z") == {}
    kube._background.shutdown(wait=True)  # every background create answered
    return kube, woken, done


def test_a_new_jobs_job_is_created_after_what_its_pods_need_and_before_what_rank_0_reports_with():
    rest = Recording()
    kube, woken, _ = first_reconcile(rest)
    posted = [k for k in rest.posted if k not in ("Event", "SFTJob")]
    job = posted.index("Job")
    assert set(posted[:job]) == {"spec ConfigMap", "ServiceAccount", "Service"}, posted
    assert sorted(posted[job + 1:]) == ["Role", "RoleBinding", "progress ConfigMap"], posted
    assert kube.cached("Role", "ml", "tiny-sft-sft-trainer") is not None and woken == []


def test_a_background_create_refused_by_another_owner_wakes_the_job_and_reaches_the_next_reconcile_once():
    theirs = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
              "metadata": {"name": "tiny-sft-sft-trainer", "namespace": "ml", "uid": "uid-theirs", "resourceVersion": "3"}}
    kube, woken, done = first_reconcile(Recording({"Role": ApiError(409, "AlreadyExists", "exists")}, existing=theirs))
    assert done.wait(5) and woken == [(("SFTJob", "ml", "tiny-sft"), False)]
    refused = kube.refused_in_background(UID)
    assert list(refused) == [("Role", "tiny-sft-sft-trainer")] and refused[("Role", "tiny-sft-sft-trainer")].owner == "no owner"
    assert kube.refused_in_background(UID) == {}


def test_a_background_create_the_apiserver_could_not_answer_wakes_the_job_with_backoff_and_records_nothing():
    kube, woken, done = first_reconcile(Recording({"RoleBinding": ApiError(503, "ServiceUnavailable", "try later")}))
    assert done.wait(5) and woken == [(("SFTJob", "ml", "tiny-sft"), True)]
    assert kube.refused_in_background(UID) == {}


class LostAnswer:
    """The first POST takes effect but its answer is lost (a client timeout, code 0); later POSTs of the
    same name answer 409, and GETs return what the first one made."""

    def __init__(self):
        self.made, self.calls = None, []

    def request(self, method, path, query=None, body=None, verb=None, timeout=None, content_type=None):
        self.calls.append((method, path))
        if method == "POST":
            if self.made is None:
                self.made = stored(body)
                raise ApiError(0, "Timeout", "read timed out")
            raise ApiError(409, "AlreadyExists", "already exists")
        return self.made


def test_the_crash_hook_counts_a_create_whose_answer_was_lost(monkeypatch):
    """The chaos test's "exit after k writes" counts writes that took effect. A create that timed out on
    a loaded machine but was made, found by the retry's 409, is one of them; uncounted, the operator
    outlived its moment and made the Job one write late (seen: after-writes:3 with the Job made)."""
    exits = []
    monkeypatch.setattr("dhad_operator.k8s.os._exit", exits.append)
    obj = job_obj()
    owner = Owner("SFTJob", obj["metadata"]["name"], "ml", UID)
    config_map = static_children(owner, parse_spec("SFTJob", obj["spec"]), {})[0]
    kube = Kube(LostAnswer(), crash="after-writes:1")
    try:
        kube.create(config_map, UID)
    except ApiError as error:
        assert error.code == 0
    assert exits == []
    assert kube.create(config_map, UID) is None  # the retry: 409, ours by the controller UID
    assert exits == [137]
    assert kube.cached("ConfigMap", "ml", config_map["metadata"]["name"])["metadata"]["uid"] == "uid-stored"
