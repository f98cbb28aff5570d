"""`helm install charts/dhad` for real, with the chart's default values plus only what this environment
needs: the node agent runs the operator Deployment's pods exactly as rendered (command, args, env; the
project's venv stands in for the image) and probes them as a kubelet does. One install serves the
module, in order: rollout with 2 replicas, a tiny SFTJob trained on node-agent pods with the chart's
default storage, the platform switch, `helm upgrade --wait` with changed values, failover when the
leader pod is deleted, a Pipeline's stage jobs created, suspended, replaced and finished, the ClusterRole
held against every call the operator made (the apiserver's audit log), and `helm uninstall` leaving the
CRDs and the users' jobs."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client

from dhad_api.jobs import KINDS
from dhad_api.layout import split_s3
from tests.conftest import wait_for
from tests.harness import audit
from tests.harness.controlplane import ControlPlane, kubectl
from tests.harness.helm import CHART, helm
from tests.harness.node_agent import NodeAgent, node_agent  # noqa: F401 - the fixture
from tests.integration.jobs import apply, exit_pod, get, patch_spec, pods, running_pods, tiny, wait_state
from tests.integration.test_e2e import _manifest as trainable_sft

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.torchrun]

RELEASE = "dhad"  # its full name is "dhad": Deployment dhad, Lease dhad, ClusterRoles dhad-edit/dhad-view
LEASE_SECONDS = 15  # leaderElection.leaseDurationSeconds, the chart's default
FINISH = {"annotations": {"dhad.test/kwok-exit": "0", "dhad.test/kwok-delay": "1s"}}
ONE_GPU = {"nodes": 1, "gpusPerNode": 1}
JOB_KINDS = {i.plural for i in KINDS.values()}  # one handler serves every kind: a call on one stands for all


def _checked_not_called() -> set[audit.Call]:
    """Rules the apiserver checks without the operator calling them: OwnerReferencesPermissionEnforcement
    (on in the test apiserver, as on OpenShift) needs `update` on the owner's finalizers to set
    blockOwnerDeletion; RBAC lets the operator create the per-job progress Role only with the rules
    it grants (taken from the renderer, so they follow it)."""
    from dhad_operator.render import Owner, progress_objects

    (role,) = [o for o in progress_objects(Owner("SFTJob", "j", "ns", "uid")) if o["kind"] == "Role"]
    read_after_conflict = {(group, resource, "get") for group, resource in  # Kube.create reads a child only on a 409
                           (("batch", "jobs"), ("", "services"), ("", "serviceaccounts"),
                            ("rbac.authorization.k8s.io", "roles"), ("rbac.authorization.k8s.io", "rolebindings"),
                            ("dhad.dev", "jobs"))}  # a Pipeline's stage jobs
    finalizers = {("dhad.dev", "jobs/finalizers", "update"), ("dhad.dev", "pipelines/finalizers", "update")}
    return finalizers | audit.expand(role["rules"]) | read_after_conflict


@dataclass
class Install:
    cp: ControlPlane
    kube: object
    agent: NodeAgent
    home: Path
    namespace: str  # the release's
    jobs: str  # where the tests' jobs live

    def helm(self, *args: str, check: bool = True, timeout: float = 200):
        return helm(self.cp, self.home, *args, "-n", self.namespace, f"--kubeconfig={self.cp.kubeconfig}",
                    check=check, timeout=timeout)

    def operator_pods(self) -> list:
        return [p for p in client.CoreV1Api(self.kube).list_namespaced_pod(
            self.namespace, label_selector=f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=operator").items
            if not p.metadata.deletion_timestamp]

    def leader(self) -> str | None:
        try:
            return client.CoordinationV1Api(self.kube).read_namespaced_lease(RELEASE, self.namespace).spec.holder_identity
        except client.ApiException:
            return None

    def logs(self) -> str:
        return self.agent.logs(self.namespace)[-6000:]


def _ready(pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


@pytest.fixture(scope="module")
def install(control_plane, kube, crds_installed, gpu_nodes, node_agent, s3_server, dhad_operator, tmp_path_factory):  # noqa: F811
    """The chart installed into a fresh namespace. The session's operator gives way meanwhile: one
    operator per cluster, or both would reconcile the same jobs."""
    core = client.CoreV1Api(kube)
    suffix = uuid.uuid4().hex[:5]
    release_ns, jobs_ns = f"dhad-system-{suffix}", f"dhad-jobs-{suffix}"
    for ns in (release_ns, jobs_ns):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    wait_for(lambda: core.read_namespaced_service_account("default", jobs_ns), 60, "default SA")
    core.create_namespaced_secret(jobs_ns, client.V1Secret(metadata=client.V1ObjectMeta(name="dhad-s3"), data={
        "AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
        "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode()}))
    dhad_operator.stop()
    inst = Install(control_plane, kube, node_agent, tmp_path_factory.mktemp("helm"), release_ns, jobs_ns)
    try:
        inst.helm("install", RELEASE, str(CHART),
                  # what this environment needs, nothing else: the operator's pods on the node agent's nodes,
                  # which share one network namespace, and the environment's S3 server for jobs
                  "--set-string", "nodeSelector.dhad\\.test/agent=true", "--set", "listenOnPodIP=true",
                  "--set", "tolerations[0].key=dhad.test/agent", "--set", "tolerations[0].operator=Exists",
                  "--set", "tolerations[0].effect=NoSchedule",
                  "--set", f"storage.endpoint={s3_server.url}", "--set", "storage.secretName=dhad-s3")
        yield inst
    finally:
        inst.helm("uninstall", RELEASE, "--wait", check=False)
        for ns in (jobs_ns, release_ns):
            core.delete_namespace(ns)
        dhad_operator.start()


def test_rollout_status_completes_with_two_replicas(install):
    done = kubectl(install.cp, "rollout", "status", f"deployment/{RELEASE}", "-n", install.namespace, "--timeout=100s", check=False)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{install.logs()}"
    ready = [p for p in install.operator_pods() if _ready(p)]
    assert len(ready) == 2, [(p.metadata.name, p.status.phase) for p in install.operator_pods()]
    assert install.leader() in {p.metadata.name for p in ready}


def test_tiny_sftjob_trains_on_node_agent_pods_with_the_charts_default_storage(install, kube, s3_server, s3_bucket, tmp_path):
    """No endpoint or Secret in the spec: the chart's storage.endpoint and storage.secretName reach the pod."""
    doc = trainable_sft(install.jobs, s3_server, s3_bucket, tmp_path)
    spec = doc["spec"]
    spec["storage"] = {"bucket": s3_bucket, "prefix": install.jobs}
    spec["resources"] = {"nodes": 1, "gpusPerNode": 0, "sharedMemory": "256Mi"}
    spec["checkpoint"] = {"intervalSteps": 4, "keepLast": 1}
    spec["training"].update(maxSteps=4)
    apply(kube, install.jobs, doc)
    try:
        done = wait_state(kube, install.jobs, "SFTJob", "tiny-sft", "Succeeded", 420)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{install.agent.logs(install.jobs)[-4000:]}\n{install.logs()}") from None
    bucket, key = split_s3(done["status"]["outputModel"])
    names = {o.object_name.rsplit("/", 1)[-1] for o in s3_server.client().list_objects(bucket, key + "/", recursive=True)}
    assert {"config.json", "model.safetensors"} <= names
    (trainer,) = pods(kube, install.jobs, "tiny-sft")
    env = {e.name: e for e in trainer.spec.containers[0].env}
    assert env["AWS_ENDPOINT_URL"].value == s3_server.url
    assert env["AWS_ACCESS_KEY_ID"].value_from.secret_key_ref.name == "dhad-s3"
    run = next(r for r in install.agent.runs.values() if r.name == trainer.metadata.name)
    work = run.dir / "volumes" / "work"
    assert (work / "sft").is_dir(), f"the trainer's scratch is not on the work volume: {sorted(work.glob('*'))}"


