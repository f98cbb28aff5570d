"""Experiment tracking through transformers' report_to: one SFT run logs its loss per step to MLflow (a
real file store), Weights & Biases (offline run files) and TensorBoard at once, from rank 0 only;
the RLAIF metric aliases reach the integrations."""

from __future__ import annotations

import os

import pytest

from dhad_trainer.runtime import tracking
from tests.support.alignment import sft_spec, stage_run, tiny_lm

WANDB_KEYS = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_LOG_MODEL", "WANDB_MODE")
MLFLOW_KEYS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_FLATTEN_PARAMS", "MLFLOW_ALLOW_FILE_STORE")


def tracked_spec(tmp_path, **training):
    spec = sft_spec(maxSteps=3, logEverySteps=1, **training)
    return spec.model_copy(update={"tracking": spec.tracking.model_validate(
        {"mlflow": {"trackingUri": f"file:{tmp_path / 'mlruns'}"}, "wandb": {"project": "acegpt", "entity": "dhad-team"}})})


def test_report_to_is_the_spec_on_rank_0_and_nothing_elsewhere(tmp_path):
    spec = tracked_spec(tmp_path)
    main = stage_run(spec, "sft", tmp_path / "a", tiny_lm())
    other = stage_run(spec, "sft", tmp_path / "b", tiny_lm(), rank=1, world_size=2)
    assert tracking.trainer_arguments(main)["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert tracking.trainer_arguments(other)["report_to"] == []
    plain = stage_run(sft_spec(), "sft", tmp_path / "c", tiny_lm())
    assert tracking.trainer_arguments(plain)["report_to"] == ["tensorboard"]  # always on


def test_configure_sets_what_the_integrations_read(tmp_path):
    environ: dict[str, str] = {}
    logdir = tracking.configure(tracked_spec(tmp_path), name="acegpt-sft", namespace="llm", stage="sft",
                                work_dir=tmp_path, environ=environ)
    assert environ["TENSORBOARD_LOGGING_DIR"] == str(logdir) and logdir.is_dir()
    assert environ["MLFLOW_TRACKING_URI"] == f"file:{tmp_path / 'mlruns'}" and environ["MLFLOW_EXPERIMENT_NAME"] == "llm/acegpt-sft"
    assert environ["WANDB_PROJECT"] == "acegpt" and environ["WANDB_ENTITY"] == "dhad-team"
    assert environ[tracking.RUN_NAME_ENV] == "acegpt-sft-sft" and environ["WANDB_LOG_MODEL"] == "false"


@pytest.fixture
def clean_env(monkeypatch):
    for key in (*WANDB_KEYS, *MLFLOW_KEYS, "TENSORBOARD_LOGGING_DIR", tracking.RUN_NAME_ENV):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # no W&B server here: the SDK writes its run files
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    yield
    for key in (*WANDB_KEYS, *MLFLOW_KEYS, "TENSORBOARD_LOGGING_DIR", tracking.RUN_NAME_ENV):
        os.environ.pop(key, None)


def test_one_sft_run_logs_its_loss_to_mlflow_wandb_and_tensorboard(tmp_path, clean_env):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dhad_trainer.runtime.callbacks import ProgressCallback
    from dhad_trainer.runtime.distributed import Cluster
    from dhad_trainer.stages import sft

    spec = tracked_spec(tmp_path)
    progress = ProgressCallback(None, Cluster())  # the worker's: it adds tokens_per_second to each log
    run = stage_run(spec, "sft", tmp_path / "run", tiny_lm(), callbacks=[progress])
    logdir = tracking.configure(spec, name="acegpt-sft", namespace="llm", stage="sft", work_dir=run.work_dir)
    result = sft.run(run)
    tracking.end_runs()  # what the worker does when the stage returns
    assert result.metrics["steps"] == 3

    client = MlflowClient(f"file:{tmp_path / 'mlruns'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("llm/acegpt-sft").experiment_id])
    assert mlflow_run.info.run_name == "acegpt-sft-sft"
    mlflow_loss = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "loss")}
    assert sorted(mlflow_loss) == [1, 2, 3]
    assert mlflow_run.data.params["learning_rate"] == str(spec.training.learning_rate)

    events = EventAccumulator(str(logdir))
    events.Reload()
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb_loss == pytest.approx(mlflow_loss)  # the same numbers reached both
    # throughput reaches the integrations too (the progress callback adds it, from TRL's num_tokens,
    # before they log), at every logged step
    tb_rate = {e.step: e.value for e in events.Scalars("train/tokens_per_second")}
    assert sorted(tb_rate) == [1, 2, 3] and all(v > 0 for v in tb_rate.values()), tb_rate
    mlflow_rate = {m.step: m.value for m in client.get_metric_history(mlflow_run.info.run_id, "tokens_per_second")}
    assert mlflow_rate == pytest.approx(tb_rate)

    wandb_loss = offline_wandb_history(run.work_dir, "loss")
    assert wandb_loss == pytest.approx(mlflow_loss)


