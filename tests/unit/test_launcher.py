"""The pod entrypoint: checks before torchrun, exit codes and termination messages, torchrun's command.

The helpers here (`job_doc`, `Launch`) also drive the training tests: they run the launcher exactly as a
pod does, `python -m dhad_trainer launch job.json`, with the env the operator would set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dhad_api.jobs import Job
from dhad_api.reasons import ExitCode, Reason
from dhad_trainer.data.readers import DataError
from dhad_trainer.local.tiny import DEFAULT_CORPUS
from dhad_trainer.runtime import launcher
from tests.harness.processes import free_port

REPO = Path(__file__).resolve().parents[2]


def job_doc(model: str, corpus: str, *, root: str | None = None, bucket: str = "dhad-test", uid: str = "u1",
            nodes: int = 1, steps: int = 8, interval: int = 2, keep: int = 2, distributed: dict | None = None,
            vocabulary: int = 0, seq: int = 64) -> dict:
    """A tiny PretrainJob as the operator writes it into /etc/dhad/job.json."""
    spec = {
        "model": {"uri": model, "dtype": "float32"},
        "resources": {"nodes": nodes, "gpusPerNode": 0},
        "storage": {"bucket": bucket},
        "checkpoint": {"intervalSteps": interval, "keepLast": keep},
        "distributed": distributed or {"strategy": "ddp"},
        "data": {"sources": [{"uri": corpus, "format": "text"}], "filters": {"minChars": 20},
                 "packing": {"sequenceLength": seq, "blocksPerShard": 32}},
        "vocabulary": {"newTokens": vocabulary},
        "training": {"learningRate": 0.002, "warmupSteps": 1, "microBatchSize": 2, "maxSteps": steps,
                     "precision": "fp32", "logEverySteps": 1, "seed": 7},
    }
    doc = {"apiVersion": "dhad.dev/v1alpha1", "kind": "PretrainJob",
           "metadata": {"name": "tiny", "namespace": "ns", "uid": uid}, "spec": spec}
    if root:
        doc["resolved"] = {"outputRoot": root}
    return doc


@dataclass
class Launch:
    """One launcher process (one pod) and where it left its outputs."""

    dir: Path
    proc: subprocess.Popen

    @classmethod
    def start(cls, doc: dict, folder: Path, env: dict | None = None, node: int = 0, nproc: int = 2) -> Launch:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "job.json").write_text(json.dumps(doc, ensure_ascii=False))
        full = {**os.environ, "OMP_NUM_THREADS": "1", "DHAD_WORK_DIR": str(folder / "work"),
                "DHAD_NPROC_PER_NODE": str(nproc), "JOB_COMPLETION_INDEX": str(node),
                "DHAD_TERMINATION_LOG": str(folder / "termination.json"),
                "DHAD_PROGRESS_FILE": str(folder / "progress.jsonl"), "DHAD_PROGRESS_INTERVAL": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false",
                **(env or {})}
        log = open(folder / "launcher.log", "wb")  # noqa: SIM115 - closed by wait()
        proc = subprocess.Popen([sys.executable, "-m", "dhad_trainer", "launch", str(folder / "job.json")],
                                cwd=REPO, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return cls(folder, proc)

    def wait(self, timeout: float = 400) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            raise AssertionError(f"launcher timed out; log tail:\n{self.log[-4000:]}") from None

    @property
    def log(self) -> str:
        return (self.dir / "launcher.log").read_text(errors="replace")

    @property
    def termination(self) -> dict:
        return json.loads((self.dir / "termination.json").read_text())

    def reports(self) -> list[dict]:
        path = self.dir / "progress.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def wait_for(self, predicate, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if predicate(self):
                return
            time.sleep(0.2)
        raise AssertionError(f"condition not reached; log tail:\n{self.log[-3000:]}")


def prepare_job(doc: dict, folder: Path, env: dict | None = None) -> Launch:
    """Runs a PretrainJob's prepare sub-stage as its single worker pod would; training launches then
    need DHAD_STAGE=pretrain (a pod runs the sub-stage the operator names)."""
    launch = Launch.start(doc, folder, {**(env or {}), "DHAD_STAGE": "prepare"}, nproc=1)
    assert launch.wait() == 0, launch.log[-4000:]
    return launch


@pytest.fixture
def model_dir(tmp_path):
    """A folder that looks like a model to the checks (they only look, no torch here)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return str(tmp_path / "model")


def run_launcher(doc: dict, folder: Path, env: dict | None = None) -> tuple[int, dict]:
    launch = Launch.start(doc, folder, {"DHAD_OUTPUT_ROOT": str(folder / "out"), **(env or {})})
    return launch.wait(60), launch.termination


def test_bad_spec_exits_bad_config_naming_the_field(tmp_path, model_dir):
    doc = job_doc(model_dir, str(DEFAULT_CORPUS))
    doc["spec"]["training"]["learningRate"] = -1
    code, term = run_launcher(doc, tmp_path)
    assert code == ExitCode.BAD_CONFIG and term["reason"] == Reason.BAD_CONFIG
    assert "training.learningRate" in term["message"]


