"""Dhad's operator against two bare "floor" operators, N jobs at once, on one private control plane.

Why: absolute operator figures on a shared 2-core machine are noise; ratios against the least any
operator must do per job (../shared/benchmarks/operator-floor: kopf, and Go controller-runtime),
measured minutes apart on the same control plane, say what Dhad's extra work costs.

    .venv/bin/python bench/operator_scale.py [--n 500] [--threads 16] [--only kopf,go,dhad,dhad-queued]

One control plane (etcd, kube-apiserver, controller-manager; no scheduler, no kwok: pods are created
but stay Pending). Each operator runs alone, watching all namespaces, on a fresh namespace that is
deleted (and gone) before the next starts. A canary CR proves its watches are up; then N CRs are
created from 16 threads and a watch on Jobs times each CR-to-Job (client side). Per operator:
- all_jobs: seconds from the first create until the N-th Job exists; p50/p99 CR-to-Job latency;
- req/job: the operator's API requests, from the apiserver's own metrics (APF dispatched requests of
  the flow schema the operator's identity alone falls into, "service-accounts"), counted from the first
  create until it is quiet for --quiet s (at most --settle s after the last Job); the same source for
  all operators; Dhad's own dhad_api_requests counter is printed beside it as a cross-check;
- idle req/s: the same count over the next --idle s, with nothing changing (periodic requeues);
- RSS: the operator's peak (VmHWM); CPU: utime+stime (children included) from the first create until
  the end of the settle window.

The floors read `spec.nodes`, which Dhad's CRD prunes, so during their runs sftjobs.dhad.dev is Dhad's
schema plus an integer `spec.nodes` (every CR has the same valid Dhad SFT spec, floors' with nodes: 2);
Dhad's CRD is restored before Dhad's runs. Floor Jobs are suspended; Dhad's are not (pods are
created, Pending), which costs the control plane and Dhad's operator pod events, so "dhad-queued"
reruns Dhad with spec.queueName set: its Jobs are then created suspended, like the floors'.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.harness.controlplane import ControlPlane, control_plane_bin  # noqa: E402
from tests.harness.operator import start_operator  # noqa: E402
from tests.harness.processes import Process  # noqa: E402

FLOOR = REPO / ".." / "shared" / "benchmarks" / "operator-floor"  # run from there, never copied
CACHE = Path(os.environ.get("DHAD_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dhad"))
OPERATOR_USER, OPERATOR_GROUP = "dhad-bench-operator", "system:serviceaccounts"  # APF flow schema "service-accounts"
FLOW_SCHEMA = "service-accounts"
GROUP, VERSION, PLURAL = "dhad.dev", "v1alpha1", "sftjobs"
SPEC = {  # a valid, tiny Dhad SFT spec: nothing to resolve, 2 nodes, no GPUs
    "model": {"uri": "s3://bench/models/tiny"},
    "resources": {"nodes": 2, "gpusPerNode": 0, "cpu": "1", "memory": "1Gi"},
    "storage": {"bucket": "bench"},
    "data": [{"uri": "s3://bench/data/instructions.jsonl", "schema": "messages"}],
    "training": {"maxSteps": 20},
}
ALL = ("kopf", "go", "dhad", "dhad-queued")


def build_floor_go() -> Path:
    """The Go floor built once into the cache, keyed by a hash of its sources."""
    src = FLOOR / "go"
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in ("go.mod", "go.sum", "main.go"))).hexdigest()[:12]
    out = CACHE / "bin" / f"floor-go-{digest}"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOMODCACHE": str(CACHE / "go" / "mod"), "GOCACHE": str(CACHE / "go" / "build"),
               "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "-mod=readonly"}
        print(f"building {out} (minutes, once)", flush=True)
        subprocess.run(["go", "build", "-trimpath", "-o", f"{out}.tmp", "."], cwd=src, env=env, check=True)
        os.replace(f"{out}.tmp", out)
    return out


class Api:
    """Admin clients, and the apiserver's /metrics (the admin cert may read it)."""

    def __init__(self, cp: ControlPlane):
        from kubernetes import client, config

        self.cp = cp
        configuration = client.Configuration()
        config.load_kube_config(config_file=str(cp.kubeconfig), client_configuration=configuration)
        configuration.connection_pool_maxsize = 32  # the 16 load threads, the watch and the metrics scrapes
        api = client.ApiClient(configuration)
        self.client = client
        self.core, self.batch = client.CoreV1Api(api), client.BatchV1Api(api)
        self.custom, self.ext = client.CustomObjectsApi(api), client.ApiextensionsV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self.ssl = ssl.create_default_context(cafile=str(cp.pki.ca_cert))
        self.ssl.load_cert_chain(str(cp.pki.admin_cert), str(cp.pki.admin_key))

    def apiserver_metrics(self) -> dict[str, float]:
        """Operator-attributable and total request counts: {"flow:<schema>": n, "req:<verb> <resource>": n}."""
        text = urllib.request.urlopen(f"{self.cp.server}/metrics", context=self.ssl, timeout=30).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("apiserver_flowcontrol_dispatched_requests_total{"):
                schema = re.search(r'flow_schema="([^"]*)"', line).group(1)
                out[f"flow:{schema}"] = out.get(f"flow:{schema}", 0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith("apiserver_request_total{"):
                verb, resource = (re.search(rf'(?<![a-z_]){k}="([^"]*)"', line) for k in ("verb", "resource"))
                key = f"req:{verb.group(1) if verb else '?'} {resource.group(1) if resource else '?'}"
                out[key] = out.get(key, 0) + float(line.rsplit(" ", 1)[1])
        return out

    def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if value := predicate():
                    return value
            except Exception:  # noqa: BLE001 - retried until the deadline
                pass
            time.sleep(0.25)
        raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def crd_bodies() -> dict[str, dict]:
    return {b["metadata"]["name"]: b for b in (yaml.safe_load(p.read_text()) for p in sorted((REPO / "crds").glob("*.yaml")))}


def with_nodes(body: dict) -> dict:
    """Dhad's SFTJob CRD plus an integer spec.nodes, which the floors read."""
    body = copy.deepcopy(body)
    for version in body["spec"]["versions"]:
        version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["nodes"] = {"type": "integer", "minimum": 1}
    return body


def put_crd(api: Api, body: dict, accepts_nodes: bool) -> None:
    """Create or replace one CRD and wait until the apiserver serves that schema."""
    name = body["metadata"]["name"]
    try:
        current = api.ext.read_custom_resource_definition(name)
        body = {**body, "metadata": {**body["metadata"], "resourceVersion": current.metadata.resource_version}}
        api.ext.replace_custom_resource_definition(name, body)
    except api.client.ApiException as error:
        if error.status != 404:
            raise
        api.ext.create_custom_resource_definition(body)
    api.wait(lambda: any(c.type == "Established" and c.status == "True"
                         for c in api.ext.read_custom_resource_definition(name).status.conditions or []), 60, f"{name} Established")
    if name != f"{PLURAL}.{GROUP}":
        return

    def serves_expected_schema() -> bool:  # a strict dry-run create with spec.nodes fails iff nodes is unknown
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SFTJob", "metadata": {"name": "schema-probe"}, "spec": {**SPEC, "nodes": 2}}
        try:
            api.custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, obj, dry_run="All", field_validation="Strict")
            return accepts_nodes
        except api.client.ApiException as error:
            return not accepts_nodes and error.status in (400, 422) and "nodes" in str(error.body)

    api.wait(serves_expected_schema, 60, f"{name} serving the {'floor' if accepts_nodes else 'Dhad'} schema")


