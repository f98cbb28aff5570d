"""One pod as the test node agent runs it: env and volumes resolved as a kubelet would, the command
as a local process in its own mount and UTS namespaces (bind mounts, per-pod /etc/hosts, hostname),
its log file and its termination message. API access goes through `api.get_opt(path) -> dict|None`.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import signal
import subprocess
import time
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


class PodRun:
    """Resolve (`prepare`), start, poll and stop one pod's first container."""

    def __init__(self, api, pod: dict, pod_dir: Path, ip: str, host_ip: str, api_url: str):
        self.api, self.pod, self.dir, self.ip, self.host_ip, self.api_url = api, pod, pod_dir, ip, host_ip, api_url
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
    def _setup_script(self) -> str:
        """Runs inside `unshare`: /etc/hosts, hostname, the volume mounts, then execs the command."""
        volumes = {v["name"]: self._volume(v) for v in self.pod["spec"].get("volumes") or []}
        mounts = [(volumes[m["name"]], m["mountPath"], m.get("readOnly", False), m.get("subPath"))
                  for m in self.container.get("volumeMounts") or []]
        mounts.append((self.term_path, self.container.get("terminationMessagePath", "/dev/termination-log"), False, None))
        lines = ["set -e", f"mount --bind {self.hosts_path} /etc/hosts", f"hostname {shlex.quote(self.hostname)}"]
        for src, dst, read_only, sub in sorted(mounts, key=lambda m: m[1].rstrip("/").count("/")):
            dst = shlex.quote(dst)
            if isinstance(src, tuple):
                lines += [f"mkdir -p {dst}", f"mount -t tmpfs -o size={src[1]} tmpfs {dst}"]
                continue
            if sub:
                src = src / sub
                src.mkdir(parents=True, exist_ok=True)
            make = f"mkdir -p {dst}" if src.is_dir() else f"mkdir -p $(dirname {dst}) && touch {dst}"
            lines += [make, f"mount --bind {shlex.quote(str(src))} {dst}"]
            if read_only:
                lines.append(f"mount -o remount,bind,ro {dst}")
        workdir = shlex.quote(self.container.get("workingDir") or str(self.dir / "work"))
        # A container has its own /tmp; mounted last (after cd) since the pod's own dir may live under /tmp.
        private_tmp = shlex.quote(str(self.dir / "tmp"))
        return "\n".join([*lines, f"mkdir -p {workdir} {private_tmp} && cd {workdir}",
                          f"mount --bind {private_tmp} /tmp", 'exec "$@"', ""])

    def start(self) -> None:
        """Resolves everything first (ConfigError/MountError leave nothing running), then starts."""
        if len(self.pod["spec"]["containers"]) > 1 or self.pod["spec"].get("initContainers"):
            raise RunError("the test node agent runs exactly one container and no init containers")
        env = self.environment()
        argv = [expand(a, env) for a in (self.container.get("command") or []) + (self.container.get("args") or [])]
        if not self.container.get("command"):
            raise RunError("no command: the test node agent has no images and so no entrypoints")
        (self.dir / "work").mkdir(parents=True, exist_ok=True)
        self.term_path.touch()
        script = self.dir / "setup.sh"
        script.write_text(self._setup_script())
        base = {"PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "HOSTNAME": self.hostname, "VIRTUAL_ENV": str(VENV_BIN.parent)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--mount", "--uts", "--propagation", "private", "--", "/bin/bash", str(script), *argv],
                env=base | env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=self.dir)
        self.started_at = time.time()

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
