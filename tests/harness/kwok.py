"""kwok playing the kubelet for fake GPU nodes: nodes with `nvidia.com/gpu` capacity that the real
scheduler binds pods to, and Stages that move those pods through their lifecycle.

kwok runs with `--manage-all-nodes=false` and manages only nodes carrying our annotation, so the
node agent of the end-to-end tests can own other nodes in the same cluster.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes import client

from .controlplane import ControlPlane
from .processes import Process, free_port

MANAGED_ANNOTATION = "kwok.x-k8s.io/node"
STAGES_DIR = Path(__file__).parent / "kwok_stages"
UPSTREAM_STAGES = [
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-delete.yaml",
]


def stage_files(bin_dir: Path) -> list[Path]:
    """kwok's own node and delete stages, plus this project's pod-exit stage."""
    upstream = [bin_dir / "kwok-stages" / rel for rel in UPSTREAM_STAGES]
    return upstream + sorted(STAGES_DIR.glob("*.yaml"))


def start_kwok(cp: ControlPlane) -> Process:
    argv = [
        str(cp.bin_dir / "kwok"),
        f"--kubeconfig={cp.kubeconfig}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={MANAGED_ANNOTATION}=fake",
        f"--server-address=127.0.0.1:{free_port()}",
        "--node-lease-duration-seconds=40",
    ]
    for path in stage_files(cp.bin_dir):
        argv.append(f"--config={path}")
    kwok = Process("kwok", argv, cp.workdir / "logs")
    cp.processes.append(kwok)
    kwok.wait_ready(lambda: "Starting" in kwok.log_path.read_text(errors="replace") or _any_log(kwok), timeout=30)
    return kwok


def _any_log(process: Process) -> bool:
    return process.log_path.stat().st_size > 0


def gpu_node(name: str, gpus: int = 8, cpu: str = "96", memory: str = "1Ti") -> client.V1Node:
    capacity = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
    return client.V1Node(
        metadata=client.V1ObjectMeta(
            name=name,
            annotations={MANAGED_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            labels={
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                # GPU feature discovery's labels (an H100 80GB): the operator's Planned condition reads them
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
                "nvidia.com/gpu.memory": "81559",
            },
        ),
        spec=client.V1NodeSpec(),
        status=client.V1NodeStatus(allocatable=capacity, capacity=capacity),
    )


def create_gpu_nodes(core: client.CoreV1Api, count: int = 2, gpus: int = 8, prefix: str = "gpu-node") -> list[str]:
    names = [f"{prefix}-{i}" for i in range(count)]
    for name in names:
        core.create_node(gpu_node(name, gpus))
    return names
