"""The Helm chart against the real apiserver: lint, schema, server-side apply of the rendered chart in a
namespace that enforces the restricted Pod Security Standard, a real `helm install`, and the operator's
permissions checked with SubjectAccessReviews (what it needs, and nothing like Secrets or pods/exec)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.conftest import wait_for
from tests.harness import audit
from tests.harness.controlplane import kubectl
from tests.harness.helm import CHART, REPO, helm
from tests.unit.test_images import IMAGES, args_of, uid

pytestmark = pytest.mark.cluster

KUBE_VERSION = "v1.37.2"
KINDS = ("pretrainjobs", "sftjobs", "rlaifjobs", "evaljobs")
OTHER = "some-team"  # a namespace the chart knows nothing about: "any namespace"
OTHER_FOR_USERS = "team-" + uuid.uuid4().hex[:6]  # where namespace users are bound to the built-in roles

# The operator's own rules are checked against its calls in test_helm_install.py (audit log); here
# they are read from the rendered chart and checked to hold wherever the bindings say they should.
LEASE_VERBS = {"create", "get", "update"}
CLUSTER_SCOPED = {"customresourcedefinitions", "namespaces", "nodes"}


_RENDERED: dict[tuple, str] = {}  # helm's output by its arguments: the default is compared in every value's row


def render(cp, home: Path, release: str, namespace: str, *sets: str) -> list[dict]:
    """`helm template` of the chart (CRDs included), parsed afresh on each call (tests may change it)."""
    key = (release, namespace, sets)
    if key not in _RENDERED:
        flags = [f for s in sets for f in ("--set", s)]
        _RENDERED[key] = helm(cp, home, "template", release, str(CHART), "-n", namespace, "--kube-version", KUBE_VERSION,
                              "--include-crds", *flags).stdout
    return [d for d in yaml.load_all(_RENDERED[key], Loader=yaml.CSafeLoader) if d]


def operator_rules(docs: list[dict], release: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of the ClusterRoles bound to the operator's ServiceAccount."""
    bound = {d["roleRef"]["name"] for d in docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")
             and d["roleRef"]["kind"] == "ClusterRole" and any(s["name"] == release for s in d["subjects"])}
    return audit.expand([r for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] in bound for r in d["rules"]])


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
    # what the operator (or the API it fills in for jobs) would refuse
    ("storage.endpoint=http://user:pw@minio:9000", "/storage/endpoint"), ("storage.secretName=Bad_Name", "/storage/secretName"),
    ("leaderElection.enabled=false", "/replicas"),  # two replicas without a Lease would both reconcile
    ("leaderElection.leaseDurationSeconds=2", "/leaderElection/leaseDurationSeconds"),
    ("trainer.serviceAccount.annotations.bad key=x", "does not match pattern"),
    ("trainer.serviceAccount.name=dhad-trainer", "name"),  # removed: the operator makes a ServiceAccount per job
    ("trainer.image.tag=has space", "/trainer/image/tag"), ("trainer.allowPrivileged=maybe", "/trainer/allowPrivileged"),
    ("health.port=8080", "health.port and metrics.port must differ"),
    ("podDisruptionBudget.enabled=true,podDisruptionBudget.minAvailable=2", "must be below replicas"),
    ("networkPolicy.apiServerPorts={70000}", "/networkPolicy/apiServerPorts"),
])
def test_bad_values_are_refused(control_plane, helm_home, value, complaint):
    done = helm(control_plane, helm_home, "template", "dhad", str(CHART), "--set", value, check=False)
    assert done.returncode != 0 and complaint in done.stderr, done.stderr


@pytest.mark.parametrize("value", ["logLevel=DEBUG", "logLevel=Warning", "leaderElection.enabled=false,replicas=1"])
def test_values_the_operator_accepts_are_accepted(control_plane, helm_home, value):
    helm(control_plane, helm_home, "template", "dhad", str(CHART), "--set", value)


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


