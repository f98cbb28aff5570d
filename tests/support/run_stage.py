"""Test entry point: what the runtime's worker does, minus S3. Launched by torchrun with a job.json listing
steps (stage, spec kind and dict, model_dir, root, inputs; optionally a checkpoint to resume from and, for the
policy stage, a reward function as "module:name"); starts the gloo process group once, builds each StageRun
from torchrun's env and calls `dhad_trainer.stages.<stage>.run` in order (several stages share one launch to
save process start-up). A spec's `distributed` is honoured as the worker does it: DeepSpeed's config (and
comm layer) or FSDP's arguments reach the StageRun. Each rank writes root/result-rank<r>.json per step, with
the seconds the step took and the sha256 of the weights it ended training with under plain DDP (None for a
stage that does not train, and under ZeRO-3 or FSDP, where a rank holds shards)."""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from pathlib import Path

from dhad_api import jobs
from dhad_trainer.runtime.callbacks import WeightsDigest
from dhad_trainer.stages.base import StageRun

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # reward functions live in tests.support (torchrun puts only this folder first)


def run_step(step: dict, rank: int, world: int) -> None:
    root = Path(step["root"])
    from dhad_trainer.runtime import deepspeed_config, fsdp_config

    spec = getattr(jobs, step["kind"]).model_validate(step["spec"])
    ds = deepspeed_config.build(spec.distributed, use_cpu=True)
    if ds is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    fsdp = fsdp_config.build(spec.distributed, 1, world)
    if fsdp is not None:
        fsdp_config.enable_on_cpu()
    digest = WeightsDigest(rank)  # replicas only: ZeRO-3 and FSDP ranks hold shards
    run = StageRun(spec=spec, stage=step["stage"], model_dir=Path(step["model_dir"]), work_dir=root / "work",
                   output_dir=root / "out", inputs={k: Path(v) for k, v in step["inputs"].items()}, deepspeed=ds,
                   fsdp=fsdp, rank=rank, world_size=world, local_rank=int(os.environ.get("LOCAL_RANK", 0)), use_cpu=True,
                   resume_from=Path(step["resume_from"]) if step.get("resume_from") else None,
                   callbacks=[digest] if ds is None and fsdp is None else [])
    kwargs = {}
    if step.get("reward_function"):
        module, name = step["reward_function"].split(":")
        kwargs["reward_function"] = getattr(importlib.import_module(module), name)
    started = time.monotonic()
    result = importlib.import_module(f"dhad_trainer.stages.{step['stage']}").run(run, **kwargs)
    doc = {"metrics": result.metrics, "model_dir": str(result.model_dir) if result.model_dir else None,
           "output_dir": str(run.output_dir), "world_size": world, "seconds": round(time.monotonic() - started, 1),
           "weights_sha256": digest.sha256}
    (root / f"result-rank{rank}.json").write_text(json.dumps(doc, default=str), encoding="utf-8")


def main(job_file: str) -> None:
    import torch.distributed as dist

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    for step in job["steps"]:
        run_step(step, rank, world)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
