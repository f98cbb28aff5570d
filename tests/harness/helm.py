"""The helm binary the control-plane build makes, with its own cache/config/data folders per test module."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dhad"


def helm(cp: ControlPlane, home: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {f"HELM_{d}_HOME": str(home / d.lower()) for d in ("CACHE", "CONFIG", "DATA")}
    done = subprocess.run([str(cp.bin_dir / "helm"), *args], capture_output=True, text=True, timeout=timeout,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(home), **env})
    assert not check or done.returncode == 0, done.stdout + done.stderr
    return done
