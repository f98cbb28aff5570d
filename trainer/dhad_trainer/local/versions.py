"""`dhad --version` and `dhad env`: what a bug report needs to say about this machine.

Versions come from the installed distributions' metadata (importing DeepSpeed would compile or probe
ops); torch is imported for what only it knows: its CUDA and cuDNN builds, NCCL and the devices seen.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata

PACKAGES = ("torch", "transformers", "trl", "deepspeed", "accelerate", "peft", "datasets", "tokenizers",
            "huggingface_hub", "tensorboard", "mlflow-skinny", "wandb", "minio", "kopf")


def version_line() -> str:
    from dhad_trainer.storage.models import code_version

    version = code_version()
    return f"dhad {version['dhad']}" + (f" (commit {version['commit']})" if version["commit"] else "")


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def accelerator() -> dict[str, str]:
    """CUDA as torch sees it: the build, the devices (name and memory) or 'none visible'."""
    try:
        import torch
    except ImportError:
        return {"accelerator": "unknown (torch is not installed)"}
    info = {"torch CUDA build": torch.version.cuda or "none (CPU build)"}
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn:
        info["cuDNN"] = f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn >= 10000 else str(cudnn)
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        seen: dict[str, int] = {}
        for props in names:
            label = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute {props.major}.{props.minor})"
            seen[label] = seen.get(label, 0) + 1
        info["accelerator"] = ", ".join(f"{n} x {label}" for label, n in seen.items())
        info["NCCL"] = ".".join(str(p) for p in torch.cuda.nccl.version()) if hasattr(torch.cuda, "nccl") else "unknown"
    else:
        info["accelerator"] = f"CPU only: no CUDA device visible ({torch.get_num_threads()} threads)"
    return info


def environment_report() -> dict[str, str]:
    report = {"dhad": version_line().removeprefix("dhad "), "python": sys.version.split()[0],
              "platform": platform.platform()}
    report.update({name: _installed(name) for name in PACKAGES})
    report.update(accelerator())
    return report