def cpu_seconds(pid: int) -> float:
    """utime + stime of pid, its reaped children (cutime + cstime), and its live descendants."""
    def stat(p: int, children: bool) -> float:
        f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
        return sum(int(x) for x in (f[11:15] if children else f[11:13])) / os.sysconf("SC_CLK_TCK")

    total = stat(pid, True)
    try:
        import psutil

        for child in psutil.Process(pid).children(recursive=True):
            try:
                total += stat(child.pid, False)
            except OSError:
                pass
    except ImportError:
        pass
    return total


def peak_rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


class JobWatch:
    """Watches Jobs in one namespace; records when the first Job of each CR (label dhad.dev/job) appears."""

    def __init__(self, api: Api, namespace: str):
        from kubernetes import watch

        self.seen: dict[str, float] = {}
        self._watch = watch.Watch()
        self._api, self._ns = api, namespace
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(30)

    def _run(self) -> None:
        rv = self._api.batch.list_namespaced_job(self._ns).metadata.resource_version
        self._ready.set()
        while True:
            try:
                for ev in self._watch.stream(self._api.batch.list_namespaced_job, self._ns, resource_version=rv, timeout_seconds=900):
                    job = ev["object"]
                    rv = job.metadata.resource_version
                    owner = (job.metadata.labels or {}).get("dhad.dev/job")
                    if owner:
                        self.seen.setdefault(owner, time.monotonic())
                return
            except Exception:  # noqa: BLE001 - a dropped watch resumes from the last version
                if self._stopped:
                    return
                time.sleep(0.2)

    _stopped = False

    def stop(self) -> None:
        self._stopped = True
        self._watch.stop()