def offline_wandb_records(path):
    """The protobuf Records of a .wandb file: a 7-byte ':W&B' header, then LevelDB-log framing (32 KiB
    blocks; each chunk: crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_wandb_history(folder, key: str) -> dict[int, float]:
    """train/<key> per step from the run file of an offline W&B run."""
    import json

    (path,) = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
    found: dict[int, float] = {}
    for record in offline_wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if f"train/{key}" in items:
                found[int(items["train/global_step"])] = float(items[f"train/{key}"])
    return found


def test_rlaif_aliases_run_before_the_integrations():
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.integrations import TensorBoardCallback

    aliases = tracking.RLAIFAliases()
    grpo = {"reward": 0.5, "kl": 0.01, "completions/mean_length": 12.0, "loss": 0.1}
    aliases.on_log(None, None, None, logs=grpo)
    assert (grpo["rlaif/reward"], grpo["rlaif/kl"], grpo["rlaif/response_length"]) == (0.5, 0.01, 12.0)
    online = {"objective/rlhf_reward": 1.5, "objective/kl": 0.2}
    aliases.on_log(None, None, None, logs=online)
    assert (online["rlaif/reward"], online["rlaif/kl"]) == (1.5, 0.2) and "rlaif/response_length" not in online
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_lm()),
                      args=TrainingArguments(output_dir="/tmp/unused", report_to=["tensorboard"], use_cpu=True))
    tracking.rlaif_aliases(trainer)
    order = [type(c) for c in trainer.callback_handler.callbacks]
    assert order.index(tracking.RLAIFAliases) < order.index(TensorBoardCallback)


def test_stage_metrics_become_scalars_and_the_folder_is_copied_as_it_grows(tmp_path, monkeypatch):
    """A stage without a Trainer (feedback) logs its numbers; TensorBoardSync copies only what changed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dhad_trainer.storage.local import LocalStore

    logdir, remote = tmp_path / "tb", tmp_path / "bucket" / "tensorboard" / "feedback"
    logdir.mkdir()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    sync = tracking.TensorBoardSync(LocalStore(), logdir, str(remote), every_seconds=0)
    tracking.log_scalars({"chosen_length_chars": 41.5, "agreement_rate": 0.75, "prompt_sources": [{"n": 3}],
                          "judged": True}, 0, "feedback/final")
    sync.finish()
    copied = sorted(p.name for p in remote.iterdir())
    assert copied == sorted(p.name for p in logdir.iterdir()) and len(copied) == 1
    events = EventAccumulator(str(remote))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"feedback/final/chosen_length_chars", "feedback/final/agreement_rate"}
    assert events.Scalars("feedback/final/chosen_length_chars")[0].value == 41.5
    uploads = []
    monkeypatch.setattr(sync, "_upload", lambda paths: uploads.append([p.name for p in paths]))
    sync.sync(wait=True)
    assert uploads == []  # nothing changed, nothing sent
    tracking.log_scalars({"agreement_rate": 0.8}, 1, "feedback/final")
    sync.sync(wait=True)
    assert len(uploads) == 1 and len(uploads[0]) == 1 and uploads[0][0] not in copied
