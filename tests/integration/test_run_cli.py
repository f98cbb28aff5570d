"""`dhad run` as TRL users expect: a GPU manifest run on CPU with --set, the stage log streamed under a
progress bar, the final model downloaded with --output, TensorBoard events in the job's S3 root with
the loss of every step, and the model with its card pushed by output.hub to a local Hub stand-in.
DHAD_RECORD_CARD=path copies the card there (docs/model-card-sample.md is one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, ModelCardData
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dhad_api.layout import split_s3
from dhad_trainer.data.chat import ASSETS
from dhad_trainer.local.tiny import init_tiny_model
from tests.integration.jobs import REPO
from tests.support.hub_server import HubServer

pytestmark = [pytest.mark.s3, pytest.mark.torchrun]
TOKEN = "hf_local_write_token_123"


def dhad_run(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dhad_trainer.cli", "run", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_env(s3_server, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    return {**env, **s3_server.env(), "OMP_NUM_THREADS": "1", "DHAD_PROGRESS_INTERVAL": "0.5", **extra}


def test_gpu_manifest_runs_with_set_and_output_and_pushes_to_the_hub(tmp_path, s3_server, s3_bucket, s3_prefix):
    base = init_tiny_model(tmp_path / "tiny-base")
    card = ModelCardData(language=["en"], license="llama2", base_model="meta-llama/Llama-2-7b-hf")
    ModelCard.from_template(card, template_str="---\n{{ card_data }}\n---\n# tiny llama\n").save(base / "README.md")
    key = split_s3(s3_prefix)[1]
    sets = [
        "resources.nodes=1", "resources.gpusPerNode=0", "training.maxSteps=5",  # the example
        "distributed={strategy: ddp}", f"model={{uri: {s3_prefix}/models/base}}", "queueName=null",
        f"data=[{{uri: {s3_prefix}/data/instructions.jsonl, schema: messages}}]",
        f"storage.bucket={s3_bucket}", f"storage.prefix={key}/out", "storage.secretRef=null",
        "training.epochs=null", "training.warmupSteps=0", "training.sequenceLength=256", "training.microBatchSize=2",
        "training.gradientAccumulationSteps=1", "training.precision=fp32", "training.logEverySteps=1",
        "output.hub={repoId: dhad-org/acegpt-tiny-sft, tokenSecretRef: {name: hf-write, key: token}}",
    ]
    out = tmp_path / "out"
    with HubServer(token=TOKEN) as hub:
        env = run_env(s3_server, DHAD_HUB_TOKEN=TOKEN, HF_ENDPOINT=hub.url, HF_HUB_DISABLE_XET="1")
        done = dhad_run(["-f", str(REPO / "examples" / "gpu" / "acegpt-7b-sft.yaml"), "--store", "env",
                         "--workdir", str(tmp_path / "run"), "--output", str(out),
                         "--put", f"{base}={s3_prefix}/models/base",
                         "--put", f"{ASSETS / 'arabic_instructions.jsonl'}={s3_prefix}/data/instructions.jsonl",
                         *[a for s in sets for a in ("--set", s)]], env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "step 5/5 loss" in done.stdout  # rank 0's log, streamed
    assert "sft: 100%" in done.stderr and "5/5" in done.stderr  # the progress bar
    assert TOKEN not in done.stdout + done.stderr

    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "Succeeded" and status["outputModel"].endswith("/sft/model")
    model = out / "model"
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in model.iterdir()}
    if os.environ.get("DHAD_RECORD_CARD"):  # docs/model-card-sample.md is this card
        Path(os.environ["DHAD_RECORD_CARD"]).write_text((model / "README.md").read_text())
    local_card = ModelCard.load(model / "README.md")
    assert local_card.data.license == "llama2" and local_card.data.base_model == "meta-llama/Llama-2-7b-hf"
    assert local_card.data.language == ["ar"] and local_card.data.dhad["lineage"][0]["stage"] == "sft"

    # TensorBoard, read back from the job's S3 root: the loss of every step
    bucket, root_key = split_s3(status["outputRoot"])
    events = tmp_path / "events"
    objects = list(s3_server.client().list_objects(bucket, prefix=f"{root_key}/tensorboard/sft/", recursive=True))
    assert objects, f"no TensorBoard events under {status['outputRoot']}/tensorboard/sft"
    for obj in objects:
        s3_server.client().fget_object(bucket, obj.object_name, str(events / Path(obj.object_name).name))
    acc = EventAccumulator(str(events))
    acc.Reload()
    losses = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(losses) == [1, 2, 3, 4, 5] and all(0 < v < 100 for v in losses.values()), losses
    assert {"train/learning_rate", "train/grad_norm", "sft/final/train_loss"} <= set(acc.Tags()["scalars"])
    assert sorted(p.name for p in (out / "tensorboard" / "sft").iterdir()) == sorted(Path(o.object_name).name for o in objects)

    # the Hub push: a private repo with the downloaded model's exact bytes and card
    repo = hub.repos["dhad-org/acegpt-tiny-sft"]
    assert repo.private and repo.files["model.safetensors"] == (model / "model.safetensors").read_bytes()
    assert repo.files["README.md"].decode() == (model / "README.md").read_text()
    assert "MANIFEST.json" not in repo.files and hub.unauthorized == 0
    assert ("GET", "/api/whoami-v2") in hub.calls  # checked by the launcher before training
    assert hub.calls.index(("GET", "/api/whoami-v2")) < hub.calls.index(("POST", "/api/repos/create"))


def test_quiet_silences_the_log_and_a_bad_set_names_the_field(tmp_path, s3_server, s3_bucket, s3_prefix):
    manifest = str(REPO / "examples" / "tiny" / "sft.yaml")
    bad = dhad_run(["-f", manifest, "-q", "--set", "training.maxStep=5"], run_env(s3_server), timeout=120)
    assert bad.returncode == 2 and "training.maxStep" in bad.stderr and bad.stdout == ""
    missing = ["-f", manifest, "--store", "env", "--set", f"model={{uri: {s3_prefix}/no-such-model}}",
               "--set", f"storage.bucket={s3_bucket}", "--set", "resources.nodes=1"]
    loud = dhad_run([*missing, "--workdir", str(tmp_path / "a"), "--output", str(tmp_path / "o")], run_env(s3_server), timeout=300)
    quiet = dhad_run([*missing, "--workdir", str(tmp_path / "b"), "-q"], run_env(s3_server), timeout=300)
    for done in (loud, quiet):
        assert done.returncode == 1 and "model.uri" in done.stderr and "no config.json" in done.stderr
    assert "BadConfig" in loud.stdout  # the launcher's log line, streamed
    assert quiet.stdout == "" and "it/s" not in quiet.stderr and "step" not in quiet.stderr