def start(label: str, api: Api, cp: ControlPlane, kubeconfig: Path, logs: Path, dhad_env: dict) -> tuple[Process, str | None]:
    """Starts one operator as the bench identity; returns it and (for Dhad) its metrics URL."""
    env = {"KUBECONFIG": str(kubeconfig)}
    if label == "kopf":
        return Process(label, [sys.executable, "-m", "kopf", "run", "--all-namespaces", "--standalone",
                               str(FLOOR / "op_kopf.py")], logs, env=env), None
    if label == "go":
        return Process(label, [str(build_floor_go())], logs, env=env), None
    process = start_operator(cp, logs, name=label, extra_env={**env, "DHAD_RESYNC_SECONDS": "600", **dhad_env})
    return process, process.metrics_url


def dhad_counters(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    out = {}
    for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
        m = re.match(r'dhad_api_requests_total\{verb="([^"]+)"\} (\S+)', line)
        if m:
            out[f"dhad:{m.group(1)}"] = float(m.group(2))
        m = re.match(r'dhad_reconcile_duration_seconds_(count|sum)\{kind="SFTJob"\} (\S+)', line)
        if m:
            out[f"reconcile:{m.group(1)}"] = float(m.group(2))
        m = re.match(r'dhad_reconcile_errors_total\{kind="SFTJob"\} (\S+)', line)
        if m:
            out["reconcile:errors"] = float(m.group(1))
    return out


def run_one(label: str, args, api: Api, cp: ControlPlane, kubeconfig: Path, logs: Path) -> dict:
    ns = f"opscale-{label}-{int(time.time())}"
    api.core.create_namespace({"metadata": {"name": ns}})
    api.wait(lambda: api.core.read_namespaced_service_account("default", ns), 60, f"default SA in {ns}")
    spec = dict(SPEC, nodes=2) if label in ("kopf", "go") else dict(SPEC, queueName="bench") if label == "dhad-queued" else SPEC
    body = lambda name: {"apiVersion": f"{GROUP}/{VERSION}", "kind": "SFTJob", "metadata": {"name": name}, "spec": spec}  # noqa: E731
    watch = JobWatch(api, ns)
    op, url = start(label, api, cp, kubeconfig, logs, dict(e.split("=", 1) for e in args.dhad_env))
    try:
        # The canary proves the operator's watches are up; everything is measured after it.
        api.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body("canary"))
        api.wait(lambda: "canary" in watch.seen, 180, f"{label}: the canary's Job")
        time.sleep(2)
        before = {**api.apiserver_metrics(), **dhad_counters(url)}
        cpu0 = cpu_seconds(op.popen.pid)
        created: dict[str, float] = {}

        def create(i: int) -> None:
            name = f"j{i:04d}"
            created[name] = time.monotonic()
            api.custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body(name))

        t0 = time.monotonic()
        with ThreadPoolExecutor(args.threads) as ex:
            list(ex.map(create, range(args.n)))
        applied = time.monotonic() - t0
        deadline = time.monotonic() + args.timeout
        while sum(n in watch.seen for n in created) < args.n and time.monotonic() < deadline and op.popen.poll() is None:
            time.sleep(0.1)
        at_jobs = api.apiserver_metrics().get(f"flow:{FLOW_SCHEMA}", 0)  # the requests it took to make every Job
        cpu_jobs = cpu_seconds(op.popen.pid) - cpu0
        lat = sorted(watch.seen[n] - created[n] for n in created if n in watch.seen)
        done = len(lat)
        all_jobs = max(watch.seen[n] for n in created if n in watch.seen) - t0 if done == args.n else float("nan")
        # Requests are counted until the operator is quiet (Dhad keeps reconciling on child events and requeues).
        last, quiet_since, settle_start = None, time.monotonic(), time.monotonic()
        while time.monotonic() < settle_start + args.settle:
            now = api.apiserver_metrics().get(f"flow:{FLOW_SCHEMA}", 0)
            if now != last:
                last, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= args.quiet:
                break
            time.sleep(0.5)
        settled = time.monotonic() - settle_start
        after = {**api.apiserver_metrics(), **dhad_counters(url)}
        cpu = cpu_seconds(op.popen.pid) - cpu0
        time.sleep(args.idle)  # nothing changes now: what the operator still asks is its idle cost
        idle = (api.apiserver_metrics().get(f"flow:{FLOW_SCHEMA}", 0) - after.get(f"flow:{FLOW_SCHEMA}", 0)) / max(args.idle, 1e-9)
        cpu_idle = cpu_seconds(op.popen.pid) - cpu0 - cpu
        cpu_total = cpu_seconds(op.popen.pid)
        rss = peak_rss_mb(op.popen.pid)
        alive = op.popen.poll() is None
    finally:
        watch.stop()
        op.stop()
    d = delta(after, before)
    p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    result = {"label": label, "ns": ns, "applied": applied, "all_jobs": all_jobs, "jobs": done, "p50": p(0.5), "p99": p(0.99),
              "req_per_job": d.get(f"flow:{FLOW_SCHEMA}", 0) / args.n, "settled": settled,
              "req_at_jobs": (at_jobs - before.get(f"flow:{FLOW_SCHEMA}", 0)) / args.n, "cpu_jobs": cpu_jobs, "rss": rss, "cpu": cpu, "cpu_total": cpu_total,
              "idle": idle, "cpu_idle": cpu_idle,
              "alive": alive, "delta": d, "apiserver_total_per_job": sum(v for k, v in d.items() if k.startswith("req:")) / args.n}
    print(f"  {label}: jobs={done}/{args.n} applied_in={applied:.1f}s all_jobs={all_jobs:.1f}s p50={result['p50']:.2f}s "
          f"p99={result['p99']:.2f}s req/job={result['req_at_jobs']:.1f} at all Jobs, {result['req_per_job']:.1f} settled "
          f"(quiet {settled:.0f}s after the last Job; all clients {result['apiserver_total_per_job']:.1f}) "
          f"idle={idle:.1f}req/s (cpu {cpu_idle:.1f}s in {args.idle:.0f}s) rss={rss:.0f}MB cpu={cpu_jobs:.1f}s at all Jobs, {cpu:.1f}s settled (total {cpu_total:.1f}s)"
          f"{'' if alive else ' OPERATOR EXITED'}", flush=True)
    if url:
        verbs = {k[5:]: v / args.n for k, v in d.items() if k.startswith("dhad:")}
        reconciles = d.get("reconcile:count", 0)
        print(f"    dhad_api_requests/job: {sum(verbs.values()):.1f} " + " ".join(f"{k}={v:.1f}" for k, v in sorted(verbs.items()))
              + f"; reconciles/job={reconciles / args.n:.1f} ({d.get('reconcile:errors', 0):.0f} failed), "
              f"mean reconcile {d.get('reconcile:sum', 0) / max(reconciles, 1) * 1000:.0f} ms", flush=True)
    top = sorted(((k[4:], v) for k, v in d.items() if k.startswith("req:")), key=lambda kv: -kv[1])[:8]
    print("    apiserver requests (all clients)/job: " + ", ".join(f"{k}={v / args.n:.1f}" for k, v in top), flush=True)
    creates = sorted((k[9:], v) for k, v in d.items() if k.startswith("req:POST "))  # every kind, however few
    print("    creates (all clients)/job: " + ", ".join(f"{k}={v / args.n:.2f}" for k, v in creates), flush=True)
    flows = sorted(((k[5:], v) for k, v in d.items() if k.startswith("flow:")), key=lambda kv: -kv[1])
    print("    by APF flow schema/job: " + ", ".join(f"{k}={v / args.n:.1f}" for k, v in flows), flush=True)
    api.core.delete_namespace(ns)
    api.wait(lambda: _gone(api, ns), args.timeout, f"namespace {ns} deleted")
    return result


