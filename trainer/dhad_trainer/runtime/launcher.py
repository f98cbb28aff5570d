"""The pod entrypoint: check the job and everything it references, then run torchrun and explain its exit.

Checks run before any GPU time and without torch (seconds, not minutes): the spec parses, the stage
exists, the bucket exists, the models and dataset paths exist and are not empty. In the job's first
sub-stage they cover every later sub-stage too, with `preflight.check_job` (vLLM, flash-attn, DeepSpeed
ops, gated hf:// access, work-volume space), so nothing fails for want of them after GPU time was spent. A failure exits
BAD_CONFIG or DATA_ERROR (the operator does not retry those) with a JSON termination message
{"reason", "message"}. torchrun exits 1 for any worker failure, so each failing worker writes its
reason into DHAD_RUN_DIR and the launcher exits with the earliest one's code. SIGTERM (eviction,
preemption, suspend) is forwarded; workers save a checkpoint if they can and the exit is PREEMPTED.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from pydantic import ValidationError

from dhad_api.jobs import Job, JobSpec, PretrainJobSpec, RLAIFJobSpec, SFTJobSpec, stage_pods, stages_for
from dhad_api.layout import MANIFEST
from dhad_api.layout import output_root as layout_root
from dhad_api.reasons import EXIT_REASONS, TERMINATION_LOG_ENV, ExitCode, Reason
from dhad_trainer.data.readers import DataError, resolve
from dhad_trainer.runtime import preflight
from dhad_trainer.storage.base import StorageError
from dhad_trainer.storage.routing import RoutingStore, open_store

log = logging.getLogger("dhad_trainer.runtime.launcher")
CODES = {reason: code for code, reason in EXIT_REASONS.items()}


class ConfigError(Exception):
    """The job or something it names is wrong in a way a retry cannot fix."""


def failure_reason(error: BaseException) -> Reason:
    if isinstance(error, ConfigError | ValidationError):
        return Reason.BAD_CONFIG
    if isinstance(error, DataError):
        return Reason.DATA_ERROR
    if isinstance(error, StorageError):
        return Reason.STORAGE_UNAVAILABLE
    return Reason.WORKER_FAILED


def load_job(path: str | Path) -> Job:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot read job file {path}: {error}") from None
    try:
        job = Job.model_validate(doc)
        job.typed_spec()
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"invalid {doc.get('kind', 'job')} spec: {field}: {first['msg']} ({error.error_count()} error(s))") from None
    return job


def output_root(job: Job) -> str:
    """Where this job's outputs go: DHAD_OUTPUT_ROOT (local runs), the operator's resolved root, or the layout."""
    spec = job.typed_spec()
    meta = job.metadata
    return os.environ.get("DHAD_OUTPUT_ROOT") or job.resolved.output_root or layout_root(
        spec.storage, meta.namespace, meta.name, meta.uid or "local")


def data_uris(spec: JobSpec, stage: str) -> list[str]:
    """The dataset URIs `stage` reads (hf:// ones cannot be checked offline and are skipped)."""
    uris: list[str] = []
    if isinstance(spec, PretrainJobSpec):
        uris = [s.uri for s in spec.data.sources] + list(spec.data.decontamination.benchmarks)
        uris += [spec.vocabulary.corpus] if spec.vocabulary.corpus else []
    elif isinstance(spec, SFTJobSpec) and stage == "sft":
        uris = [d.uri for d in spec.data]
    elif isinstance(spec, SFTJobSpec) and stage == "respond":
        uris = [p.uri for p in spec.respond.prompts]
    elif isinstance(spec, RLAIFJobSpec) and stage == "feedback":
        uris = [p.uri for p in spec.feedback.prompts]
    return [u for u in uris if not u.startswith("hf://")]


def validate(job: Job, stage: str) -> None:
    """Everything that can be checked before torchrun; raises ConfigError, DataError or StorageError."""
    spec = job.typed_spec()
    stages = stages_for(job.kind, spec)
    if stage not in stages:
        raise ConfigError(f"{job.kind.value} has no stage {stage!r}; stages: {', '.join(stages)}")
    root = output_root(job)
    store = open_store(root, spec.storage)
    if root.startswith("s3://") and getattr(store, "has_keys", False):
        try:
            store.check_bucket()
        except FileNotFoundError as error:
            raise ConfigError(f"storage.bucket: {error}") from None
    model = job.resolved.model_uri or spec.model.uri
    if not model:
        raise ConfigError("model: fromJob is not resolved yet (no resolved.modelUri in the job file)")
    first = stage == stages[0]
    models = preflight.model_references(job, spec) if first else [("model.uri", model), ("model.tokenizer", spec.model.tokenizer)]
    for field, uri in models:
        if uri and not uri.startswith("hf://"):
            target = open_store(uri, spec.storage)
            if not any(target.exists(f"{uri.rstrip('/')}/{name}") for name in ("config.json", "tokenizer_config.json")):
                raise ConfigError(f"{field}: {uri} has no config.json (not a Hugging Face model folder)")
    if spec.checkpoint.resume_from:
        target = open_store(spec.checkpoint.resume_from, spec.storage)
        if not target.exists(f"{spec.checkpoint.resume_from.rstrip('/')}/{MANIFEST}"):
            raise ConfigError(f"checkpoint.resumeFrom: {spec.checkpoint.resume_from} is not a complete checkpoint (no {MANIFEST})")
    if spec.output.hub:
        from dhad_trainer.storage.hub import HubError, check_token

        try:
            check_token(spec.output.hub)
        except HubError as error:
            raise ConfigError(str(error)) from None
    for name in spec.tracking.integrations():
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"tracking.{name}: the {name} package is not installed in this trainer image")
    data = RoutingStore(spec.storage)
    for uri in [u for s in (stages if first else [stage]) for u in data_uris(spec, s)]:
        paths = resolve(uri, data)
        if not any(data.size(p) > 0 for p in paths):
            raise DataError(f"{uri}: empty dataset (all {len(paths)} file(s) are empty)")
    if first:
        try:
            preflight.check_job(job)
        except preflight.PreflightError as error:
            raise ConfigError(str(error)) from None


