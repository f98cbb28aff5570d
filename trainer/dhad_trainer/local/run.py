"""Local mode: `dhad run -f manifest.yaml` runs a job through the same launcher and stages on this machine,
as the operator would on a cluster: one launcher process per node (JOB_COMPLETION_INDEX 0..N-1 on
127.0.0.1), sub-stages in order, gang restarts that resume from the newest checkpoint, and fromJob
resolved from jobs run earlier in the same session. Outputs go to the S3 API in the environment
(the embedded server the CLI starts, or any other); when a job ends its final model, report and
TensorBoard events are downloaded to a local folder. Rank 0's log streams to the terminal under a
progress bar (`quiet` silences both); `apply_overrides` is `--set path=value`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from dhad_api.jobs import OUTPUT_STAGE, JobSpec, parse_spec, stage_pods, stages_for
from dhad_api.layout import model_uri, output_root, tensorboard_uri
from dhad_api.reasons import NO_RETRY, ExitCode
from dhad_api.references import resolve_models
from dhad_trainer.storage.embedded_s3 import free_port


class LocalRunError(RuntimeError):
    """A job failed in local mode; the message says which stage and why."""


@dataclass
class Session:
    """Jobs run so far (for fromJob) and where their files go."""

    workdir: Path
    env: dict[str, str]
    namespace: str = "local"
    succeeded: dict[tuple[str, str], dict] = field(default_factory=dict)
    show_progress: bool = True  # False (-q): no progress bar and no streamed log


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """`path=value` pairs (`--set`) applied to a manifest: the path is under spec unless it starts with
    spec. or metadata., dots separate keys and list indexes, the value is YAML (5, true, {uri: s3://x},
    [a, b]), and null removes the key. Schema errors are the spec parser's, after all overrides."""
    import copy

    import yaml

    doc = copy.deepcopy(doc)
    for item in overrides:
        path, sep, raw = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not sep or not keys:
            raise LocalRunError(f"--set {item!r}: expected path=value, for example resources.nodes=1")
        if keys[0] not in ("spec", "metadata"):
            keys = ["spec", *keys]
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = doc
        try:
            for key in keys[:-1]:
                node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
                if not isinstance(node, dict | list):
                    raise LocalRunError(f"--set {path}: {key} is a {type(node).__name__}, not a mapping or list")
            last = keys[-1]
            if isinstance(node, list):
                index = int(last)
                if value is None:
                    del node[index]
                elif index == len(node):
                    node.append(value)
                else:
                    node[index] = value
            elif value is None:
                node.pop(last, None)
            else:
                node[last] = value
        except (ValueError, IndexError) as error:
            raise LocalRunError(f"--set {path}: {error} (list items are addressed by index, for example data.0.uri)") from None
    return doc


def job_document(doc: dict, spec: JobSpec, session: Session) -> dict:
    """The job.json the operator would render, with fromJob resolved from this session's jobs."""
    name = doc["metadata"]["name"]
    uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"dhad-local/{session.namespace}/{doc['kind']}/{name}"))
    observed = {key: {"status": status} for key, status in session.succeeded.items()}
    resolved, waiting = resolve_models(spec, observed)
    if waiting:
        raise LocalRunError(f"{doc['kind']} {name}: {waiting[1]} (run that manifest first)")
    resolved["outputRoot"] = output_root(spec.storage, session.namespace, name, uid)
    return {"apiVersion": doc.get("apiVersion", "dhad.dev/v1alpha1"), "kind": doc["kind"],
            "metadata": {"name": name, "namespace": session.namespace, "uid": uid},
            "spec": spec.to_json_dict(), "resolved": resolved}