def test_privileged_pod_fields_are_refused_by_the_default_platform_switch(install, kube):
    """trainer.allowPrivileged defaults to false: the chart's operator fails the job, naming the field."""
    apply(kube, install.jobs, tiny("sft", resources=ONE_GPU, podTemplate={"hostNetwork": True}), "wants-host-network")
    failed = wait_state(kube, install.jobs, "SFTJob", "wants-host-network", "Failed", 60)["status"]
    (condition,) = [c for c in failed["conditions"] if c["type"] == "Failed"]
    assert condition["reason"] == "InvalidSpec" and "spec.podTemplate.hostNetwork" in condition["message"], condition
    assert not client.BatchV1Api(kube).list_namespaced_job(install.jobs, label_selector="dhad.dev/job=wants-host-network").items


def test_a_finished_jobs_children_go_when_its_ttl_passes(install, kube):
    apply(kube, install.jobs, tiny("sft", resources=ONE_GPU, podTemplate=FINISH, ttlSecondsAfterFinished=1), "with-ttl")
    wait_state(kube, install.jobs, "SFTJob", "with-ttl", "Succeeded", 90)
    core, selector = client.CoreV1Api(kube), "dhad.dev/job=with-ttl"
    wait_for(lambda: not client.BatchV1Api(kube).list_namespaced_job(install.jobs, label_selector=selector).items
             and not core.list_namespaced_config_map(install.jobs, label_selector=selector).items
             and not core.list_namespaced_service_account(install.jobs, label_selector=selector).items,
             60, "the TTL removed the children")
    assert get(kube, install.jobs, "SFTJob", "with-ttl")["status"]["state"] == "Succeeded"  # the job object stays


