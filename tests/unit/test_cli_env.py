"""`dhad --version` and `dhad env`: what a bug report needs, as the installed packages and torch say."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata

import torch


def dhad(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dhad_trainer.cli", *args], capture_output=True, text=True, timeout=120)


def test_version_names_the_package_and_commit():
    done = dhad("--version")
    assert done.returncode == 0 and done.stdout.startswith(f"dhad {metadata.version('dhad')}")
    assert "commit " in done.stdout  # a git checkout here


def test_env_reports_the_installed_versions_and_the_accelerator_torch_sees():
    done = dhad("env", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    for name in ("torch", "transformers", "trl", "deepspeed", "huggingface_hub"):
        assert report[name] == metadata.version(name)
    assert report["torch CUDA build"] == (torch.version.cuda or "none (CPU build)")
    if torch.cuda.is_available():
        assert torch.cuda.get_device_name(0) in report["accelerator"]
    else:
        assert report["accelerator"].startswith("CPU only: no CUDA device visible")
    lines = dhad("env").stdout.splitlines()
    assert any(line.split()[0] == "trl" and line.split()[-1] == metadata.version("trl") for line in lines)
