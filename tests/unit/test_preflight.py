"""Pre-flight of the whole job: every capability a later sub-stage needs is checked by the real launcher
(`python -m dhad_trainer launch job.json`, as a pod runs it) in the first sub-stage, which exits 78
(BadConfig) naming the field before torchrun (and so any training) starts.

The Hugging Face Hub cannot be reached from here; its auth-check endpoint is played by a small local
server (the one fault a real part cannot show: a gated model), reached through HF_ENDPOINT exactly as
huggingface_hub reaches the real Hub.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dhad_api.jobs import Job
from dhad_api.reasons import ExitCode, Reason
from dhad_trainer.local.tiny import DEFAULT_CORPUS
from dhad_trainer.runtime import launcher, preflight
from tests.unit.test_launcher import REPO, Launch, job_doc

TORCHRUN = "torch.distributed.run"


@pytest.fixture
def model_dir(tmp_path):
    """A model folder as the checks see it (they look, no torch): a tiny Llama config and 3 MB of weights."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512}))
    (folder / "model.safetensors").write_bytes(b"\0" * (3 * 2**20))
    return str(folder)


def rlaif_doc(model: str, prompts: str, **policy) -> dict:
    spec = {
        "model": {"uri": model},
        "resources": {"nodes": 1, "gpusPerNode": 0},
        "storage": {"bucket": "dhad-test"},
        "feedback": {"prompts": [{"uri": prompts, "schema": "prompt-completion"}],
                     "judge": {"endpoint": {"baseUrl": "http://127.0.0.1:9/v1", "model": "judge"}}},
        "policy": {"algorithm": "grpo", "generationsPerPrompt": 2, **policy,
                   "training": {"microBatchSize": 2, "maxSteps": 2, "precision": "fp32"}},
    }
    return {"apiVersion": "dhad.dev/v1alpha1", "kind": "RLAIFJob", "metadata": {"name": "rl", "namespace": "ns", "uid": "u"},
            "spec": spec}


@pytest.fixture
def prompts(tmp_path) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ما عاصمة مصر؟"}, ensure_ascii=False) + "\n")
    return str(path)


def launch(doc: dict, folder: Path, env: dict | None = None) -> tuple[int, dict, str]:
    run = Launch.start(doc, folder, {"DHAD_OUTPUT_ROOT": str(folder / "out"), **(env or {})})
    code = run.wait(60)
    return code, run.termination, run.log


def assert_bad_config_before_training(code: int, term: dict, log: str, field: str) -> None:
    assert code == ExitCode.BAD_CONFIG, log[-2000:]
    assert term["reason"] == Reason.BAD_CONFIG and field in term["message"], term
    assert TORCHRUN not in log  # torchrun (every worker, so any training) never started


def test_rlaif_use_vllm_without_vllm_fails_in_the_feedback_sub_stage(tmp_path, model_dir, prompts):
    """The policy sub-stage would import vLLM after feedback and reward had run; feedback refuses it."""
    assert not preflight.installed("vllm")  # this environment is the case the test is about
    doc = rlaif_doc(model_dir, prompts, useVllm=True)
    code, term, log = launch(doc, tmp_path, {"DHAD_STAGE": "feedback"})
    assert_bad_config_before_training(code, term, log, "policy.useVllm")
    assert "vLLM is not installed" in term["message"]
    check = Job.model_validate(rlaif_doc(model_dir, prompts))  # the same job without useVllm passes
    os.environ["DHAD_OUTPUT_ROOT"] = str(tmp_path / "out")
    try:
        launcher.validate(check, "feedback")
    finally:
        del os.environ["DHAD_OUTPUT_ROOT"]


def test_flash_attention_asked_but_not_installed(tmp_path, model_dir):
    assert not preflight.installed("flash_attn")
    doc = job_doc(model_dir, str(DEFAULT_CORPUS))
    doc["spec"]["model"]["attention"] = "flash-attention-2"
    code, term, log = launch(doc, tmp_path)
    assert_bad_config_before_training(code, term, log, "model.attention")


