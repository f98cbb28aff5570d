"""One pod as the test node agent runs it: env and volumes resolved as a kubelet would, the command
as a local process in its own mount and UTS namespaces (bind mounts, per-pod /etc/hosts, hostname, a
private /tmp), its log file, its termination message, and its startup, readiness and liveness probes.
API access goes through `api.get_opt(path) -> dict|None`.

The project's venv stands in for the image. Wherever the clone lives (under /tmp, under a path with
spaces), the venv, its interpreter, the repository and the pod's own folder stay visible at their own
paths inside the pod's private /tmp, as an image's files stay visible in a container.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
KIND = {"secret": "Secret", "configmap": "ConfigMap"}
_VAR = re.compile(r"\$(\$|\(([A-Za-z_][A-Za-z0-9_.-]*)\))")
_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


class ConfigError(Exception):
    """The container cannot be configured yet (kubelet retries): its waiting reason and message."""

    reason = "CreateContainerConfigError"


class MountError(ConfigError):
    reason = "ContainerCreating"


class RunError(ConfigError):
    reason = "RunContainerError"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: known vars replaced, unknown left as is, `$$` -> `$`."""
    return _VAR.sub(lambda m: "$" if m[1] == "$" else env.get(m[2], m[0]), text)


def quantity_bytes(text: str | None) -> int | None:
    if not text:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?|k)?", str(text))
    return int(float(m[1]) * _SUFFIX.get(m[2] or "", 1)) if m else None


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def image_paths(venv_bin: Path) -> list[Path]:
    """What stands in for the image: the venv, the interpreter it links to, and the repository."""
    python = venv_bin / "python"
    return [venv_bin.parent, Path(os.path.realpath(python)).parents[1], REPO]


