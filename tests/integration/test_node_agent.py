"""The test node agent really plays the kubelet: a 2-node torchrun job rendezvouses by pod DNS names,
env and volumes resolve as on a real node, exit codes and termination messages come back, graceful
deletion gives the process its SIGTERM, and the node stays Ready."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import wait_for
from tests.harness.node_agent import NODE_SELECTOR, TOLERATION, NodeAgent, node_agent  # noqa: F401 - the fixture
from tests.harness.processes import free_port

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.cluster

RING = """
import os, socket, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(t)
if os.environ["LOCAL_RANK"] == "0":
    master = socket.gethostbyname(os.environ["MASTER_ADDR"])
    with open("/dev/termination-log", "w") as f:
        f.write(f"sum={int(t.item())} world={dist.get_world_size()} host={socket.gethostname()} master={master}")
dist.destroy_process_group()
"""

PROBE = """
import json, os, socket, ssl, urllib.error, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
url = "https://" + os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]
req = urllib.request.Request(url + "/api/v1/namespaces/kube-system/secrets",
                             headers={"Authorization": "Bearer " + open(sa + "/token").read()})
try:
    urllib.request.urlopen(req, context=ssl.create_default_context(cafile=sa + "/ca.crt"))
    who = "allowed"
except urllib.error.HTTPError as error:
    who = json.loads(error.read())["message"]
keys = ["A", "B", "C", "D", "POD", "NS", "IP", "NODE", "SA", "SECRET", "CM", "DHAD_KUBE_API"]
out = {k: os.environ.get(k) for k in keys}
out.update(hostname=socket.gethostname(), me=socket.gethostbyname(socket.gethostname()), who=who,
           ns_file=open(sa + "/namespace").read(), job=open("/etc/dhad/job.json").read())
open("/dev/termination-log", "w").write(json.dumps(out))
"""


def pod(name: str, command: list[str], **spec) -> dict:
    container = {"name": "main", "image": "dhad/trainer:test", "command": command,
                 **spec.pop("container", {})}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION],
                     "containers": [container]} | spec}


def terminated(core, ns: str, name: str):
    """The container's terminated state once the pod has a final phase, else None."""
    p = core.read_namespaced_pod(name, ns)
    if p.status.phase in ("Succeeded", "Failed"):
        return p.status.phase, p.status.container_statuses[0].state.terminated