def test_offload_needs_a_cpu_adam_it_can_build(tmp_path, model_dir):
    """DeepSpeed's CPU Adam is not prebuilt in this wheel; without a C++ compiler on PATH it cannot be built."""
    assert not preflight.deepspeed_prebuilt_ops().get("cpu_adam")
    doc = job_doc(model_dir, str(DEFAULT_CORPUS),
                  distributed={"strategy": "deepspeed", "zeroStage": 2, "offload": "optimizer"})
    bare = tmp_path / "bin"  # a PATH with python and ninja, no compiler
    bare.mkdir()
    for tool in ("python", "ninja"):
        if found := shutil.which(tool, path=str(Path(sys.executable).parent)):
            (bare / tool).symlink_to(found)
    code, term, log = launch(doc, tmp_path / "run", {"PATH": str(bare)})
    assert_bad_config_before_training(code, term, log, "distributed.offload")
    assert "cpu_adam" in term["message"] and "C++ compiler" in term["message"]
    assert preflight.cpp_toolchain_missing() == [] or shutil.which("g++") is None  # with the machine's PATH it builds


def test_bf16_pure_is_refused_under_deepspeed(tmp_path, model_dir):
    doc = job_doc(model_dir, str(DEFAULT_CORPUS), distributed={"strategy": "deepspeed", "zeroStage": 3})
    doc["spec"]["training"]["precision"] = "bf16-pure"
    code, term, log = launch(doc, tmp_path)
    assert_bad_config_before_training(code, term, log, "training.precision")


class FakeHub(BaseHTTPRequestHandler):
    """The Hub's auth-check: `org/gated` needs the token `hf_good`, `org/open` is public, the rest is 404."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.seen.append((self.path, self.headers.get("authorization")))
        if self.path == "/api/models/org/open/auth-check":
            self._answer(200, {})
        elif self.path == "/api/models/org/gated/auth-check":
            if self.headers.get("authorization") == "Bearer hf_good":
                self._answer(200, {})
            else:
                self._answer(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
        else:
            self._answer(404, {"error": "not found"}, {"X-Error-Code": "RepoNotFound"})

    def _answer(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.mark.parametrize(("repo", "token", "ok", "says"), [
    ("org/gated", None, False, "no token is set"),
    ("org/gated", "hf_wrong", False, "has no access"),
    ("org/gated", "hf_good", True, ""),
    ("org/open", None, True, ""),
    ("org/missing", None, False, "does not exist"),
])
def test_gated_hf_model_needs_the_token_from_the_secret_reference(tmp_path, hub, repo, token, ok, says):
    """The pretrain example starts from a gated model: the launcher asks the Hub with HF_TOKEN (the pod gets it
    from spec.hfTokenSecretRef) before anything is downloaded."""
    doc = job_doc(f"hf://{repo}", str(DEFAULT_CORPUS))
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}", "HF_HUB_OFFLINE": "0", "HF_TOKEN": token or ""}
    if ok:  # in-process: the launch itself would go on to download from the fake hub
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({**env, "DHAD_OUTPUT_ROOT": str(tmp_path / "out")})
        try:
            from huggingface_hub import constants

            # huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when first imported
            old = constants.ENDPOINT, constants.HF_HUB_OFFLINE
            constants.ENDPOINT, constants.HF_HUB_OFFLINE = env["HF_ENDPOINT"], False
            try:
                preflight.check_job(Job.model_validate(doc))
            finally:
                constants.ENDPOINT, constants.HF_HUB_OFFLINE = old
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
            os.environ.pop("DHAD_OUTPUT_ROOT", None)
    else:
        code, term, log = launch(doc, tmp_path, env)
        assert_bad_config_before_training(code, term, log, "model.uri")
        assert says in term["message"] and f"hf://{repo}" in term["message"]
        assert "hf_" not in term["message"] and "hf_wrong" not in log  # the token is never echoed
    assert (f"/api/models/{repo}/auth-check", f"Bearer {token}" if token else None) in hub.seen


def test_work_volume_too_small_for_model_and_two_checkpoints(tmp_path, model_dir):
    """A real 1 MiB tmpfs as the work volume (private mount namespace) cannot hold a 3 MiB model."""
    if shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to mount a private tmpfs")
    folder = tmp_path / "run"
    folder.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (folder / "job.json").write_text(json.dumps(job_doc(model_dir, str(DEFAULT_CORPUS))))
    env = {**os.environ, "DHAD_WORK_DIR": str(work / "dhad"), "DHAD_OUTPUT_ROOT": str(folder / "out"),
           "DHAD_TERMINATION_LOG": str(folder / "termination.json")}
    script = f'mount -t tmpfs -o size=1m tmpfs {work} && exec {sys.executable} -m dhad_trainer launch {folder / "job.json"}'
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    term = json.loads((folder / "termination.json").read_text())
    assert_bad_config_before_training(proc.returncode, term, proc.stdout + proc.stderr, "resources")
    assert "work volume" in term["message"] and "two checkpoints" in term["message"]
    os.environ["DHAD_WORK_DIR"] = str(tmp_path / "big")  # the same job on this machine's disk passes
    os.environ["DHAD_OUTPUT_ROOT"] = str(folder / "out")
    try:
        preflight.check_job(Job.model_validate(job_doc(model_dir, str(DEFAULT_CORPUS))))
    finally:
        del os.environ["DHAD_WORK_DIR"], os.environ["DHAD_OUTPUT_ROOT"]


def test_first_sub_stage_checks_the_later_ones_data(tmp_path, model_dir, prompts):
    """SFT's respond runs first; a missing SFT dataset is found then, not after the teacher was paid."""
    doc = {"apiVersion": "dhad.dev/v1alpha1", "kind": "SFTJob", "metadata": {"name": "s", "namespace": "ns", "uid": "u"},
           "spec": {"model": {"uri": model_dir}, "resources": {"nodes": 1, "gpusPerNode": 0}, "storage": {"bucket": "dhad-test"},
                    "data": [{"uri": str(tmp_path / "missing.jsonl")}],
                    "respond": {"prompts": [{"uri": prompts, "schema": "prompt-completion"}],
                                "teacher": {"endpoint": {"baseUrl": "http://127.0.0.1:9/v1", "model": "t"}}}}}
    run = Launch.start(doc, tmp_path, {"DHAD_OUTPUT_ROOT": str(tmp_path / "out"), "DHAD_STAGE": "respond"})
    code = run.wait(60)
    assert code == ExitCode.DATA_ERROR and "missing.jsonl" in run.termination["message"], run.log[-2000:]
    assert TORCHRUN not in run.log


