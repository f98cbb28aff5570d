"""The renderers without a cluster: names, labels, owners, the namespace's Service, the Job, the spec
ConfigMap, the progress RBAC, secrets only by reference, pod overrides, and a golden file of a tiny
SFT job."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from dhad_api.jobs import KINDS, Job, JobKind, parse_spec
from dhad_api.layout import model_uri, output_root
from dhad_api.naming import HOSTNAME_LIMIT, MAX_ATTEMPT, MAX_NAME_LENGTH, MAX_NODES, STAGE_CODES, pod_hostname
from dhad_operator.render import (
    KUEUE_QUEUE_LABEL,
    RESTRICTED_CONTAINER,
    WORK_DIR,
    Defaults,
    Owner,
    managed_by_us,
    namespace_child_names,
    namespace_children,
    static_child_names,
    static_children,
    training_job,
)
from tests.conftest import in_ci

REPO = Path(__file__).resolve().parents[2]
TINY = [p for p in sorted((REPO / "examples" / "tiny").glob("*.yaml")) if p.stem != "pipeline"]  # a Pipeline renders no pods itself
GOLDEN = Path(__file__).parent / "golden" / "sft-children.yaml"
UID = "5d1c1a7e-0000-4000-8000-00000000d4ad"
NS = "ml"
DEFAULTS = Defaults()
ENDPOINT = {"baseUrl": "https://llm.example.com/v1", "model": "judge-70b",
            "apiKeySecretRef": {"name": "llm-key", "key": "token"}}


def load(example: str, **changes) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / f"{example}.yaml").read_text())
    doc["metadata"]["namespace"] = NS
    doc["spec"].update(copy.deepcopy(changes))
    return doc


def render(doc: dict, attempt: int = 1, stage: str | None = None, avoid: list[str] | None = None,
           defaults: Defaults = DEFAULTS):
    """(owner, spec, static children, the stage's Job)."""
    owner = Owner(doc["kind"], doc["metadata"]["name"], NS, UID)
    spec = parse_spec(doc["kind"], doc["spec"])
    root = output_root(spec.storage, NS, owner.name, UID)
    resolved = {"modelUri": "s3://dhad-demo/models/start", "outputRoot": root}
    stage = stage or KINDS[JobKind(doc["kind"])].stages[-1]
    return (owner, spec, static_children(owner, spec, resolved, defaults),
            training_job(owner, spec, stage, attempt, defaults, avoid))


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def env_of(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(job)["env"]}


def by_kind(children: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for child in children:
        out.setdefault(child["kind"], []).append(child)
    return out


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_children_have_deterministic_names_labels_and_a_controller_owner(path):
    doc = load(path.stem)
    owner, spec, children, job = render(doc)
    name, code = owner.name, KINDS[JobKind(doc["kind"])].code
    stage = KINDS[JobKind(doc["kind"])].stages[-1]
    names = {(c["kind"], c["metadata"]["name"]) for c in children}
    assert names == {("ConfigMap", f"{name}-{code}-spec"),
                     ("ConfigMap", f"{name}-{code}-progress"), ("ServiceAccount", f"{name}-{code}-trainer"),
                     ("Role", f"{name}-{code}-trainer"), ("RoleBinding", f"{name}-{code}-trainer")}
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == static_child_names(owner, spec)
    assert job["metadata"]["name"] == f"{name}-{STAGE_CODES[stage]}-1"
    for child in [*children, job]:
        meta = child["metadata"]
        assert meta["namespace"] == NS
        assert meta["labels"]["dhad.dev/job"] == name and meta["labels"]["dhad.dev/kind"] == doc["kind"]
        assert meta["ownerReferences"] == [{"apiVersion": "dhad.dev/v1alpha1", "kind": doc["kind"], "name": name,
                                            "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    for labels in (job["metadata"]["labels"], pod_labels):
        assert labels["dhad.dev/stage"] == stage and labels["dhad.dev/attempt"] == "1"
    assert render(doc)[2:] == (children, job)


def test_the_namespace_has_one_headless_service_no_job_owns():
    (service,) = namespace_children(NS)
    assert [(service["kind"], service["metadata"]["name"])] == namespace_child_names() == [("Service", "dhad-workers")]
    assert service["metadata"]["namespace"] == NS and "ownerReferences" not in service["metadata"]
    assert service["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "dhad-operator"} and managed_by_us(service)
    assert not managed_by_us({"metadata": {"name": "dhad-workers", "labels": {"app": "theirs"}}})
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec["publishNotReadyAddresses"] is True
    assert spec["selector"] == {"dhad.dev/worker": "true"} and spec["ports"][0]["port"] == 29500


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_the_namespace_service_selects_every_attempt_of_every_kind(path):
    (service,) = namespace_children(NS)
    for attempt in (1, 3):
        owner, _, _, job = render(load(path.stem), attempt=attempt)
        pod = job["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["subdomain"] == service["metadata"]["name"]
        # the user's pod labels cannot take a pod out of the Service
        _, _, _, labelled = render(load(path.stem, podTemplate={"labels": {"dhad.dev/worker": "no", "team": "nlp"}}), attempt=attempt)
        assert labelled["spec"]["template"]["metadata"]["labels"]["dhad.dev/worker"] == "true"


def test_hostnames_in_the_shared_subdomain_are_unique_per_job_stage_attempt_and_index():
    """Every pod of a namespace has the subdomain dhad-workers, so its hostname alone must tell the pods
    apart: names made to look like another job's suffix (`a-pt-1`) included, and across kinds."""
    names = ["a", "a-pt", "a-pt-1", "a-1", "a-sft", "a-sft-1-0", "x" * MAX_NAME_LENGTH]
    seen: dict[str, tuple] = {}
    for name in names:
        for stage in STAGE_CODES:
            for attempt in (1, 2, 10, MAX_ATTEMPT):
                for index in (0, 1, 10, MAX_NODES - 1):
                    host = pod_hostname(name, stage, attempt, index)
                    assert seen.setdefault(host, (name, stage, attempt, index)) == (name, stage, attempt, index), host
                    assert len(host) <= HOSTNAME_LIMIT
    codes = [STAGE_CODES[stage] for info in KINDS.values() for stage in info.stages]
    assert len(codes) == len(set(codes)) == len(STAGE_CODES)  # a stage code names one kind: one name in two kinds differs too


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_job_is_an_indexed_gang_without_retries(path):
    doc = load(path.stem)
    owner, spec, children, job = render(doc, attempt=2)
    nodes = spec.resources.nodes
    js = job["spec"]
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimit"]) == ("Indexed", nodes, nodes, 0)
    assert js["suspend"] is False and KUEUE_QUEUE_LABEL not in job["metadata"]["labels"]
    pod = js["template"]["spec"]
    service = "dhad-workers"
    assert pod["subdomain"] == service and pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == by_kind(children)["ServiceAccount"][0]["metadata"]["name"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    c = container(job)
    assert c["securityContext"] == RESTRICTED_CONTAINER
    assert c["command"] == ["python", "-m", "dhad_trainer", "launch", "/etc/dhad/job.json"]
    assert c["image"] == DEFAULTS.trainer_image
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": spec.resources.shared_memory}
    assert volumes["job"]["configMap"]["name"] == by_kind(children)["ConfigMap"][0]["metadata"]["name"]
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/etc/dhad", "/dev/shm", "/tmp", WORK_DIR}
    assert volumes["work"] == {"name": "work", "emptyDir": {"sizeLimit": "100Gi"}}  # scratch never in the writable layer
    env = env_of(job)
    assert env["DHAD_WORK_DIR"]["value"] == WORK_DIR
    assert env["MASTER_ADDR"]["value"] == f"{job['metadata']['name']}-0.{service}"
    assert env["NNODES"]["value"] == str(nodes) and env["DHAD_ATTEMPT"]["value"] == "2"
    assert env["DHAD_JOB_UID"]["value"] == UID
    assert env["DHAD_PROGRESS_CONFIGMAP"]["value"] == f"{owner.name}-{owner.info.code}-progress"
    assert "affinity" not in pod and "nodeSelector" not in pod and "tolerations" not in pod


@pytest.mark.parametrize("path", TINY, ids=lambda p: p.stem)
def test_spec_config_map_round_trips_into_the_trainers_job(path):
    doc = load(path.stem)
    owner, spec, children, _ = render(doc)
    document = json.loads(by_kind(children)["ConfigMap"][0]["data"]["job.json"])
    job = Job.model_validate(document)
    assert (job.kind.value, job.metadata.name, job.metadata.namespace, job.metadata.uid) == (doc["kind"], owner.name, NS, UID)
    assert job.typed_spec() == spec == parse_spec(doc["kind"], job.spec)
    assert job.resolved.model_uri == "s3://dhad-demo/models/start"
    assert job.resolved.output_root == f"s3://dhad-demo/dhad/{NS}/{owner.name}-{UID}"


def test_progress_role_may_only_get_and_patch_its_own_config_map():
    owner, _, children, _ = render(load("pretrain"))
    kinds = by_kind(children)
    progress = kinds["ConfigMap"][1]
    assert progress["metadata"]["name"] == "tiny-pretrain-pt-progress" and progress["data"] == {"progress": "{}"}
    (role,) = kinds["Role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"],
                              "resourceNames": ["tiny-pretrain-pt-progress"], "verbs": ["get", "patch"]}]
    (binding,) = kinds["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tiny-pretrain-pt-trainer", "namespace": NS}]


def test_longest_allowed_name_keeps_every_hostname_and_name_within_63():
    doc = sft_with_respond()
    doc["metadata"]["name"] = "a" * MAX_NAME_LENGTH
    doc["spec"]["resources"] = {"nodes": MAX_NODES, "gpusPerNode": 8}
    for stage in STAGE_CODES:
        _, _, children, job = render(doc, attempt=9999, stage=stage)
        hostname = f"{job['metadata']['name']}-{MAX_NODES - 1}"
        assert len(hostname) <= HOSTNAME_LIMIT, hostname
        for obj in [*children, job]:
            assert len(obj["metadata"]["name"]) <= HOSTNAME_LIMIT
            assert all(len(v) <= 63 for v in obj["metadata"]["labels"].values())


def test_queue_name_creates_the_job_suspended_for_kueue():
    _, _, _, job = render(load("sft", queueName="team-a"))
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "team-a"


def _walk_env(obj):
    if isinstance(obj, dict):
        if "env" in obj and isinstance(obj["env"], list):
            yield from obj["env"]
        for value in obj.values():
            yield from _walk_env(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _walk_env(value)


def test_storage_credentials_come_only_from_secret_key_refs():
    doc = load("sft", env=[{"name": "LOG_LEVEL", "value": "debug"}], hfTokenSecretRef={"name": "hf", "key": "token"})
    doc["spec"]["storage"]["secretRef"] = {"name": "s3-creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}
    _, _, children, job = render(doc)
    env = env_of(job)
    assert env["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "id"}}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "s3-creds", "key": "key"}}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://dhad-s3.dhad-system.svc:8333"
    assert env["LOG_LEVEL"]["value"] == "debug"
    secretish = re.compile(r"(?i)(secret|password|token|api_?key|access_key)")
    for var in _walk_env([*children, job]):
        if secretish.search(var["name"]):
            assert "value" not in var and "secretKeyRef" in var["valueFrom"], var
    assert all(c["kind"] != "Secret" for c in children)


def test_no_secret_ref_means_no_aws_keys_in_the_env():
    doc = load("pretrain")
    del doc["spec"]["storage"]["secretRef"]
    env = env_of(render(doc)[3])
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
    assert env["AWS_REGION"]["value"] == "us-east-1"


@pytest.mark.parametrize("gpus, limit, nproc", [(8, "8", "8"), (1, "1", "1"), (0, None, "1")])
def test_gpus_per_node_sets_the_gpu_limit_and_processes(gpus, limit, nproc):
    doc = load("pretrain", resources={"nodes": 2, "gpusPerNode": gpus, "cpu": "4", "memory": "8Gi"})
    job = render(doc)[3]
    resources = container(job)["resources"]
    assert resources["limits"].get("nvidia.com/gpu") == limit
    assert resources["requests"] == resources["limits"]
    assert resources["limits"]["cpu"] == "4" and resources["limits"]["memory"] == "8Gi"
    assert env_of(job)["NPROC_PER_NODE"]["value"] == nproc


def test_avoided_nodes_become_a_required_not_in_node_affinity():
    pod = render(load("sft"), avoid=["node-b", "node-a"])[3]["spec"]["template"]["spec"]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a", "node-b"]}]}]


def test_avoided_nodes_are_added_to_every_term_of_the_users_affinity():
    gpu = {"key": "gpu.example.com/class", "operator": "In", "values": ["h100"]}
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [gpu]}]}},
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}
    doc = load("sft", podTemplate={"affinity": affinity})
    _, spec, _, job = render(doc, avoid=["node-a"])
    got = job["spec"]["template"]["spec"]["affinity"]
    (term,) = got["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert term["matchExpressions"] == [gpu, {"key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a"]}]
    assert got["podAntiAffinity"] == affinity["podAntiAffinity"]
    assert spec.pod_template.affinity == affinity  # the spec itself is not changed
    assert render(doc)[3]["spec"]["template"]["spec"]["affinity"] == affinity


def test_pod_template_overrides_land_on_the_pod():
    overrides = {
        "labels": {"team": "nlp", "dhad.dev/job": "spoof"}, "annotations": {"sidecar.istio.io/inject": "false"},
        "nodeSelector": {"gpu": "h100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband"}}],
        "volumeMounts": [{"name": "ib", "mountPath": "/dev/infiniband"}],
        "securityContext": {"capabilities": {"add": ["IPC_LOCK"]}},
        "schedulerName": "volcano", "priorityClassName": "training-high",
    }
    job = render(load("sft", podTemplate=overrides, image="registry.example.com/dhad/trainer:dev"))[3]
    template = job["spec"]["template"]
    pod = template["spec"]
    assert template["metadata"]["labels"]["team"] == "nlp"
    assert template["metadata"]["labels"]["dhad.dev/job"] == "tiny-sft"  # ours win
    assert template["metadata"]["annotations"] == {"sidecar.istio.io/inject": "false"}
    assert pod["nodeSelector"] == {"gpu": "h100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {"name": "ib", "hostPath": {"path": "/dev/infiniband"}} in pod["volumes"]
    assert {v["name"] for v in pod["volumes"]} == {"job", "dshm", "tmp", "work", "ib"}
    c = container(job)
    assert {"name": "ib", "mountPath": "/dev/infiniband"} in c["volumeMounts"]
    assert c["securityContext"] == {**RESTRICTED_CONTAINER, "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
    assert c["image"] == "registry.example.com/dhad/trainer:dev"
    assert (pod["schedulerName"], pod["priorityClassName"]) == ("volcano", "training-high")


def test_rlaif_judge_endpoint_key_comes_from_its_secret():
    doc = load("rlaif")
    doc["spec"]["feedback"]["judge"] = {"endpoint": ENDPOINT}
    for stage in KINDS[JobKind.RLAIF].stages:
        env = env_of(render(doc, stage=stage)[3])
        assert env["DHAD_JUDGE_API_KEY"] == {"name": "DHAD_JUDGE_API_KEY", "valueFrom": {"secretKeyRef": {"name": "llm-key", "key": "token"}}}
    assert "DHAD_JUDGE_API_KEY" not in env_of(render(load("rlaif"))[3])  # a local judge needs no key


def sft_with_respond() -> dict:
    doc = load("sft")
    doc["spec"]["respond"] = {"prompts": [{"uri": "s3://dhad-demo/data/prompts.jsonl", "schema": "prompt-completion"}],
                              "teacher": {"endpoint": {**ENDPOINT, "model": "teacher"}}}
    return doc


def test_sft_teacher_endpoint_key_comes_from_its_secret():
    env = env_of(render(sft_with_respond(), stage="respond")[3])
    assert env["DHAD_TEACHER_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "llm-key", "key": "token"}}
    assert env["DHAD_STAGE"]["value"] == "respond"


@pytest.mark.parametrize(("teacher", "gpus"), [("endpoint", None), ("model", "1"), ("vllm", "1")])
def test_respond_asks_for_one_pod_not_the_training_gang(teacher, gpus):
    """Only rank 0 answers prompts: one pod, one process, one GPU for a local teacher, none for an endpoint."""
    doc = sft_with_respond()
    doc["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 8}
    if teacher != "endpoint":
        doc["spec"]["respond"]["teacher"] = {"model": {"uri": "s3://dhad-demo/models/teacher"}, "useVllm": teacher == "vllm"}
    job = render(doc, stage="respond")[3]
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 1
    assert container(job)["resources"]["limits"].get("nvidia.com/gpu") == gpus
    env = env_of(job)
    assert env["NNODES"]["value"] == "1" and env["NPROC_PER_NODE"]["value"] == "1"
    train = render(doc, stage="sft")[3]  # the training sub-stage keeps the gang
    assert train["spec"]["completions"] == 2 and container(train)["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert env_of(train)["NNODES"]["value"] == "2" and env_of(train)["NPROC_PER_NODE"]["value"] == "8"


def test_eval_judge_endpoint_key_comes_from_its_secret():
    doc = load("eval")
    doc["spec"]["evaluation"]["judge"] = {"endpoint": ENDPOINT}
    assert env_of(render(doc)[3])["DHAD_JUDGE_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "llm-key"


def golden_children() -> str:
    """examples/tiny/sft.yaml, attempt 1, its fromJob resolved to the pre-training job's model; the namespace's Service first."""
    doc = load("sft")
    owner, spec, _, job = render(doc)
    resolved = {"modelUri": model_uri(output_root(spec.storage, NS, "tiny-pretrain", "pretrain-uid"), "pretrain"),
                "outputRoot": output_root(spec.storage, NS, owner.name, UID)}
    children = [*namespace_children(NS), *static_children(owner, spec, resolved), job]
    return yaml.safe_dump_all(children, sort_keys=True, allow_unicode=True, width=120)


def test_golden_sft_children():
    """DHAD_UPDATE_GOLDEN=1 rewrites the file on a developer's machine and fails the run, so the change is
    reviewed (git diff) and the test passes only on a run that compares; CI never rewrites it."""
    text = golden_children()
    if os.environ.get("DHAD_UPDATE_GOLDEN") == "1":
        if in_ci():
            pytest.fail("DHAD_UPDATE_GOLDEN is set under CI: the golden file is compared in CI, never rewritten")
        changed = not GOLDEN.exists() or GOLDEN.read_text() != text
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(text)
        pytest.fail(f"golden file {'rewritten' if changed else 'unchanged'}: review `git diff {GOLDEN.name}`, "
                    "then run again without DHAD_UPDATE_GOLDEN")
    assert GOLDEN.exists(), "run with DHAD_UPDATE_GOLDEN=1 to write the golden file"
    assert GOLDEN.read_text() == text, "rendered children changed: review, then regenerate with DHAD_UPDATE_GOLDEN=1"


def test_ci_refuses_to_rewrite_the_golden_file(monkeypatch):
    before = GOLDEN.read_bytes()
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("DHAD_UPDATE_GOLDEN", "1")
    with pytest.raises(pytest.fail.Exception, match="never rewritten"):
        test_golden_sft_children()
    assert GOLDEN.read_bytes() == before


def test_every_env_name_the_operator_sets_is_reserved_in_the_api():
    """A user env var with one of these names would silently collide with the operator's wiring."""
    import yaml as _yaml

    from dhad_api.common import RESERVED_ENV
    from dhad_api.jobs import parse_spec
    from dhad_operator.render import Defaults, Owner, training_job

    doc = _yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "gpu" / "acegpt-7b-rlaif.yaml").read_text())
    spec = parse_spec(doc["kind"], doc["spec"])
    job = training_job(Owner("RLAIFJob", "x", "ns", "uid"), spec, "feedback", 1, Defaults())
    names = {e["name"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert names - {e.name for e in spec.env} <= set(RESERVED_ENV), names - set(RESERVED_ENV)


# --- production pod fields (issue 15.5) ------------------------------------------------------------

def test_security_context_is_merged_onto_the_restricted_defaults_never_replacing_them():
    asked = {"capabilities": {"add": ["IPC_LOCK"]}, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 2000,
             "readOnlyRootFilesystem": True}
    job = render(load("sft", podTemplate={"securityContext": asked}))[3]
    pod = job["spec"]["template"]["spec"]
    assert container(job)["securityContext"] == {
        "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}, "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"}, "runAsUser": 1000, "runAsGroup": 1000, "readOnlyRootFilesystem": True}
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}, "fsGroup": 2000}
    assert RESTRICTED_CONTAINER["capabilities"] == {"drop": ["ALL"]}  # the shared default was not mutated


@pytest.mark.parametrize("pod_template,field", [
    ({"securityContext": {"privileged": True}}, "spec.podTemplate.securityContext"),
    ({"securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "spec.podTemplate.securityContext"),
    ({"hostNetwork": True}, "spec.podTemplate.hostNetwork"),
    ({"hostIPC": True}, "spec.podTemplate.hostIPC"),
    ({"volumes": [{"name": "ib", "hostPath": {"path": "/dev/infiniband"}}]}, "spec.podTemplate.volumes[0].hostPath"),
])
def test_privileged_host_namespaces_and_host_path_fail_the_job_unless_the_platform_allows_them(pod_template, field):
    from datetime import UTC, datetime

    from dhad_operator.reconcile import Observed, decide

    doc = load("pretrain", podTemplate=pod_template)  # a direct model URI: nothing to wait for
    doc["metadata"] |= {"uid": UID, "generation": 1}
    now = datetime(2026, 1, 1, tzinfo=UTC)
    refused = decide(doc, Observed(), now, Defaults())
    assert refused.status["state"] == "Failed" and refused.create == []
    (failed,) = [c for c in refused.status["conditions"] if c["type"] == "Failed"]
    assert failed["reason"] == "InvalidSpec" and field in failed["message"] and "trainer.allowPrivileged" in failed["message"]
    allowed = decide(doc, Observed(), now, Defaults(allow_privileged=True))
    assert allowed.status["state"] == "Pending" and [c["kind"] for c in allowed.create][-1] == "Job"


def test_privileged_and_host_network_render_as_kubernetes_requires_when_allowed():
    doc = load("sft", podTemplate={"securityContext": {"privileged": True}, "hostNetwork": True})
    job = render(doc, defaults=Defaults(allow_privileged=True))[3]
    pod = job["spec"]["template"]["spec"]
    context = container(job)["securityContext"]
    assert context["privileged"] is True and context["allowPrivilegeEscalation"] is True  # the apiserver refuses privileged without it
    assert context["capabilities"] == {"drop": ["ALL"]} and context["runAsNonRoot"] is True
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert "hostNetwork" not in render(load("sft"))[3]["spec"]["template"]["spec"]


def test_image_pull_secrets_and_extra_resources_land_on_the_pod():
    doc = load("sft", podTemplate={"imagePullSecrets": [{"name": "registry-creds"}]},
               resources={"nodes": 2, "gpusPerNode": 8, "extra": {"rdma/ib": "1", "ephemeral-storage": "200Gi"}})
    job = render(doc)[3]
    assert job["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    resources = container(job)["resources"]
    assert resources["limits"] == {"rdma/ib": "1", "ephemeral-storage": "200Gi", "nvidia.com/gpu": "8"}
    assert resources["requests"] == resources["limits"]
    assert "imagePullSecrets" not in render(load("sft"))[3]["spec"]["template"]["spec"]


@pytest.mark.parametrize("work,volume,sub_path", [
    ({"size": "500Gi"}, {"emptyDir": {"sizeLimit": "500Gi"}}, None),
    ({"type": "ephemeral", "size": "1Ti", "storageClassName": "local-nvme"},
     {"ephemeral": {"volumeClaimTemplate": {"metadata": {"labels": {"dhad.dev/job": "tiny-sft", "dhad.dev/kind": "SFTJob"}},
                                            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Ti"}},
                                                     "storageClassName": "local-nvme"}}}}, None),
    ({"type": "persistentVolumeClaim", "claimName": "scratch"}, {"persistentVolumeClaim": {"claimName": "scratch"}},
     "tiny-sft-sft/$(JOB_COMPLETION_INDEX)"),
])
def test_work_volume_backs_dhad_work_dir(work, volume, sub_path):
    job = render(load("sft", podTemplate={"workVolume": work}))[3]
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["work"] == {"name": "work", **volume}
    (mount,) = [m for m in container(job)["volumeMounts"] if m["name"] == "work"]
    assert mount["mountPath"] == WORK_DIR == env_of(job)["DHAD_WORK_DIR"]["value"]
    assert mount.get("subPathExpr") == sub_path


def test_storage_defaults_apply_only_to_jobs_that_leave_them_empty():
    platform = Defaults(storage_endpoint="https://minio.storage.svc:9000", storage_secret="platform-s3")
    doc = load("sft")
    doc["spec"]["storage"] = {"bucket": "llm-training"}
    env = env_of(render(doc, defaults=platform)[3])
    assert env["AWS_ENDPOINT_URL"]["value"] == "https://minio.storage.svc:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "platform-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "platform-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    own = env_of(render(load("sft"), defaults=platform)[3])  # the example names its own endpoint and Secret
    assert own["AWS_ENDPOINT_URL"]["value"] == "http://dhad-s3.dhad-system.svc:8333"
    assert own["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "dhad-s3"
    bare = env_of(render(doc)[3])
    assert "AWS_ENDPOINT_URL" not in bare and "AWS_ACCESS_KEY_ID" not in bare


def test_per_job_service_account_carries_the_platform_and_job_annotations():
    platform = Defaults(service_account_annotations={"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/platform",
                                                     "team": "platform"})
    doc = load("sft", podTemplate={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/nlp"}})
    (sa,) = by_kind(render(doc, defaults=platform)[2])["ServiceAccount"]
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/nlp", "team": "platform"}
    (plain,) = by_kind(render(load("sft"))[2])["ServiceAccount"]
    assert "annotations" not in plain["metadata"]


def test_named_service_account_runs_the_pods_and_gets_the_progress_binding():
    owner, _, children, job = render(load("sft", podTemplate={"serviceAccountName": "gke-trainer"}))
    kinds = by_kind(children)
    assert "ServiceAccount" not in kinds  # the operator never creates or deletes the user's ServiceAccount
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "gke-trainer"
    (binding,) = kinds["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "gke-trainer", "namespace": NS}]


def test_prepare_is_an_indexed_job_of_independent_cpu_workers():
    doc = load("pretrain", resources={"nodes": 2, "gpusPerNode": 8})
    doc["spec"]["data"]["workers"] = 3
    _, _, _, job = render(doc, stage="prepare")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert "backoffLimit" not in spec and spec["backoffLimitPerIndex"] == 3 and spec["maxFailedIndexes"] == 0
    fail_job, ignore = spec["podFailurePolicy"]["rules"]
    assert fail_job["action"] == "FailJob" and fail_job["onExitCodes"]["values"] == [65, 78]
    assert ignore == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert "nvidia.com/gpu" not in container(job)["resources"]["limits"]
    env = env_of(job)
    assert env["NNODES"]["value"] == "3" and env["NPROC_PER_NODE"]["value"] == "1" and env["DHAD_STAGE"]["value"] == "prepare"
    _, _, _, train = render(doc, stage="pretrain")  # training stays a gang of resources.nodes
    assert train["spec"]["backoffLimit"] == 0 and train["spec"]["completions"] == 2
    assert "backoffLimitPerIndex" not in train["spec"] and container(train)["resources"]["limits"]["nvidia.com/gpu"] == "8"
