"""The worker torchrun starts on every process: job file -> distributed setup -> model, checkpoint and
progress wiring -> the stage module -> final model upload -> clean exit.

Order matters: the process group (and DeepSpeed's comm layer) exists before any model is loaded so
ZeRO-3 can partition at load time; node leaders download while the others wait at a barrier; the
newest complete checkpoint is picked once (rank 0) and fetched by every node; uploads are waited for
before the final model goes up; the process group is destroyed before exit. A failure is written as
a small JSON file into DHAD_RUN_DIR so the launcher can tell a bad dataset from a crash.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import sys
import time
import traceback
from pathlib import Path

from dhad_api.jobs import OUTPUT_STAGE, JobSpec, stages_for
from dhad_api.layout import MANIFEST, checkpoints_uri, model_uri, stage_uri
from dhad_api.reasons import Reason
from dhad_trainer.runtime.launcher import ConfigError, failure_reason, load_job, output_root
from dhad_trainer.storage.base import FileEntry
from dhad_trainer.storage.routing import RoutingStore, open_store

log = logging.getLogger("dhad_trainer.runtime.worker")


_reporter = None  # rank 0's, so a failure still gets its final report


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved (if there was time) and training stopped."""


def load_stage(name: str):
    """`dhad_trainer.stages.<name>.run`, with a clear error when the module is missing."""
    try:
        module = importlib.import_module(f"dhad_trainer.stages.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"dhad_trainer.stages.{name}":
            raise ConfigError(f"stage {name!r} has no module dhad_trainer.stages.{name} in this trainer image") from None
        raise
    if not callable(getattr(module, "run", None)):
        raise ConfigError(f"dhad_trainer.stages.{name} has no run(StageRun) function")
    return module.run


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def training_seed(spec: JobSpec, stage: str) -> int:
    for path in ("training", f"{stage}.training", "policy.training"):
        node = spec
        for part in path.split("."):
            node = getattr(node, part, None)
        if node is not None and hasattr(node, "seed"):
            return node.seed
    return 42


def upload_result(store, folder: Path, uri: str) -> list[FileEntry]:
    """The final model, then its MANIFEST.json: a model folder without one is still being written."""
    store.delete_prefix(uri)
    files = store.upload_dir(folder, uri)
    manifest = {"files": [e.__dict__ for e in files], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put_bytes(f"{uri}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    return files


def choose_resume(spec: JobSpec, ckpts) -> str | None:
    """This job's newest complete checkpoint (resume auto), else checkpoint.resumeFrom, else none."""
    own = ckpts.latest_complete() if spec.checkpoint.resume.value == "auto" else None
    return ckpts.step_uri(own) if own is not None else spec.checkpoint.resume_from


def fetch_checkpoint(uri: str, ckpts, spec: JobSpec, dest: Path) -> Path:
    """Downloads `uri` (this job's or, for resumeFrom, another job's checkpoint) as an HF checkpoint folder."""
    from dhad_trainer.storage.checkpoints import CheckpointStore

    if not uri.startswith(ckpts.uri + "/"):
        ckpts = CheckpointStore(open_store(uri, spec.storage), uri.rstrip("/").rsplit("/", 1)[0], ckpts.node_rank)
    return ckpts.fetch(uri, dest)


def node_local_model(uri: str, dest: Path, spec: JobSpec, cluster) -> Path:
    """The node leader downloads, the node's other ranks then find the finished folder."""
    from dhad_trainer.runtime import distributed
    from dhad_trainer.storage import models

    def resolve() -> Path:
        try:
            return models.resolve_model(uri, dest, spec.storage)
        except FileNotFoundError as error:
            raise ConfigError(str(error)) from None

    path = resolve() if cluster.is_node_leader else None
    distributed.barrier()
    return path or resolve()


CARDED = {"pretrain", "sft", "reward", "policy", "eval"}  # stages whose output gets a model card (not data)
RESUMABLE_OUTPUT = {"respond"}  # stages that append to output_dir as results arrive


def stage_inputs(job, spec: JobSpec, stage: str, root: str) -> dict[str, str]:
    """Models and data a sub-stage reads besides its own model: earlier sub-stages' outputs, judges."""
    resolved = job.resolved
    inputs: dict[str, str] = {}
    if spec.model.tokenizer:
        inputs["tokenizer"] = spec.model.tokenizer
    if stage in ("feedback", "eval") and resolved.judge_model_uri:
        inputs["judge"] = resolved.judge_model_uri
    if stage == "eval":  # evaluation.compare: more models scored beside the job's own
        inputs.update({f"compare-{name}": uri for name, uri in resolved.compare_model_uris.items()})
    if stage == "respond" and resolved.teacher_model_uri:
        inputs["teacher"] = resolved.teacher_model_uri
    if stage in ("reward", "policy"):
        inputs["feedback"] = model_uri(root, "feedback")
    if stage == "policy":
        inputs["reward_model"] = resolved.reward_model_uri or model_uri(root, "reward")
    if stage == "sft" and "respond" in stages_for(job.kind, spec):
        inputs["respond"] = model_uri(root, "respond")
    return inputs


def work(job_file: str) -> dict:
    from dhad_trainer.runtime import distributed, fsdp_config, tracking
    from dhad_trainer.runtime.callbacks import (
        CheckpointCallback,
        PreemptionCallback,
        ProgressCallback,
        TestHooks,
        WeightsDigest,
    )
    from dhad_trainer.runtime.deepspeed_config import build
    from dhad_trainer.runtime.progress import ProgressReporter, sink_from_env
    from dhad_trainer.stages.base import StageRun
    from dhad_trainer.storage import lineage, models
    from dhad_trainer.storage.checkpoints import AsyncPublisher, CheckpointStore

    job = load_job(job_file)
    spec = job.typed_spec()
    stage = os.environ.get("DHAD_STAGE") or stages_for(job.kind, spec)[0]
    ds_config = build(spec.distributed, not torch_cuda())
    sharded = ds_config is not None or spec.distributed.strategy.value == "fsdp"
    cluster = distributed.setup(always=sharded)  # DeepSpeed and FSDP want a process group even alone
    if ds_config is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if cluster.use_cpu else "nccl")
    fsdp = fsdp_config.build(spec.distributed, cluster.nnodes, cluster.local_world_size)
    if fsdp is not None and cluster.use_cpu:
        fsdp_config.enable_on_cpu()
    seed_everything(training_seed(spec, stage))

    root = output_root(job)
    store = open_store(root, spec.storage)
    work_dir = Path(os.environ.get("DHAD_WORK_DIR", "/tmp/dhad")) / stage
    work_dir.mkdir(parents=True, exist_ok=True)
    logdir = tracking.configure(spec, name=job.metadata.name or "local", namespace=job.metadata.namespace,
                                stage=stage, work_dir=work_dir)
    model_ref = job.resolved.model_uri or spec.model.uri
    model_dir = node_local_model(model_ref, work_dir / "base-model", spec, cluster)
    inputs = {name: node_local_model(uri, work_dir / "inputs" / name, spec, cluster)
              for name, uri in stage_inputs(job, spec, stage, root).items()}

    ckpts = CheckpointStore(store, checkpoints_uri(root, stage), cluster.node_rank, cluster.nnodes,
                            distributed.leaders_exchange)
    resume_uri = distributed.broadcast(choose_resume(spec, ckpts) if cluster.is_main else None)
    resume_dir = None
    if resume_uri:
        resume_dir = work_dir / "trainer" / f"checkpoint-{int(resume_uri.rstrip('/').rsplit('-', 1)[-1])}"
        if cluster.is_node_leader:
            log.info("resuming from %s", resume_uri)
            fetch_checkpoint(resume_uri, ckpts, spec, resume_dir)
        distributed.barrier()

    global _reporter
    reporter = _reporter = ProgressReporter(sink_from_env(), stage) if cluster.is_main else None
    if reporter and resume_uri:
        reporter.update(lastCheckpoint=resume_uri)
    publisher = AsyncPublisher(
        ckpts, work_dir / "uploading", cluster.is_main, spec.checkpoint.keep_last,
        on_complete=(lambda uri, step: reporter.update(lastCheckpoint=uri)) if reporter else None,
    ) if cluster.is_node_leader else None
    checkpoint_cb = CheckpointCallback(publisher, cluster)
    preemption = PreemptionCallback()
    callbacks = [checkpoint_cb, ProgressCallback(reporter, cluster), preemption]
    tensorboard = tracking.tensorboard_sync(store, root, stage, logdir) if cluster.is_main else None
    if tensorboard:
        callbacks.append(tensorboard)
    if TestHooks.wanted():
        callbacks.append(TestHooks(checkpoint_cb, cluster))
    if os.environ.get(WeightsDigest.ENV):
        callbacks.append(WeightsDigest(cluster.rank, os.environ[WeightsDigest.ENV]))
    run = StageRun(
        spec=spec, stage=stage, model_dir=model_dir, work_dir=work_dir, output_dir=work_dir / "output", inputs=inputs,
        data_store=RoutingStore(spec.storage), resume_from=resume_dir, callbacks=callbacks, deepspeed=ds_config, fsdp=fsdp,
        rank=cluster.rank, world_size=cluster.world_size, local_rank=cluster.local_rank, use_cpu=cluster.use_cpu,
        root=root,
    )
    run.output_dir.mkdir(parents=True, exist_ok=True)
    partial = f"{stage_uri(root, stage)}/partial"
    if stage in RESUMABLE_OUTPUT and cluster.is_main and store.list(partial):
        store.download_dir(partial, run.output_dir)  # what a killed attempt already paid for
    try:
        result = load_stage(stage)(run)
    except BaseException:
        if stage in RESUMABLE_OUTPUT and cluster.is_main:
            store.upload_dir(run.output_dir, partial)
        if tensorboard:
            tensorboard.finish()  # the curves up to the failure are what explains it
        raise
    checkpoint_cb.wait()
    if preemption.triggered:
        where = publisher.last_uri if publisher else "uploaded by this node's leader"
        raise Preempted(f"stopped by SIGTERM after step {preemption.step}; checkpoint {where}")

    metrics = dict(result.metrics)
    input_hashes = metrics.pop("input_sha256", {})
    if tensorboard:
        tracking.log_scalars(metrics, int(metrics.get("steps") or 0), f"{stage}/final")
        tensorboard.finish()
    out_uri = None
    if result.model_dir is None and any(run.output_dir.iterdir()):
        result.model_dir = run.output_dir  # a stage whose output is data or a report, not a model
    if cluster.is_main and result.model_dir is not None:
        input_hashes = {"model": models.tree_hash(model_dir), **input_hashes}
        out_uri = model_uri(root, stage)
        if stage in CARDED:
            models.write_model_card(result.model_dir, kind=job.kind.value, stage=stage, spec=spec, spec_dict=job.spec,
                                     inputs=input_hashes, base_uri=model_ref, base_dir=model_dir, output_uri=out_uri,
                                     job=f"{job.metadata.namespace}/{job.metadata.name}", scores=metrics.get("scores"))
        if job.kind.value != "EvalJob":
            lineage.write(result.model_dir, lineage.build(job, spec, stage, output_uri=out_uri, base_uri=model_ref, base_dir=model_dir,
                                                          inputs=input_hashes, code=models.code_version(), storage=spec.storage))
        upload_result(store, result.model_dir, out_uri)
        log.info("final model uploaded to %s", out_uri)
        if spec.output.hub and stage == stages_for(job.kind, spec)[-1] and stage in OUTPUT_STAGE:
            from dhad_trainer.storage import hub

            try:
                hub.push(result.model_dir, spec.output.hub, f"Dhad {job.kind.value} {job.metadata.name}: {stage} ({out_uri})")
            except hub.HubError as error:  # the model is safe in S3; training again would not help
                raise ConfigError(f"{error}; the model is at {out_uri}") from None
    if cluster.is_main and isinstance(metrics.get("scores"), dict):  # an EvalJob: scores beside the evaluated model
        lineage.record_evaluation(job, model_ref, metrics["scores"], f"{out_uri}/{metrics['report']}" if out_uri and metrics.get("report") else None,
                                  job.spec.get("evaluation") or {}, spec.storage)
    distributed.barrier()
    if reporter:
        numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        extra = {}
        if isinstance(metrics.get("scores"), dict):
            extra["scores"] = {k: float(v) for k, v in metrics["scores"].items() if isinstance(v, int | float)}
        if metrics.get("report") and out_uri:
            extra["report"] = f"{out_uri}/{metrics['report']}"
        reporter.close(final=True, outputModel=out_uri, metrics=dict(list(numbers.items())[:32]), **extra)
    return {"outputModel": out_uri, "metrics": metrics}


def write_failure(error: BaseException) -> Reason:
    reason = Reason.PREEMPTED if isinstance(error, Preempted) else failure_reason(error)
    run_dir = os.environ.get("DHAD_RUN_DIR")
    if not run_dir:
        return reason
    rank = os.environ.get("RANK", "0")
    record = {"reason": reason.value, "message": f"rank {rank}: {type(error).__name__}: {error}"[:2000], "time": time.time()}
    try:
        Path(run_dir, f"failure-{rank}.json").write_text(json.dumps(record))
    except OSError:
        pass
    return reason


def main(job_file: str) -> int:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(name)s: %(message)s")
    try:
        result = work(job_file)
        print(json.dumps({"result": result}, default=str), flush=True)
    except BaseException as error:  # noqa: BLE001 - every failure is classified for the launcher
        if not isinstance(error, Preempted):
            traceback.print_exc()
        reason = write_failure(error)
        if _reporter is not None:
            _reporter.close(final=True, failed=reason.value)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # peers may be gone: do not wait in process-group teardown
    from dhad_trainer.runtime import distributed

    distributed.teardown()
    return 0
