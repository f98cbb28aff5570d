"""A tiny PretrainJob under real torchrun (2 CPU processes, gloo) with checkpoints in a real S3 server:
an uninterrupted run, a run that crashes after its step-4 checkpoint, and its rerun, which must resume
at step 4 and then see the same batches and losses as the uninterrupted run. Each run is the prepare
sub-stage's pod, then the pretrain sub-stage's: the second job and the rerun find the data prepared.
Both ranks end with the weights that were saved (the DDP replicas stayed one model). One more job runs
in one process with the same global batch (2 micro batches of 2 accumulated instead of 2 processes x
2): it must train the same blocks at every step and end with the same weights, so the two ranks
trained one model.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from dhad_api.reasons import ExitCode, Reason
from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model
from dhad_trainer.storage.checkpoints import CheckpointStore
from dhad_trainer.storage.routing import open_store
from tests.unit.test_launcher import Launch, job_doc, prepare_job

pytestmark = [pytest.mark.torchrun, pytest.mark.s3]
STEPS = 8


@pytest.fixture(scope="module")
def jobs(s3_server, s3_bucket, tmp_path_factory):
    """The tiny model and corpus in S3, and `launch(uid, folder, env)`: a job's prepare pod, then its
    pretrain pod (2 processes unless told)."""
    env = s3_server.env()
    os.environ.update(env)  # this process reads the results from the same server
    tmp = tmp_path_factory.mktemp("pretrain-ddp")
    base = f"s3://{s3_bucket}/pretrain-ddp-{uuid.uuid4().hex[:6]}"
    store = open_store(base)
    store.upload_dir(init_tiny_model(tmp / "tiny", seed=0), f"{base}/models/tiny")
    store.put_bytes(f"{base}/data/corpus.txt", DEFAULT_CORPUS.read_bytes())
    out = {"base": base, "store": store, "tmp": tmp, "prepared": {}}
    env = {**env, "DHAD_PREPARED_ROOT": f"{base}/prepared"}

    def doc(uid: str) -> dict:
        return job_doc(f"{base}/models/tiny", f"{base}/data/corpus.txt", root=f"{base}/{uid}", bucket=s3_bucket,
                       uid=uid, steps=STEPS)

    def launch(uid: str, folder, extra: dict, job: dict | None = None, nproc: int = 2) -> Launch:
        job = job or doc(uid)
        out["prepared"][folder.name] = prepare_job(job, folder / "prepare", env).log
        return Launch.start(job, folder, {**env, "DHAD_STAGE": "pretrain", **extra}, nproc=nproc)

    out["doc"], out["launch"] = doc, launch
    return out


def logged(folder) -> dict:
    return {"DHAD_TEST_BATCH_LOG": str(folder / "batches"), "DHAD_TEST_WEIGHTS_FILE": str(folder / "weights")}


@pytest.fixture(scope="module")
def full(jobs):
    """The uninterrupted two-process run."""
    folder = jobs["tmp"] / "a"
    launch = jobs["launch"]("a", folder, logged(folder))
    return launch, launch.wait()


@pytest.fixture(scope="module")
def runs(jobs, full):
    out = {k: jobs[k] for k in ("base", "store", "prepared")}
    out["a"] = full
    tmp, launch = jobs["tmp"], jobs["launch"]
    crashed = launch("b", tmp / "b1", {"DHAD_TEST_CRASH_AT_STEP": "5", "DHAD_TEST_CRASH_RANK": "1"})
    out["crash"] = (crashed, crashed.wait())
    out["after_crash"] = CheckpointStore(out["store"], f"{out['base']}/b/pretrain/checkpoints").steps()
    resumed = launch("b", tmp / "b2", {"DHAD_TEST_BATCH_LOG": str(tmp / "b2" / "batches")})
    out["resume"] = (resumed, resumed.wait())
    return out


@pytest.fixture(scope="module")
def one_process(jobs):
    """The same job in one process, its global batch (2 x 2 blocks) made of 2 accumulated micro batches."""
    folder = jobs["tmp"] / "one"
    job = jobs["doc"]("one")
    job["spec"]["training"]["gradientAccumulationSteps"] = 2
    launch = jobs["launch"]("one", folder, logged(folder), job=job, nproc=1)
    return launch, launch.wait()


def losses(store, root: str) -> dict[int, float]:
    state = json.loads(store.get_bytes(f"{root}/pretrain/checkpoints/step-{STEPS:06d}/node-0/trainer_state.json"))
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def batches(launch: Launch, rank: int) -> list[list[int]]:
    return [json.loads(line) for line in (launch.dir / f"batches.rank{rank}").read_text().splitlines()]


def test_training_writes_checkpoints_progress_and_final_model(runs, tmp_path):
    launch, code = runs["a"]
    assert code == 0, launch.log[-4000:]
    assert launch.termination["reason"] == Reason.STAGE_SUCCEEDED
    store, root = runs["store"], f"{runs['base']}/a"
    ckpts = CheckpointStore(store, f"{root}/pretrain/checkpoints")
    assert ckpts.steps() == ([6, 8], [])  # keepLast 2
    files = {f["path"] for f in json.loads(store.get_bytes(f"{ckpts.step_uri(8)}/MANIFEST.json"))["files"]}
    assert {"node-0/model.safetensors", "node-0/optimizer.pt", "node-0/rng_state_0.pth", "node-0/rng_state_1.pth"} <= files
    final = launch.reports()[-1]
    assert final["final"] and final["step"] == STEPS and final["totalSteps"] == STEPS and final["tokensPerSecond"] > 0
    assert final["lastCheckpoint"] == ckpts.step_uri(8) and final["outputModel"] == f"{root}/pretrain/model"
    history = losses(store, root)
    assert list(history) == list(range(1, STEPS + 1)) and history[STEPS] < history[1]

    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert store.exists(f"{root}/pretrain/model/MANIFEST.json")
    store.download_dir(f"{root}/pretrain/model", tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    prompt = tokenizer("تقع مدينة", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert out.shape[1] == prompt["input_ids"].shape[1] + 6
    from huggingface_hub import ModelCard

    from dhad_trainer.storage.models import code_version

    card = ModelCard.load(tmp_path / "model" / "README.md")
    step = card.data.dhad["lineage"][-1]  # this job's line: what it read, at which code commit
    assert step["stage"] == "pretrain" and step["commit"] == code_version()["commit"], step
    assert step["inputs"]["prepared_data"].startswith(f"{runs['base']}/prepared/"), step["inputs"]
    assert '"learningRate": 0.002' in card.text


def test_the_data_is_prepared_once_and_each_rank_streams_its_own_share(runs):
    store, base = runs["store"], runs["base"]
    pointer = json.loads(store.get_bytes(f"{base}/a/prepare/prepared.json"))
    assert pointer == json.loads(store.get_bytes(f"{base}/b/prepare/prepared.json"))  # the same dataset
    assert pointer["uri"].startswith(f"{base}/prepared/") and store.exists(f"{pointer['uri']}/MANIFEST.json")
    passes = json.loads(store.get_bytes(f"{pointer['uri']}/passes.json"))
    assert len({m["worker"] for stage in passes.values() for m in stage.values()}) == 1  # job a's pod only
    full, _ = runs["a"]
    shares = [{p for batch in batches(full, rank) for p in batch} for rank in (0, 1)]
    assert not shares[0] & shares[1] and min(len(shares[0]), len(shares[1])) >= 2 * STEPS
    manifest = json.loads(store.get_bytes(f"{pointer['uri']}/MANIFEST.json"))
    share = sum(s["mixture_blocks"] for s in manifest["sources"]) // 4 * 2  # whole global batches of 2 x 2
    assert all(p // share == rank for rank in (0, 1) for p in shares[rank]), shares  # contiguous: rank r's half


def test_crash_exits_worker_failed_after_the_step_4_checkpoint(runs):
    launch, code = runs["crash"]
    assert code == ExitCode.WORKER_FAILED, launch.log[-4000:]
    term = launch.termination
    assert term["reason"] == Reason.WORKER_FAILED and "injected crash at step 5" in term["message"]
    assert launch.reports()[-1]["final"] and launch.reports()[-1]["failed"]  # rank 0 still reports, last
    assert runs["after_crash"] == ([2, 4], [])


def test_rerun_resumes_at_step_4_with_the_same_data_and_losses(runs):
    full, _ = runs["a"]
    launch, code = runs["resume"]
    assert code == 0, launch.log[-4000:]
    assert "resuming from " + f"{runs['base']}/b/pretrain/checkpoints/step-000004" in launch.log
    for rank in (0, 1):
        assert batches(launch, rank) == batches(full, rank)[4:]  # steps 5..8, same blocks, same order
    expected, got = losses(runs["store"], f"{runs['base']}/a"), losses(runs["store"], f"{runs['base']}/b")
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_both_ranks_end_with_the_weights_that_were_saved(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from dhad_trainer.runtime.callbacks import weights_sha256

    launch, code = runs["a"]
    assert code == 0, launch.log[-4000:]
    rank0, rank1 = ((launch.dir / f"weights.rank{r}").read_text() for r in (0, 1))
    assert rank0 == rank1  # DDP replicas stayed identical through every step
    runs["store"].download_dir(f"{runs['base']}/a/pretrain/model", tmp_path / "model")
    assert weights_sha256(AutoModelForCausalLM.from_pretrained(tmp_path / "model")) == rank0



def final_weights(store, root: str, folder) -> dict:
    from safetensors.torch import load_file

    store.download_dir(f"{root}/pretrain/model", folder)
    return load_file(folder / "model.safetensors")


def test_two_processes_train_like_one_with_the_same_global_batch(jobs, full, one_process, tmp_path):
    (ddp, code), (one, one_code) = full, one_process
    assert code == 0 and one_code == 0, one.log[-4000:]
    split = list(zip(batches(ddp, 0), batches(ddp, 1), strict=True))[:STEPS]  # the loader may fetch one more
    accumulated = batches(one, 0)[: 2 * STEPS]
    together = [accumulated[2 * s] + accumulated[2 * s + 1] for s in range(STEPS)]
    store, base = jobs["store"], jobs["base"]
    ddp_losses, one_losses = losses(store, f"{base}/a"), losses(store, f"{base}/one")
    a, b = final_weights(store, f"{base}/a", tmp_path / "a"), final_weights(store, f"{base}/one", tmp_path / "one")
    assert a.keys() == b.keys()
    gap = max((a[name] - b[name]).abs().max().item() for name in a)
    figures = f"step 1 loss {ddp_losses[1]} (2 processes) vs {one_losses[1]} (1 process); weights differ by {gap:.3g}"
    print(figures, "; largest loss gap", max(abs(ddp_losses[s] - one_losses[s]) for s in ddp_losses))
    assert len(together) == len(split) == STEPS
    assert [sorted(b) for b in together] == [sorted(r0 + r1) for r0, r1 in split], (figures, together, split)
    assert one_losses == pytest.approx(ddp_losses, rel=1e-6), figures
    # Measured 0 (bitwise): the same micro batch shapes run the same kernels, transformers divides every
    # micro batch's loss by the step's label tokens over all ranks (num_items_in_batch), and for 2 ranks
    # gloo's sum a + b is the one process's accumulation a + b. 1e-6 leaves room for a summation order
    # that does differ (more ranks, another allreduce algorithm); other blocks per step left 0.015.
    assert gap <= 1e-6, figures
