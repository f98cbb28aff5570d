"""Kube.create when the name is taken (409): the namespace's Service is ours by its label, a job's child
by its controller UID. The apiserver is replaced by a fake that answers 409 and then the stored
object: the race it stands for (two jobs' reconciles creating the Service in the same instant, or a
cache a moment behind) cannot be produced on demand by the real one."""

from __future__ import annotations

from dhad_api.jobs import parse_spec
from dhad_operator.k8s import ApiError, Kube
from dhad_operator.render import Owner, namespace_children, static_children
from tests.unit.test_reconcile import UID, job_obj


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