def test_operator_can_do_what_it_needs_in_any_namespace(installed, kube):
    release, ns, docs, applied = installed
    assert applied.returncode == 0, applied.stderr
    sa = (ns, release)
    EXPECTED = operator_rules(docs, release)  # noqa: N806
    assert ("dhad.dev", "sftjobs/status", "update") in EXPECTED and ("batch", "jobs", "create") in EXPECTED
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
    ("update", "dhad.dev", "sftjobs", OTHER),  # (create, delete, patch, get of jobs: a Pipeline's stage jobs need them)
    ("create", "dhad.dev", "pipelines", OTHER), ("delete", "dhad.dev", "pipelines", OTHER), ("update", "dhad.dev", "pipelines", OTHER),
    ("delete", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("update", "apiextensions.k8s.io", "customresourcedefinitions", ""),
    ("create", "coordination.k8s.io", "leases", OTHER), ("escalate", "rbac.authorization.k8s.io", "roles", OTHER),
    ("bind", "rbac.authorization.k8s.io", "roles", OTHER), ("create", "rbac.authorization.k8s.io", "clusterroles", ""),
    ("create", "rbac.authorization.k8s.io", "clusterrolebindings", ""), ("patch", "", "nodes", ""),
    ("impersonate", "", "serviceaccounts", OTHER), ("create", "", "serviceaccounts/token", OTHER),
    # verbs the code does not use (the audit comparison in test_helm_install.py keeps them out)
    ("delete", "", "pods", OTHER), ("get", "", "pods", OTHER), ("get", "dhad.dev", "pipelines", OTHER),
    ("patch", "dhad.dev", "sftjobs/status", OTHER), ("patch", "dhad.dev", "pipelines/status", OTHER), ("list", "", "namespaces", ""),
])
def test_operator_cannot(installed, kube, verb, group, resource, where):
    release, ns, _, applied = installed
    assert applied.returncode == 0, applied.stderr
    assert not can(kube, (ns, release), verb, group, resource, ns if where == "release" else where)


def test_only_the_operator_is_bound_and_the_lease_only_in_its_namespace(installed):
    release, ns, docs, _ = installed
    leases = audit.expand([r for d in docs if d["kind"] == "Role" for r in d["rules"]])
    assert leases == {("coordination.k8s.io", "leases", v) for v in LEASE_VERBS}
    assert not any(g == "coordination.k8s.io" for g, _, _ in operator_rules(docs, release))
    role = one(docs, "Role")
    assert role["metadata"]["namespace"] == ns
    assert [r.get("resourceNames") for r in role["rules"] if "get" in r["verbs"]] == [[release]]
    bound = [s["name"] for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in d["subjects"]]
    assert set(bound) == {release}, "only the operator's ServiceAccount is bound"


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
    # every env var the chart sets is one the operator reads (operator/dhad_operator/config.py)
    read = set(re.findall(r'"((?:DHAD|POD)_[A-Z_]+)"', (REPO / "operator" / "dhad_operator" / "config.py").read_text()))
    read |= set(re.findall(r'"((?:DHAD|POD)_[A-Z_]+)"', (REPO / "operator" / "dhad_operator" / "__main__.py").read_text()))
    assert set(env) <= read, set(env) - read
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
        assert can(kube, sa, "update", "dhad.dev", "sftjobs/status", namespace)
        assert not can(kube, sa, "create", "batch", "jobs", OTHER)
        assert not can(kube, sa, "list", "dhad.dev", "sftjobs")  # not cluster-wide
        assert can(kube, sa, "list", "", "nodes")
        assert can(kube, sa, "create", "coordination.k8s.io", "leases", namespace)
    finally:
        helm(control_plane, helm_home, "uninstall", release, "-n", namespace, kubeconfig, check=False)


def _pod(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def _env(docs: list[dict]) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _pod(docs)["containers"][0]["env"]}


