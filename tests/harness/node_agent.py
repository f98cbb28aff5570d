"""A test-only node agent that plays the kubelet for one or two real nodes of the test control plane.

It registers each Node (label `dhad.test/agent: "true"`, no kwok annotation, so kwok leaves it alone),
renews its Lease and Ready condition, and runs every pod bound to it as a local process (see
`podrun.PodRun`), reporting phase, podIP, exit code and termination message through pods/status.
Graceful deletion is honoured: SIGTERM to the process group, SIGKILL after the (capped) grace
period, then the pod is deleted with grace 0. Pods are polled (every `poll` s), not watched.
Probes run as a kubelet runs them (`podrun.Prober`): Ready follows the readiness probe, a failed
liveness probe kills the container, and containers are restarted per restartPolicy (Always,
OnFailure) with a doubling back-off (`crash_backoff`, shorter than the kubelet's 10 s..5 min).

Use the `node_agent` session fixture (import it into a test module or conftest) and put
`nodeSelector: {dhad.test/agent: "true"}` on pods that must really run.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
import urllib3

from .controlplane import ControlPlane
from .podrun import VENV_BIN, ConfigError, PodRun

AGENT_LABEL = "dhad.test/agent"
NODE_SELECTOR = {AGENT_LABEL: "true"}
# The agent's nodes are tainted, so only pods that ask land there: kwok-only tests' CPU pods once landed on them
# and really ran (hanging without S3) when the session's agent had started before them.
TOLERATION = {"key": AGENT_LABEL, "operator": "Exists", "effect": "NoSchedule"}
ON_AGENT = {"nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION]}  # a job's podTemplate for the agent's nodes
HOST_IP = "127.0.0.1"
log = logging.getLogger("dhad.test.node_agent")


class ApiError(Exception):
    def __init__(self, status: int, text: str):
        super().__init__(f"{status}: {text[:500]}")
        self.status = status


class Api:
    """Raw JSON over HTTPS with the admin client certificate (camelCase dicts, as the kubelet sees them)."""

    def __init__(self, cp: ControlPlane):
        self.server = cp.server
        self.http = urllib3.PoolManager(maxsize=4, cert_reqs="CERT_REQUIRED", ca_certs=str(cp.pki.ca_cert),
                                        cert_file=str(cp.pki.admin_cert), key_file=str(cp.pki.admin_key))

    def request(self, method: str, path: str, body=None, patch: str | None = None, **query) -> dict:
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        ctype = f"application/{patch}-patch+json" if patch else "application/json"
        resp = self.http.request(method, url, body=None if body is None else json.dumps(body),
                                 headers={"Content-Type": ctype, "Accept": "application/json"}, timeout=15, retries=False)
        if resp.status >= 400:
            raise ApiError(resp.status, resp.data.decode(errors="replace"))
        return json.loads(resp.data) if resp.data else {}

    def get_opt(self, path: str) -> dict | None:
        try:
            return self.request("GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise


def _now(micro: bool = False) -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


class NodeAgent:
    """Plays the kubelet for `nodes`; `start()`/`stop()` or use as a context manager."""

    def __init__(self, cp: ControlPlane, workdir: Path, nodes: tuple[str, ...] = ("dhad-agent-0", "dhad-agent-1"),
                 gpus: int | None = 0, heartbeat: float = 2.0, poll: float = 0.3, max_grace: float = 10.0,
                 ip_prefix: str = "127.0.1", venv_bin: Path = VENV_BIN, keep: tuple[Path, ...] = (),
                 crash_backoff: tuple[float, float] = (1.0, 10.0), label: str = "true"):
        self.api, self.api_url, self.workdir = Api(cp), cp.server, Path(workdir)
        self.venv_bin, self.keep, self.crash_backoff = Path(venv_bin), tuple(keep), crash_backoff
        self.selector = {AGENT_LABEL: label}  # the nodeSelector that lands pods on this agent's nodes
        self.nodes, self.gpus, self.heartbeat, self.poll, self.max_grace = tuple(nodes), gpus, heartbeat, poll, max_grace
        self.ip_prefix, self._next_ip = ip_prefix, 0
        self.runs: dict[str, PodRun] = {}
        self.node_uids: dict[str, str] = {}
        self._deleted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> NodeAgent:
        """Registers the nodes and returns once the node-lifecycle controller has found them Ready."""
        (self.workdir / "pods").mkdir(parents=True, exist_ok=True)
        for name in self.nodes:
            self._register(name)
        for target in (self._heartbeat_loop, self._sync_loop):
            thread = threading.Thread(target=target, name=f"node-agent-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        deadline = time.monotonic() + timeout
        while not all(self.node_ready(n, untainted=True) for n in self.nodes):
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"agent nodes {self.nodes} not Ready and untainted after {timeout:.0f} s")
            time.sleep(0.3)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=20)
        with self._lock:
            for run in self.runs.values():
                if run.proc and run.proc.poll() is None:
                    run.signal(9)
                    run.proc.wait(timeout=10)
        for name in self.nodes:
            try:
                self.api.request("DELETE", f"/api/v1/nodes/{name}")
            except Exception as error:  # noqa: BLE001 - the control plane may be gone already
                log.debug("deleting node %s: %s", name, error)

    # --- queries for tests -------------------------------------------------------------------------
    def node_ready(self, name: str, untainted: bool = False) -> bool:
        node = self.api.get_opt(f"/api/v1/nodes/{name}") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in node.get("status", {}).get("conditions") or [])
        taints = [t for t in node.get("spec", {}).get("taints") or [] if t["key"].startswith("node.kubernetes.io/")]
        return ready and not (untainted and taints)

    def pod_log(self, namespace: str, name: str) -> str:
        """stdout+stderr of the newest run of that pod ('' when the agent never ran it)."""
        runs = [r for r in list(self.runs.values()) if (r.ns, r.name) == (namespace, name)]
        return runs[-1].log() if runs else ""

    def logs(self, namespace: str) -> str:
        """Every pod log of a namespace, headed by pod name: for assertion messages."""
        return "\n".join(f"--- {r.name} ---\n{r.log()}" for r in list(self.runs.values()) if r.ns == namespace)

    # --- node and lease ----------------------------------------------------------------------------
    def _register(self, name: str) -> None:
        capacity = {"cpu": "16", "memory": "64Gi", "pods": "110"}
        if self.gpus is not None:
            capacity["nvidia.com/gpu"] = str(self.gpus)
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                  **self.selector, "type": "dhad-node-agent"}
        taints = [{"key": AGENT_LABEL, "value": self.selector[AGENT_LABEL], "effect": "NoSchedule"}]
        body = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}, "spec": {"taints": taints}}
        try:
            node = self.api.request("POST", "/api/v1/nodes", body)
        except ApiError as error:
            if error.status != 409:
                raise
            node = self.api.request("PATCH", f"/api/v1/nodes/{name}", {"metadata": {"labels": labels}, "spec": {"taints": taints}},
                                    patch="merge")
        self.node_uids[name] = node["metadata"]["uid"]
        status = {"capacity": capacity, "allocatable": capacity,
                  "addresses": [{"type": "InternalIP", "address": HOST_IP}, {"type": "Hostname", "address": name}],
                  "nodeInfo": {"kubeletVersion": "v1.37.2-dhad-agent", "operatingSystem": "linux", "architecture": "amd64",
                               "containerRuntimeVersion": "dhad-agent://0", "kernelVersion": "", "osImage": "",
                               "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
                  "conditions": self._conditions()}
        self.api.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": status}, patch="strategic-merge")

    @staticmethod
    def _conditions() -> list[dict]:
        now = _now()
        quiet = [(t, "False", f"KubeletHas{r}") for t, r in
                 (("MemoryPressure", "SufficientMemory"), ("DiskPressure", "NoDiskPressure"), ("PIDPressure", "SufficientPID"))]
        return [{"type": t, "status": s, "reason": r, "message": "dhad test node agent", "lastHeartbeatTime": now,
                 "lastTransitionTime": now} for t, s, r in [*quiet, ("Ready", "True", "KubeletReady")]]

    def _renew(self, name: str) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{name}"
        try:
            self.api.request("PATCH", path, {"spec": {"renewTime": _now(micro=True), "holderIdentity": name}}, patch="merge")
        except ApiError as error:
            if error.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": self.node_uids[name]}
            self.api.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
                "metadata": {"name": name, "ownerReferences": [owner]},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": _now(micro=True)}})

    def _heartbeat_loop(self) -> None:
        last_status = 0.0
        while not self._stop.is_set():
            status_due = time.monotonic() - last_status > 10
            last_status = time.monotonic() if status_due else last_status
            for name in self.nodes:
                try:
                    self._renew(name)
                    if status_due:
                        self.api.request("PATCH", f"/api/v1/nodes/{name}/status",
                                         {"status": {"conditions": self._conditions()}}, patch="strategic-merge")
                except Exception as error:  # noqa: BLE001 - keep beating; the next try may work
                    log.warning("heartbeat for %s: %s", name, error)
            self._stop.wait(self.heartbeat)

    # --- pods --------------------------------------------------------------------------------------
    def _sync_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except Exception:  # noqa: BLE001 - a failed round is retried on the next tick
                log.exception("node agent sync")
            self._stop.wait(self.poll)

    def _sync(self) -> None:
        seen = set()
        for node in self.nodes:
            pods = self.api.request("GET", "/api/v1/pods", fieldSelector=f"spec.nodeName={node}")["items"]
            for pod in pods:
                seen.add(pod["metadata"]["uid"])
                with self._lock:
                    self._sync_pod(pod)
        with self._lock:
            for uid, run in list(self.runs.items()):
                if uid not in seen and not run.done:  # force-deleted: nobody to report to
                    run.signal(9)
                    run.done = True
            self._update_hosts()

    def _allocate_ip(self) -> str:
        used = {r.ip for r in self.runs.values() if not r.done}
        for _ in range(254):
            self._next_ip = self._next_ip % 254 + 1
            ip = f"{self.ip_prefix}.{self._next_ip}"
            if ip not in used:
                return ip
        raise RuntimeError("node agent: no free pod IP")

    def _sync_pod(self, pod: dict) -> None:
        meta, uid = pod["metadata"], pod["metadata"]["uid"]
        deleting = meta.get("deletionTimestamp") is not None
        run = self.runs.get(uid)
        if run is None:
            if deleting or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                if deleting:  # never started here: nothing to stop
                    self._delete(pod)
                return
            pod_dir = self.workdir / "pods" / f"{meta['namespace']}_{meta['name']}_{uid[:8]}"
            pod_dir.mkdir(parents=True, exist_ok=True)
            run = self.runs[uid] = PodRun(self.api, pod, pod_dir, self._allocate_ip(), HOST_IP, self.api_url,
                                          self.venv_bin, self.keep)
            self._update_hosts()
        run.pod = pod
        if run.done:
            if deleting:
                self._delete(pod)
            return
        if run.proc is None:
            if deleting:
                run.done = True
                self._delete(pod)
            elif time.monotonic() >= run.retry_at:
                self._start(run)
            return
        grace = meta.get("deletionGracePeriodSeconds", pod["spec"].get("terminationGracePeriodSeconds", 30))
        if deleting:
            run.terminate(min(float(grace), self.max_grace))
            run.poll_kill()
        elif run.unhealthy and run.kill_at is None:
            log.info("%s/%s: %s; killing the container", run.ns, run.name, run.unhealthy)
            run.terminate(min(float(grace), self.max_grace))
        run.poll_kill()
        code = run.exit_code()
        if code is None:
            if (run.ready, run.started) != run.reported_ready:
                self._report(run, "Running", {"running": {"startedAt": _iso(run.started_at)}}, run.ready)
            return
        if not deleting and run.should_restart(code):
            base, cap = self.crash_backoff
            backoff = min(base * 2 ** run.restarts, cap)
            run.record_exit(code, backoff)
            waiting = {"reason": "CrashLoopBackOff",
                       "message": f"back-off {backoff:.0f}s restarting failed container={run.container['name']} pod={run.name}"}
            self._report(run, "Running", {"waiting": waiting}, False)
            return
        run.done = True
        message = run.termination_message(code)
        terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error", "message": message,
                      "startedAt": _iso(run.started_at), "finishedAt": _iso(run.finished_at),
                      "containerID": f"dhad-agent://{uid}"}
        self._report(run, "Succeeded" if code == 0 else "Failed", {"terminated": terminated}, False)
        if deleting:
            self._delete(pod)

    def _start(self, run: PodRun) -> None:
        try:
            run.write_hosts(self._peers(run))
            run.start()
        except ConfigError as error:
            run.retry_at = time.monotonic() + 2.0
            if (error.reason, str(error)) != run.last_waiting:
                run.last_waiting = (error.reason, str(error))
                self._report(run, "Pending", {"waiting": {"reason": error.reason, "message": str(error)}}, False)
            return
        except Exception as error:  # noqa: BLE001 - an API hiccup: retry later
            run.retry_at = time.monotonic() + 2.0
            log.warning("starting %s/%s: %s", run.ns, run.name, error)
            return
        self._report(run, "Running", {"running": {"startedAt": _iso(run.started_at)}}, run.ready)

    def _report(self, run: PodRun, phase: str, state: dict, ready: bool) -> None:
        run.reported_ready = (ready, run.started)
        now, c = _now(), run.container
        flag = "True" if ready else "False"
        why = {} if ready else {"reason": "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"}
        conditions = [{"type": "PodReadyToStartContainers", "status": "True", "lastTransitionTime": now},
                      {"type": "Initialized", "status": "True", "lastTransitionTime": now},
                      {"type": "ContainersReady", "status": flag, "lastTransitionTime": now, **why},
                      {"type": "Ready", "status": flag, "lastTransitionTime": now, **why}]
        status = {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": run.restarts, "ready": ready,
                  "started": "running" in state and run.started,
                  "state": {"waiting": None, "running": None, "terminated": None, **state}}
        if run.last_state:
            last = run.last_state
            status["lastState"] = {"terminated": {**last, "startedAt": _iso(last["startedAt"]), "finishedAt": _iso(last["finishedAt"]),
                                                  "containerID": f"dhad-agent://{run.uid}"}}
        if "waiting" not in state:
            status["containerID"] = f"dhad-agent://{run.uid}"
        body = {"status": {"phase": phase, "hostIP": HOST_IP, "hostIPs": [{"ip": HOST_IP}], "podIP": run.ip,
                           "podIPs": [{"ip": run.ip}], "startTime": _iso(run.started_at or time.time()),
                           "conditions": conditions, "containerStatuses": [status]}}
        try:
            self.api.request("PATCH", f"/api/v1/namespaces/{run.ns}/pods/{run.name}/status", body, patch="strategic-merge")
        except ApiError as error:
            log.warning("status of %s/%s: %s", run.ns, run.name, error)

    def _delete(self, pod: dict) -> None:
        """What the kubelet does once a deleted pod's containers are gone: delete it with grace 0."""
        meta = pod["metadata"]
        if meta["uid"] in self._deleted:
            return
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}}
        try:
            self.api.request("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}", body)
        except ApiError as error:
            if error.status not in (404, 409):
                log.warning("deleting %s/%s: %s", meta["namespace"], meta["name"], error)
                return
        self._deleted.add(meta["uid"])

    def _peers(self, run: PodRun) -> list[PodRun]:
        return [p for p in self.runs.values() if not p.done and p.ns == run.ns
                and (p is run or (run.subdomain and p.subdomain == run.subdomain))]

    def _update_hosts(self) -> None:
        for run in self.runs.values():
            if not run.done and run.proc is not None:
                run.write_hosts(self._peers(run))


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


_SHARED: dict = {}


@pytest.fixture(scope="session")
def node_agent(control_plane, tmp_path_factory) -> NodeAgent:
    """One agent for two nodes (`dhad-agent-0/1`) per session, shared by every module that imports this."""
    if "agent" not in _SHARED:
        _SHARED["agent"] = NodeAgent(control_plane, tmp_path_factory.mktemp("node-agent")).start()
    _SHARED["users"] = _SHARED.get("users", 0) + 1
    yield _SHARED["agent"]
    _SHARED["users"] -= 1
    if not _SHARED["users"]:
        _SHARED.pop("agent").stop()