def test_two_pod_indexed_job_runs_torchrun_gloo_all_reduce(kube, namespace, node_agent):  # noqa: F811
    core, batch = client.CoreV1Api(kube), client.BatchV1Api(kube)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "ring"}, "data": {"ring.py": RING}})
    core.create_namespaced_service(namespace, {"metadata": {"name": "ring-svc"}, "spec": {
        "clusterIP": "None", "selector": {"app": "ring"}, "ports": [{"name": "rdzv", "port": 29500}]}})
    torchrun = (f"torchrun --nnodes 2 --nproc-per-node 1 --node-rank $JOB_COMPLETION_INDEX --master-addr ring-0.ring-svc "
                f"--master-port {free_port()} --local-addr $HOSTNAME /scripts/ring.py")
    template = pod("x", ["bash", "-c", torchrun], subdomain="ring-svc",
                   volumes=[{"name": "scripts", "configMap": {"name": "ring"}},
                            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}],
                   container={"env": [{"name": "MASTER_ADDR", "value": "ring-0.ring-svc"}],
                              "terminationMessagePolicy": "FallbackToLogsOnError",
                              "volumeMounts": [{"name": "scripts", "mountPath": "/scripts", "readOnly": True},
                                               {"name": "dshm", "mountPath": "/dev/shm"}]})
    batch.create_namespaced_job(namespace, {"metadata": {"name": "ring"}, "spec": {
        "completionMode": "Indexed", "completions": 2, "parallelism": 2, "backoffLimit": 0,
        "template": {"metadata": {"labels": {"app": "ring"}}, "spec": template["spec"]}}})

    def done():
        pods = core.list_namespaced_pod(namespace, label_selector="job-name=ring").items
        return len(pods) == 2 and all(p.status.phase in ("Succeeded", "Failed") for p in pods) and pods

    pods = wait_for(done, 90, "both ring pods finished")
    by_index = {p.metadata.annotations["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert all(p.status.phase == "Succeeded" for p in pods), node_agent.logs(namespace)
    master_ip = by_index["0"].status.pod_ip
    for index, p in by_index.items():
        message = p.status.container_statuses[0].state.terminated.message
        assert message == f"sum=3 world=2 host=ring-{index} master={master_ip}", node_agent.logs(namespace)
    wait_for(lambda: batch.read_namespaced_job("ring", namespace).status.succeeded == 2, 30, "Job succeeded")


def test_env_volumes_and_service_account_token_resolve_as_on_a_kubelet(kube, namespace, node_agent, control_plane):  # noqa: F811
    core = client.CoreV1Api(kube)
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "job"}, "data": {"job.json": '{"kind": "SFTJob"}'}})
    env = [{"name": "A", "value": "alpha"}, {"name": "B", "value": "$(A)-beta"}, {"name": "C", "value": "$$(A)"},
           {"name": "D", "value": "$(NOPE)"},
           *({"name": k, "valueFrom": {"fieldRef": {"fieldPath": f}}} for k, f in
             [("POD", "metadata.name"), ("NS", "metadata.namespace"), ("IP", "status.podIP"), ("NODE", "spec.nodeName"),
              ("SA", "spec.serviceAccountName")]),
           {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
           {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "job", "key": "job.json"}}}]
    core.create_namespaced_pod(namespace, pod("probe", ["python", "-c", PROBE], hostname="probe-0",
                                              volumes=[{"name": "job", "configMap": {"name": "job"}}],
                                              container={"env": env, "volumeMounts": [{"name": "job", "mountPath": "/etc/dhad"}]}))
    phase, state = wait_for(lambda: terminated(core, namespace, "probe"), 60, "probe finished")
    assert phase == "Succeeded", node_agent.pod_log(namespace, "probe")
    out = json.loads(state.message)
    p = core.read_namespaced_pod("probe", namespace)
    assert out | {"who": None} == {
        "A": "alpha", "B": "alpha-beta", "C": "$(A)", "D": "$(NOPE)", "POD": "probe", "NS": namespace,
        "IP": p.status.pod_ip, "NODE": p.spec.node_name, "SA": "default", "SECRET": "s3cr3t", "CM": '{"kind": "SFTJob"}',
        "DHAD_KUBE_API": control_plane.server, "hostname": "probe-0", "me": p.status.pod_ip, "who": None,
        "ns_file": namespace, "job": '{"kind": "SFTJob"}'}
    assert p.status.pod_ip.startswith("127.0.1.")
    assert f"system:serviceaccount:{namespace}:default" in out["who"]  # authenticated by token + CA, 403 by RBAC

    missing = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]
    core.create_namespaced_pod(namespace, pod("needs-secret", ["sh", "-c", 'printf "%s" "$KEY" > /dev/termination-log'],
                                              container={"env": missing}))

    def waiting():
        statuses = core.read_namespaced_pod("needs-secret", namespace).status.container_statuses or []
        return statuses and statuses[0].state.waiting

    state = wait_for(waiting, 30, "needs-secret waiting")
    assert state.reason == "CreateContainerConfigError" and state.message == 'secret "absent" not found'
    assert core.read_namespaced_pod("needs-secret", namespace).status.phase == "Pending"
    core.create_namespaced_secret(namespace, {"metadata": {"name": "absent"}, "stringData": {"k": "late"}})
    phase, state = wait_for(lambda: terminated(core, namespace, "needs-secret"), 30, "needs-secret ran once the secret exists")
    assert (phase, state.message) == ("Succeeded", "late")


def test_exit_code_and_termination_message_fail_the_pod(kube, namespace, node_agent):  # noqa: F811
    core = client.CoreV1Api(kube)
    core.create_namespaced_pod(namespace, pod("exit3", ["sh", "-c", "echo 'bad config: lr' > /dev/termination-log; exit 3"]))
    core.create_namespaced_pod(namespace, pod("logs", ["sh", "-c", "echo noise; echo boom-from-logs >&2; exit 4"],
                                              container={"terminationMessagePolicy": "FallbackToLogsOnError"}))
    phase, state = wait_for(lambda: terminated(core, namespace, "exit3"), 30, "exit3 finished")
    assert (phase, state.exit_code, state.reason, state.message) == ("Failed", 3, "Error", "bad config: lr\n")
    phase, state = wait_for(lambda: terminated(core, namespace, "logs"), 30, "logs finished")
    assert (phase, state.exit_code, state.message) == ("Failed", 4, "noise\nboom-from-logs")