def test_missing_dataset_exits_data_error(tmp_path, model_dir):
    code, term = run_launcher(job_doc(model_dir, str(tmp_path / "nowhere" / "corpus.txt")), tmp_path)
    assert code == ExitCode.DATA_ERROR and term["reason"] == Reason.DATA_ERROR
    assert "nowhere/corpus.txt" in term["message"]


def check(doc: dict, stage: str = "pretrain"):
    launcher.validate(Job.model_validate(doc), stage)


def test_checks_before_any_gpu_time(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("DHAD_OUTPUT_ROOT", str(tmp_path / "out"))
    check(job_doc(model_dir, str(DEFAULT_CORPUS)))  # a good job passes
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        check(job_doc(model_dir, str(tmp_path / "empty.txt")))
    with pytest.raises(launcher.ConfigError, match="model.uri"):
        check(job_doc(str(tmp_path / "no-model"), str(DEFAULT_CORPUS)))
    with pytest.raises(launcher.ConfigError, match="no stage 'sft'"):
        check(job_doc(model_dir, str(DEFAULT_CORPUS)), stage="sft")
    doc = job_doc(model_dir, str(DEFAULT_CORPUS))
    doc["spec"]["checkpoint"]["resumeFrom"] = "s3://bucket/x/checkpoints/step-000002"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(launcher.StorageError):  # unreachable storage: retryable
        check(doc)


@pytest.mark.s3
def test_storage_checks_with_credentials(s3_server, s3_bucket, s3_prefix, model_dir, monkeypatch):
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    check(job_doc(model_dir, str(DEFAULT_CORPUS), root=s3_prefix, bucket=s3_bucket))
    with pytest.raises(launcher.ConfigError, match="storage.bucket"):
        check(job_doc(model_dir, str(DEFAULT_CORPUS), root="s3://missing-bucket-x/p", bucket="missing-bucket-x"))
    with pytest.raises(DataError):
        check(job_doc(model_dir, f"{s3_prefix}/no/such/corpus.txt", root=s3_prefix, bucket=s3_bucket))
    with pytest.raises(launcher.ConfigError, match="no config.json"):
        check(job_doc(f"{s3_prefix}/no-model", str(DEFAULT_CORPUS), root=s3_prefix, bucket=s3_bucket))


def test_earliest_worker_failure_names_the_exit(tmp_path):
    assert launcher.worker_reason(tmp_path)[0] == Reason.WORKER_FAILED  # died without a word
    (tmp_path / "failure-1.json").write_text(json.dumps({"reason": "WorkerFailed", "message": "peer gone", "time": 2}))
    (tmp_path / "failure-0.json").write_text(json.dumps({"reason": "DataError", "message": "rank 0: bad", "time": 1}))
    assert launcher.worker_reason(tmp_path) == (Reason.DATA_ERROR, "rank 0: bad")
    assert launcher.CODES[Reason.DATA_ERROR] == ExitCode.DATA_ERROR


def test_torchrun_command_and_thread_budget(model_dir, monkeypatch):
    for name in ("DHAD_NPROC_PER_NODE", "NNODES", "NPROC_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.setenv("MASTER_ADDR", "job-pt-1-0.job-pt")
    doc = job_doc(model_dir, str(DEFAULT_CORPUS), nodes=4)
    doc["spec"]["resources"]["gpusPerNode"] = 8
    cmd, nproc = launcher.torchrun_command(Job.model_validate(doc), "/etc/dhad/job.json", "pretrain")
    line = " ".join(cmd)
    assert nproc == 8 and "--nnodes 4 --nproc-per-node 8 --node-rank 3 --master-addr job-pt-1-0.job-pt" in line
    assert line.endswith("-m dhad_trainer worker /etc/dhad/job.json")
    monkeypatch.setenv("NNODES", "1")  # the operator's env for this sub-stage (stage_pods) wins over the spec
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    cmd, nproc = launcher.torchrun_command(Job.model_validate(doc), "/etc/dhad/job.json", "pretrain")
    assert nproc == 1 and "--nnodes 1 --nproc-per-node 1 " in " ".join(cmd)


def test_cpu_count_is_the_affinity_capped_by_the_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    for text, expected in [("max 100000", affinity), ("50000 100000", 1), ("150000 100000", min(affinity, 2)),
                           (f"{(affinity + 3) * 100000} 100000", affinity), ("garbage", affinity)]:
        cpu_max.write_text(text)
        assert launcher.cpu_count(cpu_max) == expected, text
    assert launcher.cpu_count(tmp_path / "absent") == affinity  # no cgroup v2: the affinity alone


def test_stage_modules_are_found_by_name():
    from dhad_trainer.runtime.worker import load_stage

    assert callable(load_stage("pretrain"))
    with pytest.raises(launcher.ConfigError, match="dhad_trainer.stages.nosuchstage"):
        load_stage("nosuchstage")
