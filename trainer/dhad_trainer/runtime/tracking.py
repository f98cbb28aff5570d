"""Experiment tracking: TensorBoard event files in the job's S3 root, optional MLflow and W&B.

transformers' own integrations do the logging (`report_to`), on rank 0 only; this module wires them
from the spec. `configure()` sets the environment the integrations read (TENSORBOARD_LOGGING_DIR,
MLFLOW_*, WANDB_*); `trainer_arguments()` is what `training_arguments()` adds (report_to, run_name);
`TensorBoardSync` copies the event files to `<root>/tensorboard/<stage>/` beside training (a
background upload at most every DHAD_TENSORBOARD_SYNC_SECONDS and at each checkpoint, a last
one when the stage ends), so `tensorboard --logdir s3://.../tensorboard` or a download shows the run
while it trains. `rlaif_aliases()` gives the RLAIF algorithms' differently named metrics one name
each (rlaif/reward, rlaif/kl, rlaif/response_length), and `log_scalars()` serves stages without a
Trainer (feedback, respond, eval).

Weighed: TensorBoard's own S3 writer needs TensorFlow's file systems (not in the image); an
fsspec/s3fs mount would add a second S3 client beside the MinIO SDK the store already uses.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from dhad_api.jobs import JobSpec
from dhad_api.layout import tensorboard_uri

log = logging.getLogger(__name__)

RUN_NAME_ENV = "DHAD_RUN_NAME"
SYNC_SECONDS_ENV = "DHAD_TENSORBOARD_SYNC_SECONDS"
# The first key an algorithm logs for each shared name (GRPO/RLOO, online DPO, DPO).
RLAIF_ALIASES = {
    "rlaif/reward": ("reward", "objective/rlhf_reward", "objective/scores", "rewards/margins"),
    "rlaif/kl": ("kl", "objective/kl"),
    "rlaif/response_length": ("completions/mean_length", "completion_length"),
}


def configure(spec: JobSpec, *, name: str, namespace: str, stage: str, work_dir: Path, environ=os.environ) -> Path:
    """Sets the integrations' environment for this process; returns the local TensorBoard folder."""
    logdir = work_dir / "tensorboard"
    logdir.mkdir(parents=True, exist_ok=True)
    environ["TENSORBOARD_LOGGING_DIR"] = str(logdir)
    environ[RUN_NAME_ENV] = f"{name}-{stage}"
    mlflow = spec.tracking.mlflow
    if mlflow:
        environ["MLFLOW_TRACKING_URI"] = mlflow.tracking_uri
        environ["MLFLOW_EXPERIMENT_NAME"] = mlflow.experiment or f"{namespace}/{name}"
        environ.setdefault("MLFLOW_FLATTEN_PARAMS", "TRUE")
    wandb = spec.tracking.wandb
    if wandb:
        environ["WANDB_PROJECT"] = wandb.project
        if wandb.entity:
            environ["WANDB_ENTITY"] = wandb.entity
        environ.setdefault("WANDB_DIR", str(work_dir))
        environ.setdefault("WANDB_RUN_GROUP", f"{namespace}/{name}")
        environ.setdefault("WANDB_LOG_MODEL", "false")  # the model goes to S3 (and output.hub), not W&B artifacts
    return logdir


def trainer_arguments(run) -> dict:
    """report_to (rank 0 only: other ranks log nothing) and the run's name, for TrainingArguments."""
    return {"report_to": run.spec.tracking.integrations() if run.is_main else [],
            "run_name": os.environ.get(RUN_NAME_ENV) or f"dhad-{run.stage}"}


class TensorBoardSync(TrainerCallback):
    """Rank 0 copies the TensorBoard folder to the object store beside training, one upload at a time."""

    def __init__(self, store, logdir: Path, uri: str, every_seconds: float | None = None) -> None:
        self.store, self.logdir, self.uri = store, Path(logdir), uri.rstrip("/")
        self.every = float(os.environ.get(SYNC_SECONDS_ENV, "30")) if every_seconds is None else every_seconds
        self._thread: threading.Thread | None = None
        self._last = 0.0
        self._sizes: dict[Path, int] = {}

    def _changed(self) -> list[Path]:
        changed = []
        for path in sorted(p for p in self.logdir.rglob("*") if p.is_file()):
            size = path.stat().st_size
            if self._sizes.get(path) != size:
                changed.append(path)
        return changed

    def _upload(self, paths: list[Path]) -> None:
        for path in paths:
            try:
                size = path.stat().st_size
                self.store.upload_file(path, f"{self.uri}/{path.relative_to(self.logdir).as_posix()}")
                self._sizes[path] = size
            except Exception as error:  # noqa: BLE001 - tracking never fails training
                log.warning("TensorBoard upload of %s failed: %s", path.name, error)

    def sync(self, wait: bool = False) -> None:
        if self._thread is not None and self._thread.is_alive():
            if not wait:
                return  # the next call picks up what this one missed
            self._thread.join()
        self._last = time.monotonic()
        paths = self._changed()
        if not paths:
            return
        if wait:
            self._upload(paths)
            return
        self._thread = threading.Thread(target=self._upload, args=(paths,), name="dhad-tensorboard", daemon=True)
        self._thread.start()

    def on_log(self, args, state, control, **kwargs):
        if time.monotonic() - self._last >= self.every:
            self.sync()

    def on_save(self, args, state, control, **kwargs):
        self.sync()

    def on_train_end(self, args, state, control, **kwargs):
        self.sync()  # the writer closes in the same event; finish() uploads the closed file

    def finish(self) -> None:
        end_runs()
        self.sync(wait=True)


def end_runs() -> None:
    """Flushes and closes the W&B and MLflow runs the integrations opened (a failing worker exits
    with os._exit, past their atexit hooks)."""
    import sys

    try:
        if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
            sys.modules["wandb"].finish()
        if "mlflow" in sys.modules and sys.modules["mlflow"].active_run() is not None:
            sys.modules["mlflow"].end_run()
    except Exception as error:  # noqa: BLE001 - tracking never fails training
        log.warning("closing the tracking runs failed: %s", error)


class RLAIFAliases(TrainerCallback):
    """Adds rlaif/reward, rlaif/kl and rlaif/response_length to each log before the integrations see it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            for alias, sources in RLAIF_ALIASES.items():
                value = next((logs[k] for k in sources if isinstance(logs.get(k), int | float)), None)
                if value is not None:
                    logs[alias] = value


def integrations_last(trainer) -> None:
    """Moves the report_to integrations behind our callbacks: the Trainer puts them first, so figures our
    callbacks add to a log (tokens_per_second, the stage's own) reached progress but not TensorBoard."""
    callbacks = trainer.callback_handler.callbacks
    ours = [cb for cb in callbacks if not type(cb).__module__.startswith("transformers.integrations")]
    callbacks[:] = ours + [cb for cb in callbacks if cb not in ours]


def rlaif_aliases(trainer) -> None:
    """Puts RLAIFAliases first, ahead of the report_to integrations the Trainer created."""
    trainer.callback_handler.callbacks.insert(0, RLAIFAliases())


def log_scalars(values: dict, step: int, prefix: str) -> None:
    """Writes numbers to this process's TensorBoard folder (rank 0 of a stage without a Trainer)."""
    logdir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    numbers = {f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not logdir or not numbers:
        return
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(log_dir=logdir) as writer:
        for tag, value in numbers.items():
            writer.add_scalar(tag, value, step)


def tensorboard_sync(store, root: str, stage: str, logdir: Path) -> TensorBoardSync:
    return TensorBoardSync(store, logdir, tensorboard_uri(root, stage))