def test_graceful_deletion_sends_sigterm_then_sigkill_after_the_grace_period(kube, namespace, node_agent, tmp_path):  # noqa: F811
    core = client.CoreV1Api(kube)
    volume = [{"name": "out", "hostPath": {"path": str(tmp_path)}}]
    mount = {"volumeMounts": [{"name": "out", "mountPath": "/out"}]}
    polite = "trap 'echo term > /out/polite; exit 0' TERM; touch /out/polite-up; while true; do sleep 0.1; done"
    stubborn = "trap '' TERM; touch /out/stubborn-up; while true; do sleep 0.1; done"
    core.create_namespaced_pod(namespace, pod("polite", ["bash", "-c", polite], volumes=volume, container=mount))
    core.create_namespaced_pod(namespace, pod("stubborn", ["bash", "-c", stubborn], volumes=volume, container=mount))
    wait_for(lambda: (tmp_path / "polite-up").exists() and (tmp_path / "stubborn-up").exists(), 30, "both pods running")
    assert core.read_namespaced_pod("polite", namespace).status.phase == "Running"

    def gone(name):
        return not [p for p in core.list_namespaced_pod(namespace).items if p.metadata.name == name]

    start = time.monotonic()
    core.delete_namespaced_pod("polite", namespace, grace_period_seconds=30)
    core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=3)
    wait_for(lambda: gone("polite"), 15, "polite pod deleted")
    assert (tmp_path / "polite").read_text() == "term\n"
    assert time.monotonic() - start < 8, "a pod that exits on SIGTERM must not wait out its (10 s capped) grace"
    wait_for(lambda: gone("stubborn"), 15, "stubborn pod deleted")
    assert time.monotonic() - start >= 3, "SIGKILL came before the grace period was over"


def test_node_lease_is_renewed_and_the_node_stays_ready(kube, node_agent):  # noqa: F811
    coord, core = client.CoordinationV1Api(kube), client.CoreV1Api(kube)
    for name in node_agent.nodes:
        first = coord.read_namespaced_lease(name, "kube-node-lease").spec.renew_time
        wait_for(lambda: coord.read_namespaced_lease(name, "kube-node-lease").spec.renew_time > first,  # noqa: B023
                 3 * node_agent.heartbeat + 5, f"lease of {name} renewed")
        node = core.read_node(name)
        assert node_agent.node_ready(name, untainted=True), node.spec.taints
        assert "kwok.x-k8s.io/node" not in (node.metadata.annotations or {})
        assert node.metadata.labels["dhad.test/agent"] == "true"


HEALTH_SERVER = """
import http.server, os, pathlib
out = pathlib.Path("/out")
with open(out / "starts", "a") as f:
    f.write("start\\n")
first = len((out / "starts").read_text().splitlines()) == 1

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        sick = first and (out / "sick").exists()
        self.send_response(500 if sick else 200)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler).serve_forever()
"""


def test_probes_drive_ready_and_a_failed_liveness_probe_restarts_the_container(kube, namespace, node_agent, tmp_path):  # noqa: F811
    """tcpSocket startup probe, exec readiness probe (inside the pod's mounts), httpGet liveness probe on a
    named port; restartPolicy Always restarts the killed container with restartCount and lastState."""
    core = client.CoreV1Api(kube)
    fast = {"periodSeconds": 1, "failureThreshold": 2}
    container = {
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "volumeMounts": [{"name": "out", "mountPath": "/out"}],
        "startupProbe": {"tcpSocket": {"port": 8080}, **fast, "failureThreshold": 20},
        "readinessProbe": {"exec": {"command": ["test", "-f", "/out/ready"]}, **fast},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, **fast},
    }
    core.create_namespaced_pod(namespace, pod("probed", ["python", "-c", HEALTH_SERVER], restartPolicy="Always",
                                              volumes=[{"name": "out", "hostPath": {"path": str(tmp_path)}}],
                                              container=container))

    def status():
        p = core.read_namespaced_pod("probed", namespace)
        statuses = p.status.container_statuses or []
        ready = next((c.status == "True" for c in p.status.conditions or [] if c.type == "Ready"), False)
        return p.status.phase, ready, statuses[0] if statuses else None

    wait_for(lambda: (s := status())[0] == "Running" and s[2] and s[2].started, 30, "the startup probe passed")
    time.sleep(2.5)  # readiness probed at least twice while /out/ready is absent
    assert status()[1] is False, "Ready before the readiness probe passed"
    (tmp_path / "ready").touch()
    wait_for(lambda: status()[1], 15, "Ready once the exec readiness probe passes")
    assert status()[2].restart_count == 0
    (tmp_path / "sick").touch()
    wait_for(lambda: status()[2].restart_count == 1, 30, "the container restarted after its liveness probe failed")
    phase, _, container_status = wait_for(lambda: (s := status())[1] and s, 30, "Ready again after the restart")
    assert phase == "Running" and container_status.last_state.terminated.exit_code == 143  # SIGTERM from the agent
    assert (tmp_path / "starts").read_text() == "start\nstart\n"