def test_a_pipeline_creates_suspends_and_replaces_its_stage_jobs_under_the_charts_rbac(install, kube):
    """The Pipeline calls of the chart's operator (the audit test below holds them against the ClusterRole):
    a stage job created, suspended with the pipeline, a retry request handled (the annotation removed), the
    stage changed (the old job deleted, a new one created), which then finishes the pipeline."""
    custom = client.CustomObjectsApi(kube)
    stage = tiny("sft", resources=ONE_GPU)["spec"]
    storage = stage.pop("storage")
    doc = {"apiVersion": "dhad.dev/v1alpha1", "kind": "Pipeline", "metadata": {"name": "in-chart"},
           "spec": {"defaults": {"storage": storage}, "stages": [{"name": "sft", "sft": stage}]}}
    custom.create_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "pipelines", doc, field_validation="Strict")

    def read() -> dict:
        return custom.get_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "pipelines", "in-chart")

    def stage_jobs() -> list[dict]:
        return [j for j in custom.list_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "sftjobs",
                                                                label_selector="dhad.dev/pipeline=in-chart")["items"]
                if not j["metadata"].get("deletionTimestamp")]

    first = wait_for(lambda: (lambda js: js[0] if len(js) == 1 else None)(stage_jobs()), 60, "the stage job")
    name = first["metadata"]["name"]
    wait_for(lambda: pods(kube, install.jobs, name, phase="Running"), 60, f"{name} running")
    custom.patch_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "pipelines", "in-chart", {"spec": {"suspend": True}})
    wait_for(lambda: get(kube, install.jobs, "SFTJob", name)["spec"].get("suspend") is True, 60, "the stage job suspended")
    custom.patch_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "pipelines", "in-chart",
                                          {"metadata": {"annotations": {"dhad.dev/retry": "sft"}}})
    wait_for(lambda: "dhad.dev/retry" not in (read()["metadata"].get("annotations") or {}), 60, "the retry request handled")
    stage["training"]["maxSteps"] += 1  # a changed stage: a new key, a new job (podTemplate is not in the key)
    custom.patch_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "pipelines", "in-chart",
                                          {"spec": {"suspend": False, "stages": [{"name": "sft", "sft": stage}]}})
    second = wait_for(lambda: (lambda js: js[0]["metadata"]["name"] if len(js) == 1 and js[0]["metadata"]["name"] != name else None)(
        stage_jobs()), 60, "the changed stage's new job")
    for pod in wait_for(lambda: pods(kube, install.jobs, second, phase="Running"), 60, f"{second} running"):
        exit_pod(kube, install.jobs, pod, 0)
    try:
        wait_for(lambda: (read().get("status") or {}).get("state") == "Succeeded", 120, "the pipeline Succeeded")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{read().get('status')}\n{install.logs()}") from None
    assert get(kube, install.jobs, "SFTJob", second)["status"]["state"] == "Succeeded"
    wait_for(lambda: not [j for j in stage_jobs() if j["metadata"]["name"] == name], 60, "the first stage job deleted")