def _gone(api: Api, ns: str) -> bool:
    try:
        api.core.read_namespace(ns)
        return False
    except api.client.ApiException as error:
        return error.status == 404


def table(results: list[dict]) -> str:
    rows = ["| operator | all Jobs (s) | p50 (s) | p99 (s) | req/job at all Jobs | req/job settled (s) | idle req/s "
            "| peak RSS (MB) | CPU (s) at all Jobs / settled |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['label']} | {r['all_jobs']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} | {r['req_at_jobs']:.1f} "
                    f"| {r['req_per_job']:.1f} ({r['settled']:.0f}) | {r['idle']:.1f} | {r['rss']:.0f} | {r['cpu_jobs']:.1f} / {r['cpu']:.1f} |")
    floors = [r for r in results if r["label"] in ("kopf", "go")]
    ours = [r for r in results if r["label"].startswith("dhad")]
    if floors and ours:
        rows += ["", "| ratio | all Jobs | p99 | req/job at all Jobs | req/job settled | RSS | CPU at all Jobs | CPU settled |",
                 "|---|---|---|---|---|---|---|---|"]
        for d in ours:
            for f in floors:
                cells = " | ".join(f"{d[k] / f[k]:.1f}x" if f[k] else "-" for k in ("all_jobs", "p99", "req_at_jobs", "req_per_job", "rss", "cpu_jobs", "cpu"))
                rows.append(f"| {d['label']} / {f['label']} | {cells} |")
    return "\n".join(rows)