def test_eval_compared_model_that_is_no_model_is_refused_naming_its_entry(tmp_path, model_dir):
    """evaluation.compare's models are checked with the job's own, by their place in the list."""
    doc = {"apiVersion": "dhad.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "e", "namespace": "ns", "uid": "u"},
           "spec": {"model": {"uri": model_dir}, "resources": {"nodes": 1, "gpusPerNode": 0}, "storage": {"bucket": "dhad-test"},
                    "evaluation": {"suites": ["acva"], "compare": [{"name": "base", "model": {"uri": model_dir}},
                                                                  {"name": "other", "model": {"uri": str(tmp_path / "empty")}}]}}}
    (tmp_path / "empty").mkdir()
    code, term, log = launch(doc, tmp_path / "run")
    assert_bad_config_before_training(code, term, log, "evaluation.compare[1].model.uri")


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "gpu").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_gpu_example_that_loads_from_the_hub_names_its_token_secret(path):
    """Llama-2 is gated on the Hub: a job that loads an hf:// model without spec.hfTokenSecretRef stops at
    pre-flight ("no token is set", above), after the GPUs were granted. Every job of every GPU example
    (a Pipeline's stages and gates with its defaults applied) that reads from the Hub names the Secret."""
    from tests.support.examples import example_jobs

    for name, _, spec in example_jobs(path):
        if "hf://" in json.dumps(spec.to_json_dict()):
            assert spec.hf_token_secret_ref is not None, f"{path.name}: {name} loads from hf:// without hfTokenSecretRef"