class PodRun:
    """Resolve (`prepare`), start, poll, probe, restart and stop one pod's first container."""

    def __init__(self, api, pod: dict, pod_dir: Path, ip: str, host_ip: str, api_url: str,
                 venv_bin: Path = VENV_BIN, keep: tuple[Path, ...] = ()):
        self.api, self.pod, self.dir, self.ip, self.host_ip, self.api_url = api, pod, pod_dir, ip, host_ip, api_url
        self.venv_bin = Path(venv_bin)
        self.keep = [*image_paths(self.venv_bin), *map(Path, keep)]
        meta, spec = pod["metadata"], pod["spec"]
        self.ns, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.hostname = spec.get("hostname") or self.name[:63]
        self.subdomain = spec.get("subdomain")
        self.container = spec["containers"][0]
        self.log_path, self.hosts_path = pod_dir / "log", pod_dir / "hosts"
        self.term_path = pod_dir / "termination-log"
        self.proc: subprocess.Popen | None = None
        self.started_at = self.finished_at = None
        self.kill_at: float | None = None
        self.done = False
        self.retry_at, self.last_waiting = 0.0, None
        self.restarts, self.last_state = 0, None  # restartCount and lastState.terminated
        self.ready = self.started = False  # from the readiness and startup probes
        self.reported_ready: tuple[bool, bool] | None = None  # (ready, started) as last reported
        self.unhealthy: str | None = None  # why a liveness (or startup) probe failed
        self.env: dict[str, str] = {}

    # --- env -----------------------------------------------------------------------------------
    def _object(self, kind: str, name: str) -> dict | None:
        return self.api.get_opt(f"/api/v1/namespaces/{self.ns}/{kind}s/{name}")

    @staticmethod
    def _data(kind: str, obj: dict) -> dict[str, bytes]:
        if kind == "secret":
            return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
        data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
        return data | {k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()}

    def _all_keys(self, kind: str, name: str, optional: bool, error=ConfigError) -> dict[str, bytes] | None:
        obj = self._object(kind, name)
        if obj is None and not optional:
            raise error(f'{kind} "{name}" not found')
        return None if obj is None else self._data(kind, obj)

    def _key(self, kind: str, ref: dict) -> str | None:
        data = self._all_keys(kind, ref["name"], ref.get("optional", False))
        if data is not None and ref["key"] in data:
            return data[ref["key"]].decode(errors="replace")
        if data is not None and not ref.get("optional"):
            raise ConfigError(f"couldn't find key {ref['key']} in {KIND[kind]} {self.ns}/{ref['name']}")
        return None

    def field(self, path: str) -> str:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
        if m:
            return (meta.get(m[1]) or {}).get(m[2], "")
        values = {"metadata.name": self.name, "metadata.namespace": self.ns, "metadata.uid": self.uid,
                  "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
                  "status.podIP": self.ip, "status.podIPs": self.ip, "status.hostIP": self.host_ip,
                  "status.hostIPs": self.host_ip}
        if path not in values:
            raise ConfigError(f"unsupported fieldPath {path!r} (test node agent)")
        return values[path]

    def environment(self) -> dict[str, str]:
        port = self.api_url.rsplit(":", 1)[1]
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port,
               "KUBERNETES_SERVICE_PORT_HTTPS": port, "KUBERNETES_PORT": f"tcp://127.0.0.1:{port}",
               "DHAD_KUBE_API": self.api_url}
        for source in self.container.get("envFrom") or []:
            kind, ref = ("secret", source["secretRef"]) if "secretRef" in source else ("configmap", source["configMapRef"])
            for key, value in (self._all_keys(kind, ref["name"], ref.get("optional", False)) or {}).items():
                env[source.get("prefix", "") + key] = value.decode(errors="replace")
        for var in self.container.get("env") or []:
            source = var.get("valueFrom")
            if source is None:
                value = expand(var.get("value", ""), env)
            elif "fieldRef" in source:
                value = self.field(source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source:
                value = self._key("secret", source["secretKeyRef"])
            elif "configMapKeyRef" in source:
                value = self._key("configmap", source["configMapKeyRef"])
            else:
                raise ConfigError(f"env {var['name']}: unsupported valueFrom {sorted(source)} (test node agent)")
            if value is not None:
                env[var["name"]] = value
        return env

    # --- volumes --------------------------------------------------------------------------------
    def _token(self, source: dict) -> bytes:
        spec = {"audiences": [source["audience"]] if source.get("audience") else [],
                "expirationSeconds": max(600, int(source.get("expirationSeconds", 3607))),
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": self.name, "uid": self.uid}}
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        return self.api.request("POST", f"/api/v1/namespaces/{self.ns}/serviceaccounts/{sa}/token", body)["status"]["token"].encode()

    def _files(self, kind: str, source: dict) -> dict[str, bytes]:
        data = self._all_keys(kind, source.get("name") or source.get("secretName"), source.get("optional", False), MountError)
        if data is None:
            return {}
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        missing = [i["key"] for i in items if i["key"] not in data]
        if missing and not source.get("optional"):
            raise MountError(f"{KIND[kind]} {self.ns}/{source.get('name') or source.get('secretName')}: no key {missing[0]}")
        return {i["path"]: data[i["key"]] for i in items if i["key"] in data}

    def _downward(self, items: list[dict]) -> dict[str, bytes]:
        return {i["path"]: self.field(i["fieldRef"]["fieldPath"]).encode() for i in items if "fieldRef" in i}

    def _volume(self, vol: dict):
        """A host path to bind for this volume, or ("tmpfs", bytes) for a memory-backed emptyDir."""
        where = self.dir / "volumes" / vol["name"]
        if "emptyDir" in vol:
            if (vol["emptyDir"] or {}).get("medium") == "Memory":
                return ("tmpfs", quantity_bytes(vol["emptyDir"].get("sizeLimit")) or 2**30)
            where.mkdir(parents=True, exist_ok=True)
            return where
        if "hostPath" in vol:
            path = Path(vol["hostPath"]["path"])
            if vol["hostPath"].get("type") == "DirectoryOrCreate":
                path.mkdir(parents=True, exist_ok=True)
            return path
        files: dict[str, bytes] = {}
        sources = vol["projected"]["sources"] if "projected" in vol else [vol]
        for src in sources:
            if "serviceAccountToken" in src:
                files[src["serviceAccountToken"]["path"]] = self._token(src["serviceAccountToken"])
            elif "configMap" in src:
                files |= self._files("configmap", src["configMap"])
            elif "secret" in src:
                files |= self._files("secret", src["secret"])
            elif "downwardAPI" in src:
                files |= self._downward(src["downwardAPI"].get("items") or [])
            else:
                raise MountError(f"volume {vol['name']}: unsupported type {sorted(src)} (test node agent)")
        where.mkdir(parents=True, exist_ok=True)
        for rel, content in files.items():
            (where / rel).parent.mkdir(parents=True, exist_ok=True)
            (where / rel).write_bytes(content)
        return where

    # --- process ---------------------------------------------------------------------------------
    def _kept(self, volumes: dict) -> list[Path]:
        """Host paths under /tmp the pod must still see at their own paths after its private /tmp is
        mounted: the image stand-in, the pod's folder (volume sources, cwd) and hostPath sources."""
        host_paths = [p for p in volumes.values() if isinstance(p, Path) and not _under(p, self.dir)]
        tmp = Path("/tmp")
        found = []
        for path in [*self.keep, self.dir, *host_paths]:
            for candidate in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
                if _under(candidate, tmp) and candidate != tmp and candidate.exists():
                    found.append(candidate)
        return sorted({p for p in found if not any(q != p and _under(p, q) for q in found)})

    def _setup_script(self) -> str:
        """Runs inside `unshare`: the pod's /tmp (with the kept paths inside it), /etc/hosts, hostname,
        the volume mounts, then execs the command. Every path is quoted: clones may live under spaces."""
        q = shlex.quote
        env = self.env or {}
        volumes = {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes") or []}
        mounts = []
        for m in self.container.get("volumeMounts") or []:
            sub = m.get("subPath") or (expand(m["subPathExpr"], env) if m.get("subPathExpr") else None)
            mounts.append((volumes[m["name"]], m["mountPath"].rstrip("/") or "/", m.get("readOnly", False), sub))
        mounts.append((self.term_path, self.container.get("terminationMessagePath", "/dev/termination-log"), False, None))
        lines = ["set -e"]
        # The container's /tmp: a volume mounted there, else a private folder; the kept paths go inside
        # it first (their sources are hidden once it covers /tmp), then it replaces /tmp.
        on_tmp = [m for m in mounts if m[1] == "/tmp"]
        tmp_root, tmp_read_only = self.dir / "tmp", False
        lines.append(f"mkdir -p {q(str(tmp_root))}")
        if on_tmp:
            src, _, tmp_read_only, sub = on_tmp[-1]
            mounts = [m for m in mounts if m[1] != "/tmp"]
            if isinstance(src, tuple):
                lines.append(f"mount -t tmpfs -o size={src[1]} tmpfs {q(str(tmp_root))}")
            else:
                tmp_root = src / sub if sub else src
                tmp_root.mkdir(parents=True, exist_ok=True)
        for kept in self._kept(volumes):
            inside = q(str(tmp_root / kept.relative_to("/tmp")))
            make = f"mkdir -p {inside}" if kept.is_dir() else f'mkdir -p "$(dirname {inside})" && touch {inside}'
            lines += [make, f"mount --bind {q(str(kept))} {inside}"]
        lines.append(f"mount --rbind {q(str(tmp_root))} /tmp")
        if tmp_read_only:
            lines.append("mount -o remount,bind,ro /tmp")
        lines += [f"mount --bind {q(str(self.hosts_path))} /etc/hosts", f"hostname {q(self.hostname)}"]
        for src, dst, read_only, sub in sorted(mounts, key=lambda m: m[1].rstrip("/").count("/")):
            dst = q(dst)
            if isinstance(src, tuple):
                lines += [f"mkdir -p {dst}", f"mount -t tmpfs -o size={src[1]} tmpfs {dst}"]
                continue
            if sub:
                src = src / sub
                src.mkdir(parents=True, exist_ok=True)
            make = f"mkdir -p {dst}" if src.is_dir() else f'mkdir -p "$(dirname {dst})" && touch {dst}'
            lines += [make, f"mount --bind {q(str(src))} {dst}"]
            if read_only:
                lines.append(f"mount -o remount,bind,ro {dst}")
        workdir = q(self.container.get("workingDir") or str(self.dir / "work"))
        return "\n".join([*lines, f"mkdir -p {workdir} && cd {workdir}", 'exec "$@"', ""])

    def start(self) -> None:
        """Resolves everything first (ConfigError/MountError leave nothing running), then starts."""
        if len(self.pod["spec"]["containers"]) > 1 or self.pod["spec"].get("initContainers"):
            raise RunError("the test node agent runs exactly one container and no init containers")
        env = self.environment()
        argv = [expand(a, env) for a in (self.container.get("command") or []) + (self.container.get("args") or [])]
        if not self.container.get("command"):
            raise RunError("no command: the test node agent has no images and so no entrypoints")
        (self.dir / "work").mkdir(parents=True, exist_ok=True)
        self.term_path.write_bytes(b"")  # each container instance starts with an empty termination log
        base = {"PATH": f"{self.venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "HOSTNAME": self.hostname, "VIRTUAL_ENV": str(self.venv_bin.parent)}
        self.env = base | env
        script = self.dir / "setup.sh"
        script.write_text(self._setup_script())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/bash", str(script), *argv],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.dir)
        self.started_at, self.finished_at, self.kill_at, self.unhealthy = time.time(), None, None, None
        self.started = "startupProbe" not in self.container
        self.ready = self.started and "readinessProbe" not in self.container
        Prober(self, self.proc).start()

    def record_exit(self, code: int, backoff: float) -> None:
        """The container exited and will be restarted (restartPolicy): keep its end as lastState."""
        self.last_state = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                           "startedAt": self.started_at, "finishedAt": self.finished_at,
                           "message": self.termination_message(code)}
        self.restarts += 1
        self.proc, self.ready, self.started = None, False, False
        self.retry_at = time.monotonic() + backoff

    def should_restart(self, code: int) -> bool:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        return policy == "Always" or (policy == "OnFailure" and code != 0)

    def exit_code(self) -> int | None:
        code = self.proc.poll() if self.proc else None
        if code is not None and self.finished_at is None:
            self.finished_at = time.time()
        return None if code is None else (128 - code if code < 0 else code)

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError, AttributeError):
            pass

    def terminate(self, grace: float) -> None:
        """SIGTERM now (once); SIGKILL when `poll_kill` finds the grace period over."""
        if self.kill_at is None and self.proc:
            self.signal(signal.SIGTERM)
            self.kill_at = time.monotonic() + grace

    def poll_kill(self) -> None:
        if self.kill_at is not None and time.monotonic() >= self.kill_at and self.proc.poll() is None:
            self.signal(signal.SIGKILL)

    def termination_message(self, code: int) -> str:
        text = self.term_path.read_bytes()[:4096].decode(errors="replace") if self.term_path.exists() else ""
        if not text.strip() and code != 0 and self.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            text = "\n".join(self.log().splitlines()[-80:])[-2048:]
        return text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def write_hosts(self, peers: list[PodRun]) -> None:
        """Rewrites the bind-mounted hosts file in place (same inode), as peers come and go."""
        lines = ["# Kubernetes-managed hosts file (dhad test node agent).", "127.0.0.1\tlocalhost",
                 "::1\tlocalhost ip6-localhost ip6-loopback"]
        for peer in sorted(peers, key=lambda p: p.ip):
            names = [f"{peer.hostname}.{peer.subdomain}.{peer.ns}.svc.cluster.local", f"{peer.hostname}.{peer.subdomain}.{peer.ns}.svc",
                     f"{peer.hostname}.{peer.subdomain}.{peer.ns}", f"{peer.hostname}.{peer.subdomain}"] if peer.subdomain else []
            if peer is self:
                names.append(self.hostname)
            if names:
                lines.append(f"{peer.ip}\t{' '.join(names)}")
        text = "\n".join(lines) + "\n"
        if not self.hosts_path.exists() or self.hosts_path.read_text() != text:
            with open(self.hosts_path, "r+" if self.hosts_path.exists() else "w") as f:
                f.write(text)
                f.truncate()


class Prober(threading.Thread):
    """The kubelet's probes for one container instance: startupProbe gates the others; readinessProbe
    sets `run.ready` (successThreshold / failureThreshold); a failed liveness or startup probe sets
    `run.unhealthy`, and the agent then kills and restarts the container. httpGet, tcpSocket and exec."""

    def __init__(self, run: PodRun, proc: subprocess.Popen):
        super().__init__(name=f"probe-{run.name}", daemon=True)
        self.run_, self.proc = run, proc
        self.specs = {kind: run.container[kind] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
                      if kind in run.container}

    def alive(self) -> bool:
        return self.run_.proc is self.proc and self.proc.poll() is None and self.run_.unhealthy is None

    def run(self) -> None:
        if not self.specs:
            return
        start = time.monotonic()
        due = {k: start + float(s.get("initialDelaySeconds", 0)) for k, s in self.specs.items()}
        passes, fails = dict.fromkeys(self.specs, 0), dict.fromkeys(self.specs, 0)
        while self.alive():
            now = time.monotonic()
            for kind, spec in self.specs.items():
                if now < due[kind] or (kind != "startupProbe" and not self.run_.started):
                    continue
                if kind == "startupProbe" and self.run_.started:
                    continue
                due[kind] = now + float(spec.get("periodSeconds", 10))
                ok, why = self.check(spec)
                passes[kind], fails[kind] = (passes[kind] + 1, 0) if ok else (0, fails[kind] + 1)
                if kind == "readinessProbe":
                    if passes[kind] >= int(spec.get("successThreshold", 1)):
                        self.run_.ready = True
                    elif fails[kind] >= int(spec.get("failureThreshold", 3)):
                        self.run_.ready = False
                elif ok and kind == "startupProbe":
                    self.run_.started = True
                    self.run_.ready = "readinessProbe" not in self.specs
                elif fails[kind] >= int(spec.get("failureThreshold", 3)):
                    self.run_.unhealthy = f"{'Liveness' if kind == 'livenessProbe' else 'Startup'} probe failed: {why}"
                    return
            time.sleep(0.1)

    def check(self, spec: dict) -> tuple[bool, str]:
        run, timeout = self.run_, float(spec.get("timeoutSeconds", 1))
        try:
            if "httpGet" in spec:
                get = spec["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                url = f"{scheme}://{get.get('host') or run.ip}:{self.port(get['port'])}{get.get('path', '/')}"
                request = urllib.request.Request(url, headers={h["name"]: h["value"] for h in get.get("httpHeaders") or []})
                context = ssl._create_unverified_context() if scheme == "https" else None  # the kubelet skips verification
                with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
                    return 200 <= response.status < 400, f"HTTP probe failed with statuscode: {response.status}"
            if "tcpSocket" in spec:
                tcp = spec["tcpSocket"]
                with socket.create_connection((tcp.get("host") or run.ip, self.port(tcp["port"])), timeout=timeout):
                    return True, ""
            if "exec" in spec:
                done = subprocess.run(["nsenter", "--target", str(self.proc.pid), "--mount", "--uts", "--",
                                       *spec["exec"]["command"]], env=run.env, capture_output=True, timeout=timeout)
                return done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")[-500:]
        except urllib.error.HTTPError as error:
            return False, f"HTTP probe failed with statuscode: {error.code}"
        except (OSError, subprocess.TimeoutExpired) as error:
            return False, str(error)
        return False, f"unsupported probe {sorted(spec)} (test node agent)"

    def port(self, port) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        named = {p.get("name"): p["containerPort"] for p in self.run_.container.get("ports") or []}
        return int(named[port])