TARGETS = (  # issue 17: dhad-queued (Jobs suspended, like the floors') against the kopf floor of the same run
    ("all Jobs exist", "all_jobs", "ratio", 1.3),
    ("p99 CR-to-Job", "p99", "ratio", 1.5),
    ("operator CPU s at all Jobs", "cpu_jobs", "ratio", 1.3),
    ("operator CPU s settled", "cpu", "ratio", 1.3),
    ("API requests/job settled", "req_per_job", "absolute", 12),
    ("idle requests/s", "idle", "absolute", 1),
    ("peak RSS MB", "rss", "absolute", 200),
)


def targets(results: list[dict]) -> str:
    """Each target as the issue defines it, for dhad-queued, with the non-queued dhad beside it."""
    by = {r["label"]: r for r in results}
    kopf, queued, plain = by.get("kopf"), by.get("dhad-queued"), by.get("dhad")
    if not queued or not kopf:
        return "(targets need the kopf floor and dhad-queued in the same run)"
    rows = ["| target | dhad-queued | dhad (pods created) | limit | met |", "|---|---|---|---|---|"]
    def value(r: dict | None, key: str, how: str) -> float:
        if r is None:
            return float("nan")
        return r[key] / kopf[key] if how == "ratio" and kopf[key] else r[key]

    for title, key, how, limit in TARGETS:
        unit = "x kopf" if how == "ratio" else ""
        ours, beside = value(queued, key, how), value(plain, key, how)
        rows.append(f"| {title} | {ours:.2f}{unit} | {beside:.2f}{unit} | {limit}{unit} | {'yes' if ours <= limit else 'NO'} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=500, help="CRs per operator")
    parser.add_argument("--threads", type=int, default=16, help="load generator threads")
    parser.add_argument("--only", default=",".join(ALL), help=f"operators, in order (of {','.join(ALL)})")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for all Jobs, and for a namespace to go")
    parser.add_argument("--settle", type=float, default=120, help="at most this long counting requests after the last Job")
    parser.add_argument("--idle", type=float, default=60, help="then this long measuring idle requests/s")
    parser.add_argument("--quiet", type=float, default=5, help="the operator is done when its request count is still this long")
    parser.add_argument("--keep", action="store_true", help="keep the control plane's folder (logs)")
    parser.add_argument("--dhad-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for Dhad's operator (e.g. DHAD_WORKERS=16), repeatable")
    args = parser.parse_args()
    labels = [x for x in args.only.split(",") if x]
    if unknown := set(labels) - set(ALL):
        parser.error(f"unknown operators: {sorted(unknown)}")
    if "go" in labels:
        build_floor_go()
    workdir = Path(tempfile.mkdtemp(prefix="dhad-opscale-"))
    print(f"control plane in {workdir} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
    cp = ControlPlane(workdir, control_plane_bin()).start()
    try:
        for process in [p for p in cp.processes if p.name == "kube-scheduler"]:  # pods stay Pending
            process.stop()
            cp.processes.remove(process)
        api = Api(cp)
        kubeconfig = cp.user_kubeconfig(OPERATOR_USER, OPERATOR_GROUP)
        api.rbac.create_cluster_role_binding({"metadata": {"name": "bench-operator"}, "subjects": [
            {"kind": "User", "name": OPERATOR_USER, "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"kind": "ClusterRole", "name": "cluster-admin", "apiGroup": "rbac.authorization.k8s.io"}})
        crds = crd_bodies()
        floors_schema = None
        results = []
        for label in labels:
            floor = label in ("kopf", "go")
            if floors_schema is not floor:
                for name, b in crds.items():
                    put_crd(api, with_nodes(b) if floor and name == f"{PLURAL}.{GROUP}" else b, accepts_nodes=floor)
                floors_schema = floor
            print(f"{label}: N={args.n} (load average {os.getloadavg()[0]:.1f})", flush=True)
            results.append(run_one(label, args, api, cp, kubeconfig, workdir / "logs"))
        print(f"\nN={args.n}, {args.threads} load threads; requests = APF flow schema '{FLOW_SCHEMA}' (the operator only), "
              f"settled = quiet for {args.quiet:.0f} s (at most {args.settle:.0f} s after the last Job); idle = the {args.idle:.0f} s after; load average now {os.getloadavg()[0]:.1f}\n")
        print(table(results))
        print("\nIssue 17's targets (ratios against the kopf floor measured in this run):\n")
        print(targets(results))
    finally:
        cp.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