def write_termination(reason: Reason, message: str) -> None:
    path = os.environ.get(TERMINATION_LOG_ENV, "/dev/termination-log")
    body = json.dumps({"reason": reason.value, "message": message[:3000]})
    try:
        Path(path).write_text(body)
    except OSError:
        pass


def cpu_count(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Usable cores: affinity, capped by a cgroup v2 CPU quota when one is set."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def torchrun_command(job: Job, job_file: str, stage: str) -> tuple[list[str], int]:
    """torchrun for this pod: --nnodes/--nproc-per-node from the operator's NNODES/NPROC_PER_NODE (the
    sub-stage's own pod count, `stage_pods`), which local mode and tests may override with DHAD_NPROC_PER_NODE."""
    spec = job.typed_spec()
    pods = stage_pods(job.kind, spec, stage)
    nnodes = int(os.environ.get("NNODES") or pods.pods)
    nproc = int(os.environ.get("DHAD_NPROC_PER_NODE") or os.environ.get("NPROC_PER_NODE") or pods.procs_per_pod)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
           "--nproc-per-node", str(nproc), "--node-rank", os.environ.get("JOB_COMPLETION_INDEX", "0"),
           "--master-addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
           "--master-port", os.environ.get("MASTER_PORT", "29500"), "--max-restarts", "0",
           "-m", "dhad_trainer", "worker", job_file]
    return cmd, nproc


def worker_reason(run_dir: Path) -> tuple[Reason, str]:
    """The earliest failure a worker wrote; a crash without one (segfault, OOM kill) is WorkerFailed."""
    records = []
    for path in run_dir.glob("failure-*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return Reason.WORKER_FAILED, "a worker process died without reporting a reason (see the pod log)"
    first = min(records, key=lambda r: r.get("time", 0))
    return Reason(first["reason"]), first["message"]


def run_in_process(job: Job, stage: str) -> int:
    """A sub-stage whose pods work alone (prepare): no torchrun, no process group; this pod is worker
    JOB_COMPLETION_INDEX of the stage's pods, and its failure is retried alone."""
    from dhad_trainer.runtime.progress import ProgressReporter, sink_from_env
    from dhad_trainer.stages.prepare import run_pod

    index = int(os.environ.get("JOB_COMPLETION_INDEX", "0"))
    pods = stage_pods(job.kind, job.typed_spec(), stage).pods
    reporter = ProgressReporter(sink_from_env(), stage) if index == 0 else None
    work_dir = Path(os.environ.get("DHAD_WORK_DIR", "/tmp/dhad")) / stage
    try:
        run_pod(job, output_root(job), index, pods, work_dir, reporter)
    except Exception as error:  # noqa: BLE001 - classified, reported, exited
        reason = failure_reason(error)
        log.exception("%s: %s", reason.value, error)
        write_termination(reason, f"{stage} worker {index}: {error}")
        if reporter:
            reporter.close(final=True, failed=reason.value)
        return CODES[reason]
    if reporter:
        reporter.close(final=True)
    write_termination(Reason.STAGE_SUCCEEDED, f"stage {stage} worker {index} finished")
    return ExitCode.SUCCESS


def launch(job_file: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher: %(message)s")
    try:
        job = load_job(job_file)
        stage = os.environ.get("DHAD_STAGE") or stages_for(job.kind, job.typed_spec())[0]
        validate(job, stage)
    except Exception as error:  # noqa: BLE001 - classified, reported, exited
        reason = failure_reason(error)
        log.error("%s: %s", reason.value, error)
        write_termination(reason, str(error))
        return CODES[reason]
    if not stage_pods(job.kind, job.typed_spec(), stage).gang:
        return run_in_process(job, stage)
    cmd, nproc = torchrun_command(job, job_file, stage)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, cpu_count() // nproc)))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "dhad" / "torch-extensions"))
    run_dir = Path(tempfile.mkdtemp(prefix="dhad-run-"))
    env["DHAD_RUN_DIR"] = str(run_dir)
    log.info("stage %s attempt %s: %s", stage, env.get("DHAD_ATTEMPT", "?"), " ".join(cmd))
    child = subprocess.Popen(cmd, env=env)
    terminated = []

    def forward(signum, _frame):
        terminated.append(signum)
        child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = child.wait()
    if code == 0:
        write_termination(Reason.STAGE_SUCCEEDED, f"stage {stage} finished")
        return ExitCode.SUCCESS
    reason, message = worker_reason(run_dir)
    if terminated:
        reason, message = Reason.PREEMPTED, f"SIGTERM received; workers stopped ({message})"
    log.error("%s: %s", reason.value, message)
    write_termination(reason, message)
    return CODES.get(reason, ExitCode.WORKER_FAILED)
