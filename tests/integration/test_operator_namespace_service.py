"""One headless Service per namespace (issue 17, item 4) on the real control plane: two jobs share it
and their pods get distinct hostnames in it (the EndpointSlice controller publishes each one, which
is what cluster DNS serves); deleting one job leaves it to the other; deleting it by hand gets it made
again; a Service of that name the operator did not make fails the job and is never adopted."""

from __future__ import annotations

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.integration.jobs import PLURAL, apply, exit_pod, get, jobs, pods, running_pods, tiny, wait_state

pytestmark = pytest.mark.cluster
SERVICE = "dhad-workers"
CPU = {"nodes": 2, "gpusPerNode": 0}  # CPU pods: both jobs' gangs fit at once
# kwok nodes only: CPU pods could land on a node agent of another test, which really runs (and fails) them
ON_KWOK = {"nodeSelector": {"type": "kwok"}}


def _service(kube, namespace: str):
    try:
        return client.CoreV1Api(kube).read_namespaced_service(SERVICE, namespace)
    except client.ApiException as error:
        if error.status == 404:
            return None
        raise


def _published_hostnames(kube, namespace: str) -> set[str]:
    """The hostnames the EndpointSlice controller published for the Service (cluster DNS serves these)."""
    slices = client.DiscoveryV1Api(kube).list_namespaced_endpoint_slice(namespace, label_selector=f"kubernetes.io/service-name={SERVICE}")
    return {e.hostname for s in slices.items for e in s.endpoints or [] if e.hostname}


def test_two_jobs_share_one_service_with_distinct_hostnames_and_deleting_one_leaves_it(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", resources=CPU, podTemplate=ON_KWOK), "first")
    apply(kube, namespace, tiny("sft", resources=CPU, podTemplate=ON_KWOK), "second")
    first, second = running_pods(kube, namespace, "first", 1, 2), running_pods(kube, namespace, "second", 1, 2)
    services = client.CoreV1Api(kube).list_namespaced_service(namespace).items
    assert [s.metadata.name for s in services] == [SERVICE]
    service = services[0]
    assert service.metadata.labels == {"app.kubernetes.io/managed-by": "dhad-operator"} and not service.metadata.owner_references
    assert service.spec.cluster_ip == "None" and service.spec.publish_not_ready_addresses
    assert service.spec.selector == {"dhad.dev/worker": "true"}
    hostnames = {p.spec.hostname for p in first + second}
    assert hostnames == {"first-sft-1-0", "first-sft-1-1", "second-sft-1-0", "second-sft-1-1"}
    assert {p.spec.subdomain for p in first + second} == {SERVICE}
    masters = {p.metadata.labels["dhad.dev/job"]: {e.name: e.value for e in p.spec.containers[0].env}["MASTER_ADDR"] for p in first + second}
    assert masters == {"first": f"first-sft-1-0.{SERVICE}", "second": f"second-sft-1-0.{SERVICE}"}
    wait_for(lambda: _published_hostnames(kube, namespace) == hostnames, 30, f"the four hostnames published under {SERVICE}")

    client.CustomObjectsApi(kube).delete_namespaced_custom_object("dhad.dev", "v1alpha1", namespace, PLURAL["SFTJob"], "first")
    wait_for(lambda: not pods(kube, namespace, "first") and not jobs(kube, namespace, "first"), 60, "the first job's pods and Job gone")
    kept = _service(kube, namespace)
    assert kept is not None and kept.metadata.uid == service.metadata.uid, "deleting one job took the namespace's Service"
    wait_for(lambda: _published_hostnames(kube, namespace) == {"second-sft-1-0", "second-sft-1-1"}, 30, "only the second job's hostnames")
    for pod in second:
        exit_pod(kube, namespace, pod, 0)
    done = wait_state(kube, namespace, "SFTJob", "second", "Succeeded", 60)
    assert done["status"]["attempt"] == 1 and _service(kube, namespace).metadata.uid == service.metadata.uid


def test_a_deleted_namespace_service_is_made_again(kube, namespace, dhad_operator):
    apply(kube, namespace, tiny("sft", resources=CPU, podTemplate=ON_KWOK))
    running_pods(kube, namespace, "tiny-sft", 1, 2)
    before = _service(kube, namespace).metadata.uid
    client.CoreV1Api(kube).delete_namespaced_service(SERVICE, namespace)
    again = wait_for(lambda: (lambda s: s if s is not None and s.metadata.uid != before else None)(_service(kube, namespace)),
                     30, "the Service made again")
    assert again.metadata.labels == {"app.kubernetes.io/managed-by": "dhad-operator"} and not again.metadata.owner_references
    assert get(kube, namespace, "SFTJob", "tiny-sft")["status"]["state"] == "Running"


def test_a_service_of_that_name_not_made_by_the_operator_fails_the_job_naming_it(kube, namespace, dhad_operator):
    core = client.CoreV1Api(kube)
    core.create_namespaced_service(namespace, {"metadata": {"name": SERVICE, "labels": {"app": "theirs"}},
                                               "spec": {"selector": {"app": "theirs"}, "ports": [{"port": 80}]}})
    apply(kube, namespace, tiny("sft", resources=CPU, podTemplate=ON_KWOK))
    failed = wait_state(kube, namespace, "SFTJob", "tiny-sft", "Failed", 30)
    condition = next(c for c in failed["status"]["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "NameCollision" and SERVICE in condition["message"]
    assert "app.kubernetes.io/managed-by=dhad-operator" in condition["message"]
    assert not jobs(kube, namespace, "tiny-sft")
    theirs = core.read_namespaced_service(SERVICE, namespace)
    assert theirs.metadata.labels == {"app": "theirs"} and theirs.spec.selector == {"app": "theirs"}  # never adopted