LOOK_AROUND = """
import json, os, shutil, sys
import dhad_api
open("/tmp/written-in-the-pod", "w").write("x")
out = {"python": shutil.which("python"), "executable": sys.executable, "dhad_api": dhad_api.__file__,
       "sentinel_visible": os.path.exists(os.environ["SENTINEL"]), "tmp": sorted(os.listdir("/tmp")),
       "job": open("/etc/probe/job.json").read()}
open("/dev/termination-log", "w").write(json.dumps(out))
"""


def test_a_clone_under_tmp_with_a_space_keeps_its_interpreter_and_a_private_tmp(kube, namespace, control_plane):
    """Issue 13.2: the node agent's private /tmp hid a venv living under /tmp ("python: not found"), and
    unquoted paths broke on spaces. A clone of the repository under `/tmp/dhad clone .../` with its own
    venv runs a pod: python is the clone's, the clone's code is imported, /tmp is private both ways."""
    import tempfile
    import uuid

    root = Path(tempfile.mkdtemp(prefix="dhad clone ", dir="/tmp"))
    clone = root / "my repo"
    sentinel = Path("/tmp") / f"dhad-host-only-{uuid.uuid4().hex[:8]}"
    try:
        for package in ("api", "operator", "trainer"):
            shutil.copytree(REPO / package, clone / package, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(clone / ".venv")], check=True)
        site = next((clone / ".venv" / "lib").glob("python3*/site-packages"))
        project_site = next((REPO / ".venv" / "lib").glob("python3*/site-packages"))
        (site / "dhad-clone.pth").write_text("".join(f"{clone / p}\n" for p in ("api", "operator", "trainer")) + f"{project_site}\n")
        sentinel.write_text("the host's /tmp")
        core = client.CoreV1Api(kube)
        core.create_namespaced_config_map(namespace, {"metadata": {"name": "job"}, "data": {"job.json": '{"kind": "SFTJob"}'}})
        agent = NodeAgent(control_plane, root / "agent work", nodes=("dhad-agent-clone",), ip_prefix="127.0.3",
                          venv_bin=clone / ".venv" / "bin", keep=(clone,), label="clone").start()
        try:
            core.create_namespaced_pod(namespace, pod(
                "clone", ["python", "-c", LOOK_AROUND], nodeSelector=agent.selector,
                volumes=[{"name": "job", "configMap": {"name": "job"}}],
                container={"env": [{"name": "SENTINEL", "value": str(sentinel)}],
                           "volumeMounts": [{"name": "job", "mountPath": "/etc/probe"}]}))
            phase, state = wait_for(lambda: terminated(core, namespace, "clone"), 60, "the clone's pod finished")
            assert phase == "Succeeded", agent.pod_log(namespace, "clone")
        finally:
            agent.stop()
        out = json.loads(state.message)
        assert out["python"] == str(clone / ".venv" / "bin" / "python") == out["executable"]
        assert out["dhad_api"] == str(clone / "api" / "dhad_api" / "__init__.py")
        assert out["job"] == '{"kind": "SFTJob"}'
        assert out["sentinel_visible"] is False, "the host's /tmp leaked into the pod"
        assert "written-in-the-pod" in out["tmp"] and not (Path("/tmp") / "written-in-the-pod").exists()
        # only the kept clone (and this project's own venv, which the clone's .pth imports, where the
        # project itself lives under /tmp), nothing else
        kept = {root.name}
        if REPO.is_relative_to("/tmp"):
            kept.add(REPO.relative_to("/tmp").parts[0])
        assert out["tmp"] == sorted(["written-in-the-pod", *kept]), out["tmp"]
    finally:
        sentinel.unlink(missing_ok=True)
        shutil.rmtree(root, ignore_errors=True)
