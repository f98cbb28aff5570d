"""DeepSpeed ZeRO-2 and ZeRO-3 configs generated from the spec, under real torchrun on CPU (DeepSpeed's CPU
accelerator, gloo), checkpointing to S3, crashing, and resuming.

ZeRO-2 runs as one node with two processes and is preempted (SIGTERM) mid-run. ZeRO-3 runs as two one-process "nodes" (two launchers, node
ranks 0 and 1 on 127.0.0.1), which is where per-node uploads matter: each node holds its own ZeRO shards.
That run also expands the vocabulary: the prepare pod learns the merges once, both nodes resize the model from them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid

import pytest

from dhad_api.reasons import ExitCode, Reason
from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model
from dhad_trainer.storage.checkpoints import CheckpointStore
from dhad_trainer.storage.routing import open_store
from tests.harness.processes import free_port
from tests.unit.test_launcher import Launch, job_doc, prepare_job

pytestmark = [pytest.mark.torchrun, pytest.mark.s3]
STEPS = 4


@pytest.fixture(scope="module")
def setup(s3_server, s3_bucket, tmp_path_factory):
    os.environ.update(s3_server.env())
    tmp = tmp_path_factory.mktemp("zero")
    base = f"s3://{s3_bucket}/zero-{uuid.uuid4().hex[:6]}"
    store = open_store(base)
    store.upload_dir(init_tiny_model(tmp / "tiny", seed=0), f"{base}/models/tiny")
    store.put_bytes(f"{base}/data/corpus.txt", DEFAULT_CORPUS.read_bytes())
    env = {**s3_server.env(), "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],  # set by tests/conftest.py
           "DHAD_PREPARED_ROOT": f"{base}/prepared"}
    return tmp, base, store, env


def doc(setup, name: str, **kw) -> dict:
    tmp, base, store, env = setup
    return job_doc(f"{base}/models/tiny", f"{base}/data/corpus.txt", root=f"{base}/{name}",
                   bucket=base[5:].split("/")[0], uid=name, **{"steps": STEPS, **kw})


@pytest.fixture(scope="module")
def zero2(setup):
    """Preempted (SIGTERM to the launcher, as at eviction) once step 2 is done; the rerun resumes."""
    tmp, base, store, env = setup
    job = doc(setup, "z2", steps=6, interval=100, distributed={"strategy": "deepspeed", "zeroStage": 2})
    prepare_job(job, tmp / "z2-prepare", env)
    env = {**env, "DHAD_STAGE": "pretrain"}
    preempted = Launch.start(job, tmp / "z2a", {**env, "DHAD_TEST_STEP_SECONDS": "1"})
    preempted.wait_for(lambda launch: any(r["step"] >= 2 for r in launch.reports()))
    preempted.proc.send_signal(signal.SIGTERM)
    code = preempted.wait()
    after = CheckpointStore(store, f"{base}/z2/pretrain/checkpoints").steps()
    resumed = Launch.start(job, tmp / "z2b", env)
    return preempted, code, after, resumed, resumed.wait()


@pytest.fixture(scope="module")
def zero3(setup):
    """Node 1 crashes at step 3; the operator then deletes node 0 (SIGTERM); both rerun and resume."""
    tmp, base, store, env = setup
    job = doc(setup, "z3", nodes=2, vocabulary=32, distributed={"strategy": "deepspeed", "zeroStage": 3})
    prepare_job(job, tmp / "z3-prepare", env)
    env = {**env, "DHAD_STAGE": "pretrain"}

    def gang(tag: str, extra: dict) -> list[Launch]:
        port = str(free_port())
        return [Launch.start(job, tmp / f"{tag}{n}", {**env, **extra, "MASTER_PORT": port}, node=n, nproc=1)
                for n in (0, 1)]

    first = gang("z3a", {"DHAD_TEST_CRASH_AT_STEP": "3", "DHAD_TEST_CRASH_RANK": "1"})
    crash_code = first[1].wait()
    try:  # node 0 sees the peer's connection drop; if it does not stop, the operator deletes it
        first[0].proc.wait(30)
    except subprocess.TimeoutExpired:
        first[0].proc.send_signal(signal.SIGTERM)
    codes = [first[0].wait(120), crash_code]
    after_crash = CheckpointStore(store, f"{base}/z3/pretrain/checkpoints").steps()
    second = gang("z3b", {})
    return first, codes, after_crash, second, [launch.wait() for launch in second]


def load_and_generate(store, uri: str, folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    store.download_dir(uri, folder)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer("القهوة العربية", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 4
    return model, tokenizer


def test_zero2_preemption_saves_then_resume_finishes(setup, zero2, tmp_path):
    _, base, store, _ = setup
    preempted, code, (complete, partial), resumed, resumed_code = zero2
    assert code == ExitCode.PREEMPTED, preempted.log[-3000:]
    assert preempted.termination["reason"] == Reason.PREEMPTED
    assert len(complete) == 1 and 2 <= complete[0] < 6 and partial == []  # saved at the step SIGTERM hit
    step = complete[0]
    assert resumed_code == 0, resumed.log[-4000:]
    assert f"resuming from {base}/z2/pretrain/checkpoints/step-{step:06d}" in resumed.log
    manifest = json.loads(store.get_bytes(f"{base}/z2/pretrain/checkpoints/step-000006/MANIFEST.json"))
    paths = {f["path"] for f in manifest["files"]}
    assert {"node-0/global_step6/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "node-0/global_step6/zero_pp_rank_1_mp_rank_00_optim_states.pt", "node-0/latest"} <= paths
    state = json.loads(store.get_bytes(f"{base}/z2/pretrain/checkpoints/step-000006/node-0/trainer_state.json"))
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5, 6]
    load_and_generate(store, f"{base}/z2/pretrain/model", tmp_path / "model")


def test_zero3_two_nodes_upload_their_own_shards_and_resume(setup, zero3, tmp_path):
    _, base, store, _ = setup
    first, codes, after_crash, second, second_codes = zero3
    assert codes[1] == ExitCode.WORKER_FAILED, first[1].log[-3000:]
    assert codes[0] in (ExitCode.PREEMPTED, ExitCode.WORKER_FAILED, -signal.SIGTERM), first[0].log[-3000:]
    assert first[0].termination["reason"] in (Reason.PREEMPTED, Reason.WORKER_FAILED)
    assert after_crash == ([2], [])
    assert second_codes == [0, 0], second[0].log[-3000:] + second[1].log[-3000:]
    for launch in second:
        assert f"resuming from {base}/z3/pretrain/checkpoints/step-000002" in launch.log
    manifest = json.loads(store.get_bytes(f"{base}/z3/pretrain/checkpoints/step-000004/MANIFEST.json"))
    paths = {f["path"] for f in manifest["files"]}
    assert manifest["nodes"] == 2
    assert {"node-0/global_step4/zero_pp_rank_0_mp_rank_00_model_states.pt", "node-0/rng_state_0.pth",
            "node-1/global_step4/zero_pp_rank_1_mp_rank_00_model_states.pt", "node-1/rng_state_1.pth"} <= paths
    final = second[0].reports()[-1]
    vocab = {k.removeprefix("vocab_"): v for k, v in final["metrics"].items() if k.startswith("vocab_")}
    assert vocab["requested"] == 32 and 0 < vocab["added"] == vocab["learned"] - vocab["unreachable"], vocab  # the tiny corpus yields fewer merges
    assert vocab["vocab_after"] == vocab["vocab_before"] + vocab["added"], vocab
    assert final["metrics"]["vocab_fertility_after"] <= final["metrics"]["vocab_fertility_before"]
    model, tokenizer = load_and_generate(store, f"{base}/z3/pretrain/model", tmp_path / "model")
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == final["metrics"]["vocab_vocab_after"]
    assert float(model.get_input_embeddings().weight.detach().abs().sum()) > 0  # ZeRO-3 saved real weights
