"""The Helm chart against the real apiserver: lint, schema, server-side apply of the rendered chart in a
namespace that enforces the restricted Pod Security Standard, a real `helm install`, and the operator's
permissions checked with SubjectAccessReviews (what it needs, and nothing like Secrets or pods/exec)."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import wait_for
from tests.harness.controlplane import kubectl
from tests.unit.test_images import IMAGES, args_of, uid

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dhad"
KUBE_VERSION = "v1.37.2"
KINDS = ("pretrainjobs", "sftjobs", "rlaifjobs", "evaljobs")
OTHER = "some-team"  # a namespace the chart knows nothing about: "any namespace"

# The operator's permissions, exactly: (apiGroup, resource, verb); leases are in the release namespace.
EXPECTED = (
    {("dhad.dev", k, v) for k in KINDS for v in ("get", "list", "watch", "patch")}
    | {("dhad.dev", f"{k}/status", v) for k in KINDS for v in ("get", "patch", "update")}
    | {("dhad.dev", f"{k}/finalizers", "update") for k in KINDS}
    | {("batch", "jobs", v) for v in ("get", "list", "watch", "create", "delete")}
    | {("", "pods", v) for v in ("get", "list", "watch", "delete")}
    | {("", r, v) for r in ("services", "configmaps") for v in ("get", "list", "watch", "create", "delete", "patch")}
    | {("", "serviceaccounts", v) for v in ("get", "list", "watch", "create", "delete")}
    | {("rbac.authorization.k8s.io", r, v) for r in ("roles", "rolebindings") for v in ("get", "list", "watch", "create", "delete")}
    | {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
    | {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")}
    | {("", "namespaces", v) for v in ("list", "watch")}
    | {("", "nodes", v) for v in ("list", "watch")}
)
LEASE_VERBS = {"create", "get", "update"}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "nodes"}


def helm(cp, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}
    done = subprocess.run([str(cp.bin_dir / "helm"), *args], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env})
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done


def render(cp, home: Path, release: str, namespace: str, *sets: str) -> list[dict]:
    flags = [f for s in sets for f in ("--set", s)]
    out = helm(cp, home, "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION,
               "--include-crds", *flags).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def can(kube, sa: tuple[str, str], verb: str, group: str, resource: str, namespace: str = "", name: str = "") -> bool:
    ns, sa_name = sa
    resource, _, sub = resource.partition("/")
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=f"system:serviceaccount:{ns}:{sa_name}",
        groups=["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"],
        resource_attributes=client.V1ResourceAttributes(
            verb=verb, group=group, resource=resource, subresource=sub or None, namespace=namespace or None, name=name or None),
    ))
    return client.AuthorizationV1Api(kube).create_subject_access_review(review).status.allowed


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def installed(control_plane, kube, crds_installed, helm_home):
    """The default chart, rendered and server-side applied (CRDs too) into a restricted namespace."""
    core = client.CoreV1Api(kube)
    release = "dhad-" + uuid.uuid4().hex[:6]
    ns = release + "-system"
    restricted = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn")}
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns, labels=restricted)))
    docs = render(control_plane, helm_home, release, ns)
    try:
        applied = kubectl(control_plane, "apply", "--server-side", "--force-conflicts", "--field-manager=dhad-chart-test",
                          "-f", "-", input=yaml.safe_dump_all(docs), check=False)
        yield release, ns, docs, applied
    finally:
        kubectl(control_plane, "delete", "clusterrole,clusterrolebinding", "-l", f"app.kubernetes.io/instance={release}",
                check=False)
        core.delete_namespace(ns)


def test_helm_lint_is_clean(control_plane, helm_home):
    for extra in ([], ["--set", "metrics.serviceMonitor.enabled=true", "--set", "watchNamespaces={a,b}"]):
        done = helm(control_plane, helm_home, "lint", "--strict", str(CHART), *extra)
        assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("value,complaint", [
    ("replicas=-1", "/replicas"), ("bogus=1", "bogus"), ("logLevel=loud", "/logLevel"),
    ("storage.endpoint=ftp://minio:9000", "/storage/endpoint"), ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ("metrics.service.enabled=false,metrics.serviceMonitor.enabled=true", "needs metrics.service.enabled"),
])
def test_bad_values_are_refused(control_plane, helm_home, value, complaint):
    done = helm(control_plane, helm_home, "template", "dhad", str(CHART), "--set", value, check=False)
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


def test_rendered_chart_is_accepted_in_a_restricted_namespace(installed, kube):
    release, ns, docs, applied = installed
    assert applied.returncode == 0, applied.stderr
    assert "PodSecurity" not in applied.stderr and "Warning" not in applied.stderr, applied.stderr
    assert {d["kind"] for d in docs} >= {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount",
                                         "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    # The ReplicaSet's pods pass the namespace's enforced restricted policy.
    core = client.CoreV1Api(kube)
    pods = wait_for(lambda: (p := core.list_namespaced_pod(ns).items) and len(p) == 2 and p, 60, "2 operator pods")
    assert {p.spec.service_account_name for p in pods} == {release}
    trainer = core.read_namespaced_service_account("dhad-trainer", ns)
    assert trainer.automount_service_account_token is False


def test_operator_can_do_what_it_needs_in_any_namespace(installed, kube):
    release, ns, _, applied = installed
    assert applied.returncode == 0, applied.stderr
    sa = (ns, release)
    refused = [(g, r, v) for g, r, v in sorted(EXPECTED)
               if not can(kube, sa, v, g, r, "" if r in CLUSTER_SCOPED else OTHER)]
    refused += [("*", r, v) for g, r, v in sorted(EXPECTED)
                if v in ("list", "watch") and r not in CLUSTER_SCOPED and not can(kube, sa, v, g, r)]  # cluster-wide
    refused += [("lease", "create", v) for v in ["create"] if not can(kube, sa, v, "coordination.k8s.io", "leases", ns)]
    refused += [("lease", release, v) for v in ("get", "update")
                if not can(kube, sa, v, "coordination.k8s.io", "leases", ns, release)]
    assert refused == []


def test_operator_can_create_the_per_job_progress_role_without_escalate(installed, control_plane, kube):
    """RBAC lets a subject create a Role (and bind it) only with permissions it holds itself: the
    operator, impersonated, creates the shape render.progress_objects makes (get+patch of one ConfigMap)."""
    release, ns, _, applied = installed
    assert applied.returncode == 0, applied.stderr
    cm = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["j-sft-progress"], "verbs": ["get", "patch"]}
    objects = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "j-sft-trainer", "namespace": ns}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "j-sft-trainer", "namespace": ns},
         "rules": [cm]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "j-sft-trainer", "namespace": ns},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "j-sft-trainer"},
         "subjects": [{"kind": "ServiceAccount", "name": "j-sft-trainer", "namespace": ns}]},
    ]
    as_operator = f"--as=system:serviceaccount:{ns}:{release}"
    done = kubectl(control_plane, as_operator, "create", "-f", "-", input=yaml.safe_dump_all(objects), check=False)
    assert done.returncode == 0, done.stderr
    wider = {**objects[1], "metadata": {"name": "wider", "namespace": ns}, "rules": [{**cm, "verbs": ["get", "update"]}]}
    refused = kubectl(control_plane, as_operator, "create", "-f", "-", input=yaml.safe_dump(wider), check=False)
    assert refused.returncode != 0 and "not currently held" in refused.stderr, refused.stderr


@pytest.mark.parametrize("verb,group,resource,where", [
    *[(v, "", "secrets", w) for v in ("get", "list", "watch") for w in ("", "release", OTHER)],
    ("create", "", "secrets", OTHER), ("create", "", "pods/exec", OTHER), ("get", "", "pods/exec", "release"),
    ("create", "", "pods", OTHER), ("update", "batch", "jobs", OTHER), ("patch", "batch", "jobs", OTHER),
    ("update", "dhad.dev", "sftjobs", OTHER), ("create", "dhad.dev", "sftjobs", OTHER),
    ("delete", "dhad.dev", "evaljobs", OTHER), ("delete", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("create", "coordination.k8s.io", "leases", OTHER), ("escalate", "rbac.authorization.k8s.io", "roles", OTHER),
    ("bind", "rbac.authorization.k8s.io", "roles", OTHER), ("create", "rbac.authorization.k8s.io", "clusterroles", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", ""), ("patch", "", "nodes", ""),
    ("impersonate", "", "serviceaccounts", OTHER), ("create", "", "serviceaccounts/token", OTHER),
])
def test_operator_cannot(installed, kube, verb, group, resource, where):
    release, ns, _, applied = installed
    assert applied.returncode == 0, applied.stderr
    assert not can(kube, (ns, release), verb, group, resource, ns if where == "release" else where)


def test_rbac_rules_are_exactly_the_needed_ones(installed):
    release, ns, docs, _ = installed
    granted, leases = set(), set()
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            for rule in doc["rules"]:
                for g in rule["apiGroups"]:
                    for r in rule["resources"]:
                        for v in rule["verbs"]:
                            (leases if doc["kind"] == "Role" else granted).add((g, r, v))
    assert granted == EXPECTED
    assert leases == {("coordination.k8s.io", "leases", v) for v in LEASE_VERBS}
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == ns
    assert [r.get("resourceNames") for r in role["rules"] if "get" in r["verbs"]] == [[release]]
    bound = [s["name"] for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d["subjects"]]
    assert set(bound) == {release}, "only the operator's ServiceAccount is bound (never dhad-trainer)"


def test_deployment_is_the_operator_contract(installed):
    release, ns, docs, _ = installed
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == json.loads(args_of(IMAGES["operator"], "ENTRYPOINT")[-1])
    assert container["args"] == ["--liveness=http://0.0.0.0:8081/healthz"]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["DHAD_LEADER_ELECTION"] == "true" and env["DHAD_LEASE_NAME"] == release
    assert env["DHAD_TRAINER_IMAGE"] == "ghcr.io/dhad/trainer:0.1.0" and env["DHAD_WATCH_NAMESPACES"] == ""
    assert {"DHAD_DEFAULT_STORAGE_ENDPOINT", "DHAD_DEFAULT_STORAGE_SECRET", "DHAD_LOG_LEVEL"} <= set(env)
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert pod["securityContext"]["runAsUser"] == uid(IMAGES["operator"]) and pod["securityContext"]["runAsNonRoot"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert not any(d["kind"] == "ServiceMonitor" for d in docs)
    assert not any(d["kind"] == "Secret" or "secrets" in str(d.get("rules", "")) for d in docs)


def test_helm_install_watching_listed_namespaces(control_plane, kube, crds_installed, helm_home, namespace):
    """A real `helm install` with watchNamespaces: job permissions hold in the listed namespace only."""
    release = "dhad-" + uuid.uuid4().hex[:6]
    kubeconfig = f"--kubeconfig={control_plane.kubeconfig}"
    done = helm(control_plane, helm_home, "install", release, str(CHART), "-n", namespace, kubeconfig, "--skip-crds",
                "--set", f"watchNamespaces={{{namespace}}}", "--set", "metrics.service.enabled=false")
    try:
        assert f"watches namespaces {namespace}" in done.stdout
        sa = (namespace, release)
        assert can(kube, sa, "create", "batch", "jobs", namespace)
        assert can(kube, sa, "patch", "dhad.dev", "sftjobs/status", namespace)
        assert not can(kube, sa, "create", "batch", "jobs", OTHER)
        assert not can(kube, sa, "list", "dhad.dev", "sftjobs")  # not cluster-wide
        assert can(kube, sa, "list", "apiextensions.k8s.io", "customresourcedefinitions")
        assert can(kube, sa, "create", "coordination.k8s.io", "leases", namespace)
    finally:
        helm(control_plane, helm_home, "uninstall", release, "-n", namespace, kubeconfig, check=False)
