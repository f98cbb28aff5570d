"""Smoke tests that prove the test parts are real: each asserts what a mock would not show."""

from __future__ import annotations

import io
import threading

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException
from minio.error import S3Error

from tests.conftest import wait_for

pytestmark = pytest.mark.cluster

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.dhad.dev"},
    "spec": {
        "group": "smoke.dhad.dev",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [{
            "name": "v1", "served": True, "storage": True,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {
                "type": "object", "required": ["size"],
                "properties": {"size": {"type": "integer", "minimum": 1}},
            }}}},
        }],
    },
}


def test_version_is_the_built_release(kube):
    info = client.VersionApi(kube).get_code()
    assert info.git_version == "v1.37.2" and info.major == "1" and info.minor == "37"


def test_custom_resource_is_validated_created_listed_and_watched(kube, namespace):
    ext = client.ApiextensionsV1Api(kube)
    try:
        ext.create_custom_resource_definition(WIDGET_CRD)
    except ApiException as error:
        if error.status != 409:
            raise
    wait_for(lambda: any(c.type == "Established" and c.status == "True"
                         for c in ext.read_custom_resource_definition("widgets.smoke.dhad.dev").status.conditions or []),
             30, "CRD Established")
    custom = client.CustomObjectsApi(kube)
    args = ("smoke.dhad.dev", "v1", namespace, "widgets")
    # The watch starts from the empty list's resourceVersion, so it sees the create however late it connects.
    since = wait_for(lambda: custom.list_namespaced_custom_object(*args)["metadata"]["resourceVersion"], 30,
                     "an empty widget list (CRD served)")
    events: list[tuple[str, str]] = []
    watcher = watch.Watch()

    def collect():
        for event in watcher.stream(custom.list_namespaced_custom_object, *args, resource_version=since,
                                    timeout_seconds=20):
            events.append((event["type"], event["object"]["metadata"]["name"]))
            if len(events) >= 1:
                watcher.stop()

    thread = threading.Thread(target=collect)
    thread.start()
    body = {"apiVersion": "smoke.dhad.dev/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    custom.create_namespaced_custom_object(*args, body)
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object(*args, {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}})
    assert rejected.value.status == 422 and "spec.size" in rejected.value.body
    listed = custom.list_namespaced_custom_object(*args)["items"]
    assert [item["metadata"]["name"] for item in listed] == ["w1"]
    thread.join(timeout=25)
    assert events == [("ADDED", "w1")]  # the rejected w2 was never stored, so never watched


def test_job_pods_are_scheduled_on_kwok_gpu_nodes_and_complete(kube, namespace, gpu_nodes):
    batch, core = client.BatchV1Api(kube), client.CoreV1Api(kube)
    container = client.V1Container(
        name="trainer", image="dhad/trainer:test", command=["true"],
        resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "8"}),
    )
    template = client.V1PodTemplateSpec(
        metadata=client.V1ObjectMeta(annotations={"dhad.test/kwok-exit": "0"}),
        spec=client.V1PodSpec(containers=[container], restart_policy="Never",
                              tolerations=[client.V1Toleration(operator="Exists")]),
    )
    job = client.V1Job(
        metadata=client.V1ObjectMeta(name="smoke"),
        spec=client.V1JobSpec(completions=2, parallelism=2, completion_mode="Indexed", backoff_limit=0,
                              template=template),
    )
    batch.create_namespaced_job(namespace, job)
    done = wait_for(lambda: (batch.read_namespaced_job_status("smoke", namespace).status.succeeded or 0) == 2,
                    90, "Job succeeded")
    assert done
    pods = core.list_namespaced_pod(namespace, label_selector="job-name=smoke").items
    assert len(pods) == 2
    # 8 GPUs each on nodes of 8: the scheduler must spread them, one per GPU node.
    assert sorted(pod.spec.node_name for pod in pods) == sorted(gpu_nodes)
    assert {pod.metadata.annotations["batch.kubernetes.io/job-completion-index"] for pod in pods} == {"0", "1"}


def test_rbac_denies_an_unprivileged_service_account(kube, namespace, control_plane):
    core = client.CoreV1Api(kube)
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="nobody")))
    token = core.create_namespaced_service_account_token(
        "nobody", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status.token
    configuration = client.Configuration(host=control_plane.server)
    configuration.ssl_ca_cert = str(control_plane.pki.ca_cert)
    configuration.api_key = {"authorization": "Bearer " + token}
    with client.ApiClient(configuration) as as_nobody:
        who = client.AuthenticationV1Api(as_nobody).create_self_subject_review(client.V1SelfSubjectReview())
        assert who.status.user_info.username == f"system:serviceaccount:{namespace}:nobody"
        with pytest.raises(ApiException) as denied:
            client.CoreV1Api(as_nobody).list_namespaced_secret(namespace)
    assert denied.value.status == 403 and "forbidden" in denied.value.body.lower()


@pytest.mark.s3
def test_s3_round_trip_and_refused_credentials(s3_server, s3_bucket):
    from minio import Minio

    payload = "مرحبا بالعالم".encode() * 1000
    s3_server.client().put_object(s3_bucket, "smoke/hello.txt", io.BytesIO(payload), len(payload))
    assert s3_server.client().get_object(s3_bucket, "smoke/hello.txt").read() == payload
    with pytest.raises(S3Error) as wrong:
        s3_server.client(secret_key="not-the-secret").get_object(s3_bucket, "smoke/hello.txt")
    assert wrong.value.code == "SignatureDoesNotMatch"
    anonymous = Minio(s3_server.endpoint, secure=False, region=s3_server.region)
    with pytest.raises(S3Error) as denied:
        anonymous.get_object(s3_bucket, "smoke/hello.txt")
    assert denied.value.code == "AccessDenied"
