"""Progress reports: merge-patched into the job's ConfigMap on a real kube-apiserver with a ServiceAccount
token that may patch only that ConfigMap; coalesced; a final report always; sink errors never raised."""

from __future__ import annotations

import json
import time
import urllib.error

import pytest

from dhad_api.reasons import NAMESPACE_ENV, PROGRESS_CONFIGMAP_ENV, PROGRESS_KEY
from dhad_trainer.runtime.progress import (
    FileSink,
    KubeConfigMapSink,
    ProgressReporter,
    log_sink,
    sink_from_env,
)


def test_reporter_coalesces_and_always_sends_a_final_report(tmp_path):
    sink = FileSink(tmp_path / "p.jsonl")
    reporter = ProgressReporter(sink, "pretrain", interval=0.5)
    for step in range(1, 51):
        reporter.update(step=step, loss=10.0 / step, totalSteps=50)
        time.sleep(0.005)
    reporter.close(final=True, outputModel="s3://b/model")
    reports = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert 1 <= len(reports) <= 4  # 50 updates in ~0.3 s: coalesced
    last = reports[-1]
    assert last["final"] and last["step"] == 50 and last["stage"] == "pretrain" and last["updatedAt"].endswith("Z")
    assert [r["step"] for r in reports] == sorted(r["step"] for r in reports)


def test_sink_selection(tmp_path):
    assert sink_from_env({}) is log_sink
    assert isinstance(sink_from_env({"DHAD_PROGRESS_FILE": str(tmp_path / "x")}), FileSink)
    kube = sink_from_env({PROGRESS_CONFIGMAP_ENV: "j-pt-progress", NAMESPACE_ENV: "team",
                          "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert isinstance(kube, KubeConfigMapSink) and kube.url == "https://10.0.0.1:443/api/v1/namespaces/team/configmaps/j-pt-progress"


def test_a_failing_sink_never_fails_training():
    def broken(report):
        raise OSError("apiserver down")

    reporter = ProgressReporter(broken, "sft", interval=0)
    reporter.update(step=1)
    reporter.close(final=True)  # no exception


@pytest.mark.cluster
def test_configmap_patch_with_a_least_privilege_token(kube, namespace, control_plane, tmp_path):
    from kubernetes import client

    core, rbac = client.CoreV1Api(kube), client.RbacAuthorizationV1Api(kube)
    for name in ("tiny-pt-progress", "someone-else"):
        core.create_namespaced_config_map(namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data={}))
    core.create_namespaced_service_account(namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="trainer")))
    rbac.create_namespaced_role(namespace, client.V1Role(
        metadata=client.V1ObjectMeta(name="progress"),
        rules=[client.V1PolicyRule(api_groups=[""], resources=["configmaps"], verbs=["patch"],
                                   resource_names=["tiny-pt-progress"])]))
    rbac.create_namespaced_role_binding(namespace, client.V1RoleBinding(
        metadata=client.V1ObjectMeta(name="progress"),
        role_ref=client.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role", name="progress"),
        subjects=[client.RbacV1Subject(kind="ServiceAccount", name="trainer", namespace=namespace)]))
    token = core.create_namespaced_service_account_token(
        "trainer", namespace, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))).status.token
    (tmp_path / "token").write_text(token)
    env = {"DHAD_KUBE_API": control_plane.server, "DHAD_KUBE_TOKEN_FILE": str(tmp_path / "token"),
           "DHAD_KUBE_CA_FILE": str(control_plane.pki.ca_cert), PROGRESS_CONFIGMAP_ENV: "tiny-pt-progress",
           NAMESPACE_ENV: namespace}
    sink = sink_from_env(env)
    sent = []
    reporter = ProgressReporter(lambda r: (sent.append(r), sink(r)), "pretrain", interval=0.3)
    for step in range(1, 21):
        reporter.update(step=step, totalSteps=20, loss=1.0 / step, tokensPerSecond=1234.5)
        time.sleep(0.01)
    reporter.close(final=True, lastCheckpoint="s3://b/p/pretrain/checkpoints/step-000020")
    progress = json.loads(core.read_namespaced_config_map("tiny-pt-progress", namespace).data[PROGRESS_KEY])
    assert progress["step"] == 20 and progress["final"] and progress["lastCheckpoint"].endswith("step-000020")
    assert len(sent) < 20
    with pytest.raises(urllib.error.HTTPError) as denied:  # the token may patch no other ConfigMap
        KubeConfigMapSink(namespace, "someone-else", env)({"step": 1})
    assert denied.value.code == 403