def test_helm_upgrade_wait_with_changed_values_rolls_out_and_the_new_operator_serves(install, kube):
    before = {p.metadata.name for p in install.operator_pods()}
    role = "arn:aws:iam::123456789012:role/dhad-trainer"
    done = install.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "logLevel=DEBUG",
                        "--set", f"trainer.serviceAccount.annotations.eks\\.amazonaws\\.com/role-arn={role}",
                        "--wait", "--timeout", "150s", check=False, timeout=180)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{install.logs()}"
    # helm's --wait counts a Deployment ready at replicas - maxUnavailable; the second new pod follows
    def both_ready():
        pods = install.operator_pods()
        return pods if len(pods) == 2 and all(_ready(p) for p in pods) else None

    after = wait_for(both_ready, 60, "both new operator pods Ready")
    assert not before & {p.metadata.name for p in after}
    # the new operator reconciles: a job applied now succeeds and its ServiceAccount has the new annotation
    apply(kube, install.jobs, tiny("sft", resources=ONE_GPU, podTemplate=FINISH), "after-upgrade")
    sa = wait_for(lambda: client.CoreV1Api(kube).read_namespaced_service_account("after-upgrade-sft-trainer", install.jobs),
                  60, "the job's ServiceAccount")
    assert sa.metadata.annotations == {"eks.amazonaws.com/role-arn": role}
    wait_state(kube, install.jobs, "SFTJob", "after-upgrade", "Succeeded", 90)
    logs = "\n".join(install.agent.pod_log(install.namespace, p.metadata.name) for p in after)
    assert '"level": "DEBUG"' in logs, logs[-3000:]  # logLevel=DEBUG (upper case) honoured; the install's was "info"


def test_deleting_the_leader_pod_hands_over_within_the_lease_duration(install, kube):
    leader = wait_for(install.leader, 30, "a leader")
    client.CoreV1Api(kube).delete_namespaced_pod(leader, install.namespace)
    deleted = time.monotonic()
    apply(kube, install.jobs, tiny("sft", resources=ONE_GPU), "during-failover")  # applied while nobody leads
    successor = wait_for(lambda: (holder := install.leader()) not in (None, leader) and holder, LEASE_SECONDS + 30,
                         "another replica holding the Lease")
    took = time.monotonic() - deleted
    running_pods(kube, install.jobs, "during-failover", 1, 1, 60)
    assert took <= LEASE_SECONDS + 1, f"the standby took over after {took:.1f} s (lease {LEASE_SECONDS} s)"
    wait_for(lambda: successor in {p.metadata.name for p in install.operator_pods() if _ready(p)}, 30, "the new leader Ready")
    patch_spec(kube, install.jobs, "SFTJob", "during-failover", {"suspend": True})  # its Job is deleted
    wait_state(kube, install.jobs, "SFTJob", "during-failover", "Suspended", 60)


def test_cluster_role_grants_exactly_the_calls_the_operator_made(install, kube):
    """Every API call of the chart's operator (its ServiceAccount, in the audit log of this module's run)
    against every rule bound to it: nothing refused, no verb granted that the code does not use."""
    events = audit.events(install.cp.audit_log, f"system:serviceaccount:{install.namespace}:{RELEASE}")
    assert len(events) > 50, "the audit log has no record of the operator"
    denied = sorted({(e.call, e.namespace, e.name) for e in events if e.code == 403})
    used = audit.collapse({e.call for e in events}, "dhad.dev", JOB_KINDS, "jobs")
    granted = audit.collapse(audit.expand(audit.granted_rules(kube, install.namespace, RELEASE)), "dhad.dev", JOB_KINDS, "jobs")
    difference = audit.compare(used, granted, _checked_not_called())
    report = "\n".join(f"{what}: {group or 'core'} {resource} {verb}" for what, calls in difference.items()
                       for group, resource, verb in calls)
    assert (denied, difference) == ([], {"unused": [], "ungranted": []}), f"denied: {denied}\n{report}"


def test_helm_uninstall_leaves_the_crds_and_the_users_jobs(install, kube):
    custom = client.CustomObjectsApi(kube)
    before = {j["metadata"]["name"]: j.get("status", {}).get("state")
              for j in custom.list_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "sftjobs")["items"]}
    assert before.get("tiny-sft") == "Succeeded", before
    install.helm("uninstall", RELEASE, "--wait")
    wait_for(lambda: not install.operator_pods(), 60, "the operator's pods gone")
    ext = client.ApiextensionsV1Api(kube)
    assert {f"{i.plural}.dhad.dev" for i in KINDS.values()} <= {c.metadata.name for c in ext.list_custom_resource_definition().items}
    after = {j["metadata"]["name"]: j.get("status", {}).get("state")
             for j in custom.list_namespaced_custom_object("dhad.dev", "v1alpha1", install.jobs, "sftjobs")["items"]}
    assert after == before
    core = client.CoreV1Api(kube)
    assert core.read_namespaced_config_map("tiny-sft-sft-spec", install.jobs)  # a job's children stay with it
    assert not client.RbacAuthorizationV1Api(kube).list_cluster_role(label_selector=f"app.kubernetes.io/instance={RELEASE}").items
