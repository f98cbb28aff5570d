"""Progress reports: merge-patched into the job's ConfigMap on a real kube-apiserver with a ServiceAccount
token that may patch only that ConfigMap; coalesced; a final report always; sink errors never raised."""

from __future__ import annotations

import json
import logging
import threading
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


class RecordingSink:
    """Keeps every report; `wait(n)` blocks until n reports arrived (the reporter sends from a thread)."""

    def __init__(self, fail: bool = False) -> None:
        self.reports: list[dict] = []
        self.fail = fail
        self.arrived = threading.Condition()

    def __call__(self, report: dict) -> None:
        with self.arrived:
            self.reports.append(report)
            self.arrived.notify_all()
        if self.fail:
            raise OSError("apiserver down")

    def wait(self, n: int, timeout: float = 10) -> None:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.reports) >= n, timeout), self.reports


def test_reporter_coalesces_and_always_sends_a_final_report(tmp_path):
    sink = RecordingSink()
    reporter = ProgressReporter(sink, "pretrain", interval=60)
    reporter.update(step=1, loss=10.0, totalSteps=50)
    sink.wait(1)  # the first report goes out at once; the next not before the interval
    for step in range(2, 51):
        reporter.update(step=step, loss=10.0 / step, totalSteps=50)
    reporter.close(final=True, outputModel="s3://b/model")
    first, last = sink.reports
    assert {k: first[k] for k in ("stage", "step", "loss", "totalSteps")} == {"stage": "pretrain", "step": 1, "loss": 10.0, "totalSteps": 50}
    assert last["final"] and last["step"] == 50 and last["loss"] == 10.0 / 50 and last["outputModel"] == "s3://b/model"
    assert last["updatedAt"].endswith("Z") and "final" not in first  # steps 2..49 were coalesced away

    file_sink = FileSink(tmp_path / "p.jsonl")  # the local-mode sink writes what it is given, one line each
    for report in sink.reports:
        file_sink(report)
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == sink.reports


def test_sink_selection(tmp_path):
    assert sink_from_env({}) is log_sink
    assert isinstance(sink_from_env({"DHAD_PROGRESS_FILE": str(tmp_path / "x")}), FileSink)
    kube = sink_from_env({PROGRESS_CONFIGMAP_ENV: "j-pt-progress", NAMESPACE_ENV: "team",
                          "KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"})
    assert isinstance(kube, KubeConfigMapSink) and kube.url == "https://10.0.0.1:443/api/v1/namespaces/team/configmaps/j-pt-progress"


def test_a_failing_sink_never_fails_training(caplog):
    sink = RecordingSink(fail=True)
    reporter = ProgressReporter(sink, "sft", interval=0)
    with caplog.at_level(logging.WARNING, logger="dhad_trainer.runtime.progress"):
        reporter.update(step=1)
        sink.wait(1)
        reporter.close(final=True)  # no exception
    assert [(r["step"], r.get("final", False)) for r in sink.reports] == [(1, False), (1, True)]  # both attempted
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["progress report not delivered: apiserver down"]  # once a minute, not per report


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
