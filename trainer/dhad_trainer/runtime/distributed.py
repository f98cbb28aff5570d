"""torch.distributed as torchrun starts it, plus two gloo groups for the runtime's own coordination.

Training collectives run on the default group (nccl on GPU, gloo on CPU). The runtime's waits
(rank 0 preparing data, node leaders downloading a model) can take far longer than a training
collective should, and checkpoint uploads exchange file lists from a background thread while the
main thread trains, so both get their own gloo groups: `control` (every rank, long timeout) and
`leaders` (local rank 0 of each node, used only by the upload thread).
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

CONTROL_TIMEOUT = timedelta(seconds=int(os.environ.get("DHAD_CONTROL_TIMEOUT_SECONDS", str(6 * 3600))))
TRAIN_TIMEOUT = timedelta(seconds=int(os.environ.get("DHAD_DIST_TIMEOUT_SECONDS", "1800")))


@dataclass
class Cluster:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    nnodes: int = 1
    use_cpu: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_node_leader(self) -> bool:
        return self.local_rank == 0


_control = None
_leaders = None
preempted = threading.Event()  # set by SIGTERM (torchrun forwards the pod's SIGTERM to workers)


def setup(backend: str | None = None, always: bool = False) -> Cluster:
    """Initialises the default group from torchrun's env; a single process skips it unless `always`
    (DeepSpeed wants a process group even for one process)."""
    global _control, _leaders
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    use_cpu = not torch.cuda.is_available()
    cluster = Cluster(
        rank=int(env.get("RANK", "0")), world_size=world, local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=local_world, node_rank=int(env.get("GROUP_RANK", env.get("NODE_RANK", "0"))),
        nnodes=max(1, world // local_world), use_cpu=use_cpu,
    )
    signal.signal(signal.SIGTERM, lambda *_: preempted.set())
    if world == 1 and not always:
        return cluster
    if not use_cpu:
        torch.cuda.set_device(cluster.local_rank)
    dist.init_process_group(backend or ("gloo" if use_cpu else "nccl"), timeout=TRAIN_TIMEOUT)
    _control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    leaders = list(range(0, world, local_world))
    _leaders = dist.new_group(ranks=leaders, backend="gloo", timeout=CONTROL_TIMEOUT)
    return cluster


def barrier() -> None:
    """Every rank waits here (long timeout: one rank may be preparing data meanwhile)."""
    if _control is not None:
        dist.barrier(group=_control)


def all_gather(value: object) -> list:
    """Every rank's `value`, in rank order."""
    if _control is None:
        return [value]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=_control)
    return out


def broadcast(value: object, src: int = 0) -> object:
    if _control is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=_control)
    return box[0]


def leaders_exchange(value: object) -> list:
    """All-gather among node leaders: the checkpoint barrier (call only on local rank 0)."""
    if _leaders is None:
        return [value]
    out: list = [None] * dist.get_world_size(_leaders)
    dist.all_gather_object(out, value, group=_leaders)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on some rank (so all ranks stop at the same step)."""
    if _control is None:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return bool(t.item())


def teardown() -> None:
    """Destroys every group; skipping this makes some runs abort at interpreter exit."""
    global _control, _leaders
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = _leaders = None
