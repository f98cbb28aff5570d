"""The operator as a real subprocess (`python -m dhad_operator`) against the test control plane."""

from __future__ import annotations

import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

from .controlplane import ControlPlane
from .processes import Process, free_ports


def start_operator(cp: ControlPlane, log_dir: Path, name: str = "dhad-operator", extra_env: dict | None = None,
                   wait: str = "/readyz", kubeconfig: Path | None = None) -> Process:
    """Started and waited for until `wait` answers 200 (/readyz: its caches have listed).

    The safety-net resync is ten minutes, so a test that passes shows the event or timer that woke the
    job, never a periodic poll."""
    metrics_port, health_port = free_ports(2)
    env = {
        "KUBECONFIG": str(kubeconfig or cp.kubeconfig),
        "DHAD_METRICS_PORT": str(metrics_port),
        "DHAD_RESYNC_SECONDS": "600",
        "DHAD_TRAINER_IMAGE": "dhad/trainer:test",
        **(extra_env or {}),
    }
    process = Process(name, [sys.executable, "-m", "dhad_operator", f"--liveness=http://127.0.0.1:{health_port}/healthz"],
                      log_dir, env=env)
    process.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    process.health_url = f"http://127.0.0.1:{health_port}"
    process.wait_ready(lambda: urllib.request.urlopen(f"{process.health_url}{wait}", timeout=1).status == 200, 60)
    return process


def metrics_text(process: Process) -> str:
    return urllib.request.urlopen(process.metrics_url, timeout=5).read().decode()


def metric(text: str, name: str, **labels) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


def http_status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=2).status
    except urllib.error.HTTPError as error:
        return error.code


class OperatorRunner:
    """A restartable operator process, so one test can take over the cluster and give it back."""

    def __init__(self, cp: ControlPlane, log_dir: Path, **env):
        self.cp, self.log_dir, self.env, self.process = cp, log_dir, env, None
        self.starts = 0

    def start(self) -> Process:
        self.starts += 1
        self.process = start_operator(self.cp, self.log_dir, f"dhad-operator-{self.starts}", self.env)
        return self.process

    def stop(self) -> None:
        if self.process:
            self.process.stop()
            self.process = None

    @property
    def metrics_url(self) -> str:
        return self.process.metrics_url