def _watch(progress_file: Path, log_file: Path, procs: list[subprocess.Popen], stage: str, show: bool) -> None:
    """While the launchers run: rank 0's log on the terminal, under a bar fed by its progress reports."""
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(desc=stage, unit="step", dynamic_ncols=True, leave=True)
    seen, offset = 0, 0

    def follow() -> None:
        nonlocal seen, offset
        if log_file.exists():
            with open(log_file, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk.rfind(b"\n") + 1  # a line still being written waits for the next turn
            offset += complete
            for line in chunk[:complete].decode("utf-8", errors="replace").splitlines():
                bar.write(line)
        if progress_file.exists():
            lines = progress_file.read_text(encoding="utf-8").splitlines()
            for line in lines[seen:]:
                try:
                    report = json.loads(line)
                except ValueError:
                    continue
                if report.get("totalSteps"):
                    bar.total = report["totalSteps"]
                bar.n = report.get("step", bar.n)
                bar.set_postfix({k: round(report[k], 4) for k in ("loss", "tokensPerSecond") if report.get(k) is not None})
                bar.refresh()
            seen = len(lines)

    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
        if bar is not None:
            follow()
    if bar is not None:
        follow()
        bar.close()


def run_stage(job_file: Path, spec: JobSpec, stage: str, attempt: int, session: Session, logs: Path) -> int:
    """One attempt of one sub-stage: one launcher per pod of its Indexed Job (`stage_pods`)."""
    pods = stage_pods(None, spec, stage)
    port = free_port()
    progress_file = logs / f"{stage}-progress.jsonl"
    procs = []
    for index in range(pods.pods):
        env = {**os.environ, **session.env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "JOB_COMPLETION_INDEX": str(index), "DHAD_STAGE": stage, "DHAD_ATTEMPT": str(attempt),
               "DHAD_PROGRESS_FILE": str(progress_file), "DHAD_PROGRESS_INTERVAL": env_interval(),
               "DHAD_TERMINATION_LOG": str(logs / f"{stage}-{attempt}-{index}.termination"),
               "NNODES": str(pods.pods), "DHAD_NPROC_PER_NODE": str(pods.procs_per_pod),
               # a pod's own disk: every node and attempt starts with an empty scratch folder
               "DHAD_WORK_DIR": str(logs / "scratch" / f"attempt-{attempt}" / f"node-{index}")}
        log = open(logs / f"{stage}-{attempt}-{index}.log", "ab")  # noqa: SIM115 - owned by the child
        procs.append(subprocess.Popen([sys.executable, "-m", "dhad_trainer", "launch", str(job_file)],
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
        log.close()
    _watch(progress_file, logs / f"{stage}-{attempt}-0.log", procs, stage, session.show_progress)
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)


def env_interval() -> str:
    return os.environ.get("DHAD_PROGRESS_INTERVAL", "2")


def termination_message(logs: Path, stage: str, attempt: int) -> str:
    messages = [p.read_text(errors="replace") for p in sorted(logs.glob(f"{stage}-{attempt}-*.termination"))]
    return "; ".join(m for m in messages if m)[:2000]


def run_job(doc: dict, session: Session) -> dict:
    """Runs every sub-stage of one manifest; returns the status the operator would report."""
    spec = parse_spec(doc["kind"], doc["spec"])
    document = job_document(doc, spec, session)
    name = doc["metadata"]["name"]
    logs = session.workdir / "jobs" / f"{doc['kind'].lower()}-{name}"
    logs.mkdir(parents=True, exist_ok=True)
    job_file = logs / "job.json"
    job_file.write_text(json.dumps(document, ensure_ascii=False, indent=2))
    root = document["resolved"]["outputRoot"]
    restarts = 0
    for stage in stages_for(doc["kind"], spec):
        attempt = 0
        while True:
            attempt += 1
            code = run_stage(job_file, spec, stage, attempt, session, logs)
            if code == 0:
                break
            message = termination_message(logs, stage, attempt)
            if code in {int(c) for c in NO_RETRY} or restarts >= spec.restart_policy.max_restarts:
                raise LocalRunError(f"{doc['kind']} {name}: stage {stage} failed (exit {code}): {message}; logs in {logs}")
            if code != ExitCode.PREEMPTED:
                restarts += 1
            print(f"   stage {stage} attempt {attempt} failed ({message}); restarting from the newest checkpoint", flush=True)
    status = {"state": "Succeeded", "restarts": restarts, "outputRoot": root, "logs": str(logs)}
    last = stages_for(doc["kind"], spec)[-1]
    if last in OUTPUT_STAGE:
        status["outputModel"] = model_uri(root, OUTPUT_STAGE[last])
    session.succeeded[(doc["kind"], name)] = status
    return status


def download_outputs(status: dict, kind: str, dest: Path) -> dict[str, str]:
    """The job's final model (or an EvalJob's report and card) and its TensorBoard events, into `dest`."""
    from dhad_trainer.storage.routing import open_store

    root = status["outputRoot"]
    store = open_store(root)
    wanted = {"tensorboard": tensorboard_uri(root)}
    if status.get("outputModel"):
        wanted["model"] = status["outputModel"]
    if kind == "EvalJob":
        wanted["."] = model_uri(root, "eval")  # report/ and the evaluated model's card (README.md)
    written: dict[str, str] = {}
    for name, uri in wanted.items():
        target = dest / name
        if store.download_dir(uri, target):
            written[name] = str(target.resolve())
    (dest / "status.json").write_text(json.dumps(status, indent=2, ensure_ascii=False), encoding="utf-8")
    return written