# (the values set, what the rendered chart must then show): one row per key of values.yaml. The
# operator's behaviour for the env-carried keys (storage.*, trainer.*, logLevel, leaderElection.*) is
# shown on a running install in test_helm_install.py and on the renderers in tests/unit/test_render.py.
EFFECTS = {
    "image": (["image.repository=reg.example.com/op", "image.tag=1.2", "image.pullPolicy=Always"],
              lambda d: (_pod(d)["containers"][0]["image"], _pod(d)["containers"][0]["imagePullPolicy"]) == ("reg.example.com/op:1.2", "Always")),
    "imagePullSecrets": (["imagePullSecrets[0].name=regcred"], lambda d: _pod(d)["imagePullSecrets"] == [{"name": "regcred"}]),
    "replicas": (["replicas=3"], lambda d: one(d, "Deployment")["spec"]["replicas"] == 3),
    "leaderElection": (["leaderElection.leaseName=my-lease", "leaderElection.leaseDurationSeconds=30"],
                       lambda d: (_env(d)["DHAD_LEASE_NAME"], _env(d)["DHAD_LEASE_DURATION_SECONDS"]) == ("my-lease", "30")
                       and one(d, "Role")["rules"][1]["resourceNames"] == ["my-lease"]),
    "leaderElection.enabled": (["leaderElection.enabled=false", "replicas=1"], lambda d: _env(d)["DHAD_LEADER_ELECTION"] == "false"),
    "watchNamespaces": (["watchNamespaces={a,b}"], lambda d: _env(d)["DHAD_WATCH_NAMESPACES"] == "a,b"
                        and {b["metadata"]["namespace"] for b in d if b["kind"] == "RoleBinding" and b["roleRef"]["kind"] == "ClusterRole"} == {"a", "b"}),
    "logLevel": (["logLevel=Debug"], lambda d: _env(d)["DHAD_LOG_LEVEL"] == "Debug"),
    "trainer.image": (["trainer.image.repository=reg.example.com/tr", "trainer.image.tag=2.0"],
                      lambda d: _env(d)["DHAD_TRAINER_IMAGE"] == "reg.example.com/tr:2.0"),
    "trainer.serviceAccount": (["trainer.serviceAccount.annotations.iam\\.gke\\.io/gcp-service-account=t@p.iam.gserviceaccount.com"],
                               lambda d: json.loads(_env(d)["DHAD_TRAINER_SERVICE_ACCOUNT_ANNOTATIONS"])
                               == {"iam.gke.io/gcp-service-account": "t@p.iam.gserviceaccount.com"}),
    "trainer.allowPrivileged": (["trainer.allowPrivileged=true"], lambda d: _env(d)["DHAD_ALLOW_PRIVILEGED_PODS"] == "true"),
    "storage": (["storage.endpoint=https://minio:9000", "storage.secretName=s3"],
                lambda d: (_env(d)["DHAD_DEFAULT_STORAGE_ENDPOINT"], _env(d)["DHAD_DEFAULT_STORAGE_SECRET"]) == ("https://minio:9000", "s3")),
    "health": (["health.port=9443"], lambda d: _pod(d)["containers"][0]["args"] == ["--liveness=http://0.0.0.0:9443/healthz"]
               and {p["name"]: p["containerPort"] for p in _pod(d)["containers"][0]["ports"]}["health"] == 9443),
    "metrics.port": (["metrics.port=9090"], lambda d: _env(d)["DHAD_METRICS_PORT"] == "9090"
                     and one(d, "Service")["spec"]["ports"][0]["port"] == 9090),
    "metrics.service": (["metrics.service.enabled=false"], lambda d: not any(x["kind"] == "Service" for x in d)),
    "metrics.serviceMonitor": (["metrics.serviceMonitor.enabled=true", "metrics.serviceMonitor.interval=15s",
                                "metrics.serviceMonitor.labels.release=prom"],
                               lambda d: one(d, "ServiceMonitor")["spec"]["endpoints"][0]["interval"] == "15s"
                               and one(d, "ServiceMonitor")["metadata"]["labels"]["release"] == "prom"),
    "listenOnPodIP": (["listenOnPodIP=true"], lambda d: _pod(d)["containers"][0]["args"] == ["--liveness=http://$(POD_IP):8081/healthz"]
                      and _env(d)["DHAD_METRICS_ADDRESS"] == "$(POD_IP)" and _env(d)["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}),
    "serviceAccount": (["serviceAccount.name=op", "serviceAccount.annotations.a=b"],
                       lambda d: one(d, "ServiceAccount")["metadata"] == {**one(d, "ServiceAccount")["metadata"], "name": "op", "annotations": {"a": "b"}}
                       and _pod(d)["serviceAccountName"] == "op"
                       and {s["name"] for x in d if x["kind"].endswith("Binding") for s in x["subjects"]} == {"op"}),
    "rbac.aggregatedRoles": (["rbac.aggregatedRoles=false"], lambda d: not [x for x in d if x["metadata"]["name"] in ("dhad-edit", "dhad-view")]),
    "podDisruptionBudget": (["podDisruptionBudget.enabled=true", "podDisruptionBudget.minAvailable=1"],
                            lambda d: one(d, "PodDisruptionBudget")["spec"]["minAvailable"] == 1),
    "networkPolicy": (["networkPolicy.enabled=true", "networkPolicy.apiServerPorts={6443}",
                       "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring"],
                      lambda d: one(d, "NetworkPolicy")["spec"]["egress"] == [{"ports": [{"port": 6443, "protocol": "TCP"}]}]
                      and one(d, "NetworkPolicy")["spec"]["ingress"][1]["from"] == [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}]),
    "resources": (["resources.limits.memory=1Gi"], lambda d: _pod(d)["containers"][0]["resources"]["limits"] == {"memory": "1Gi"}),
    "podAnnotations": (["podAnnotations.a=b"], lambda d: one(d, "Deployment")["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}),
    "podLabels": (["podLabels.team=ml"], lambda d: one(d, "Deployment")["spec"]["template"]["metadata"]["labels"]["team"] == "ml"),
    "nodeSelector": (["nodeSelector.pool=system"], lambda d: _pod(d)["nodeSelector"] == {"pool": "system"}),
    "tolerations": (["tolerations[0].key=k", "tolerations[0].operator=Exists"], lambda d: _pod(d)["tolerations"] == [{"key": "k", "operator": "Exists"}]),
    "affinity": (["affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].weight=1",
                  "affinity.podAntiAffinity.preferredDuringSchedulingIgnoredDuringExecution[0].podAffinityTerm.topologyKey=kubernetes.io/hostname"],
                 lambda d: _pod(d)["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 1),
    "priorityClassName": (["priorityClassName=system-cluster-critical"], lambda d: _pod(d)["priorityClassName"] == "system-cluster-critical"),
    "monitoring.grafanaDashboard": (["monitoring.grafanaDashboard.enabled=true", "monitoring.grafanaDashboard.namespace=monitoring",
                                     "monitoring.grafanaDashboard.labels.grafana_dashboard=yes",
                                     "monitoring.grafanaDashboard.annotations.grafana_folder=ML"],
                                    lambda d: (one(d, "ConfigMap")["metadata"]["namespace"], one(d, "ConfigMap")["metadata"]["labels"]["grafana_dashboard"],
                                               one(d, "ConfigMap")["metadata"]["annotations"]) == ("monitoring", "yes", {"grafana_folder": "ML"})),
    "monitoring.prometheusRule": (["monitoring.prometheusRule.enabled=true", "monitoring.prometheusRule.labels.release=prom",
                                   "monitoring.prometheusRule.severity=critical", "monitoring.prometheusRule.failedFor=5m",
                                   "monitoring.prometheusRule.noProgressMinutes=45", "monitoring.prometheusRule.restartStorm.restarts=5",
                                   "monitoring.prometheusRule.restartStorm.window=30m"],
                                  lambda d: one(d, "PrometheusRule")["metadata"]["labels"]["release"] == "prom"
                                  and {a["labels"]["severity"] for a in _alerts(d).values()} == {"critical"}
                                  and _alerts(d)["DhadJobFailed"]["for"] == "5m"
                                  and _alerts(d)["DhadJobNoProgress"]["expr"].splitlines()[0].endswith("> 2700")
                                  and _alerts(d)["DhadJobRestartStorm"]["expr"].endswith("[30m])) >= 5")),
}


def _alerts(docs: list[dict]) -> dict:
    """The PrometheusRule's alerts by name."""
    return {r["alert"]: r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]}


def _leaf_keys(values: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in values.items():
        path = f"{prefix}{key}"
        keys |= _leaf_keys(value, path + ".") if isinstance(value, dict) and value else {path}
    return keys


def test_every_value_has_a_row_showing_its_effect():
    leaves = _leaf_keys(yaml.safe_load((CHART / "values.yaml").read_text()))
    uncovered = {k for k in leaves if not any(k == row or k.startswith(row + ".") for row in EFFECTS)}
    assert not uncovered, f"values without a test of their effect: {sorted(uncovered)}"


@pytest.mark.parametrize("key", sorted(EFFECTS))
def test_value_changes_what_is_rendered(control_plane, helm_home, key):
    sets, shows = EFFECTS[key]
    default = render(control_plane, helm_home, "dhad", "dhad-system")
    changed = render(control_plane, helm_home, "dhad", "dhad-system", *sets)
    assert shows(changed), f"{key}: {sets} did not show"
    try:
        already = shows(default)
    except (KeyError, IndexError, AssertionError):  # the field or object the row looks at is absent by default
        already = False
    assert not already, f"{key}: the default already shows it, so the test proves nothing"


def test_optional_pdb_and_network_policy_are_accepted_by_the_apiserver(control_plane, helm_home, namespace):
    docs = render(control_plane, helm_home, "dhad", namespace, "podDisruptionBudget.enabled=true", "networkPolicy.enabled=true")
    kinds = [d for d in docs if d["kind"] in ("PodDisruptionBudget", "NetworkPolicy")]
    assert len(kinds) == 2
    done = kubectl(control_plane, "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(kinds), check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("built_in,allowed,refused", [
    ("admin", ["create", "delete", "get", "list", "watch", "patch"], ["patch-status"]),
    ("edit", ["create", "delete", "get", "list", "watch", "update"], ["patch-status"]),
    ("view", ["get", "list", "watch"], ["create", "delete", "patch", "patch-status"]),
])
def test_aggregated_roles_let_namespace_users_run_and_read_jobs(installed, kube, control_plane, built_in, allowed, refused):
    """dhad-<release>-edit/-view carry the aggregate-to-admin/edit/view labels: a user bound to the built-in
    role in any namespace gets them once the aggregation controller has merged them in."""
    release, ns, _, applied = installed
    assert applied.returncode == 0, applied.stderr
    user = f"{built_in}-user-{uuid.uuid4().hex[:4]}"
    rbac = client.RbacAuthorizationV1Api(kube)
    rbac.create_namespaced_role_binding(OTHER_FOR_USERS, {"metadata": {"name": user}, "roleRef": {
        "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": built_in},
        "subjects": [{"kind": "User", "name": user, "apiGroup": "rbac.authorization.k8s.io"}]})

    def may_on(resource: str, verb: str) -> bool:
        sub = "status" if verb == "patch-status" else None
        review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(user=user, resource_attributes=client.V1ResourceAttributes(
            verb=verb.split("-")[0], group="dhad.dev", resource=resource, subresource=sub, namespace=OTHER_FOR_USERS)))
        return client.AuthorizationV1Api(kube).create_subject_access_review(review).status.allowed

    def may(verb: str) -> bool:  # a job kind and a Pipeline alike
        return all(may_on(resource, verb) for resource in ("sftjobs", "pipelines"))

    wait_for(lambda: all(may(v) for v in allowed), 60, f"{built_in} aggregates {release}'s roles")
    assert [(r, v) for v in refused for r in ("sftjobs", "pipelines") if may_on(r, v)] == []


@pytest.fixture(scope="module", autouse=True)
def _users_namespace(kube):
    client.CoreV1Api(kube).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=OTHER_FOR_USERS)))
    yield
    client.CoreV1Api(kube).delete_namespace(OTHER_FOR_USERS)

