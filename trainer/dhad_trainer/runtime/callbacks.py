"""The runtime's TrainerCallbacks, which every stage gets through `StageRun.callbacks`.

- CheckpointCallback: each HF `checkpoint-N` save is published to the object store in the background.
- ProgressCallback: step, loss, tokens/s and ETA go to the progress reporter (rank 0), with the stage's own
  figures (FIGURES: the policy's reward, KL and response length, the feedback's judgement counts).
- PreemptionCallback: after SIGTERM every rank agrees to save once more and stop.
- TestHooks: faults for tests (DHAD_TEST_CRASH_AT_STEP), honoured only when set.
- WeightsDigest: each rank's sha256 of its final weights, for tests that two ranks trained one model
  (DHAD_TEST_WEIGHTS_FILE), honoured only when set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

from transformers import TrainerCallback

from dhad_trainer.runtime import distributed
from dhad_trainer.runtime.distributed import Cluster
from dhad_trainer.runtime.progress import ProgressReporter
from dhad_trainer.storage.checkpoints import AsyncPublisher

log = logging.getLogger(__name__)

# log key -> progress `figures` key. Policy (TRL's GRPO/RLOO names, which Dhad's PPO logs too) and feedback.
FIGURES = {
    "reward": "rewardMean", "reward_std": "rewardStd", "kl": "kl", "completions/mean_length": "responseLength",
    "kl_coefficient": "klCoefficient", "judgements": "judgements", "verdicts": "verdicts", "forced": "forcedVerdicts",
    "unparseable": "unparseable", "refused": "refused", "errors": "judgeErrors", "agreement_rate": "agreementRate",
    "train_pairs": "trainPairs",
}


def figures_of(logs: dict) -> dict[str, float]:
    return {name: round(float(logs[key]), 6) for key, name in FIGURES.items()
            if isinstance(logs.get(key), int | float) and not isinstance(logs.get(key), bool)}


class CheckpointCallback(TrainerCallback):
    """on_save: wait for the previous upload, let every rank finish writing, then upload in the background."""

    def __init__(self, publisher: AsyncPublisher | None, cluster: Cluster) -> None:
        self.publisher, self.cluster = publisher, cluster

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.publisher is not None:
            self.publisher.wait()
        distributed.barrier()  # per-rank files (RNG state, ZeRO shards) are all on disk now
        if self.publisher is not None and self.cluster.is_node_leader and folder.is_dir():
            self.publisher.start(folder, state.global_step)
            if not args.should_save:  # HF rotates checkpoints only where it saves the model
                for old in Path(args.output_dir).glob("checkpoint-*"):
                    if old != folder:
                        shutil.rmtree(old, ignore_errors=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.wait()

    def wait(self) -> None:
        if self.publisher is not None:
            self.publisher.wait()


class ProgressCallback(TrainerCallback):
    """Rank 0 turns HF logs into progress reports and a log line with tokens/s, learning rate and ETA."""

    def __init__(self, reporter: ProgressReporter | None, cluster: Cluster) -> None:
        self.reporter, self.cluster = reporter, cluster
        self.tokens_per_step: int | None = None  # stages that know it set it (no per-step token gather)
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = (time.monotonic(), state.global_step)
        self._last = (time.monotonic(), state.global_step, self._tokens(state))

    def _tokens(self, state, logs: dict | None = None) -> int:
        """Tokens trained so far: the Trainer's count, else TRL's `num_tokens` log (SFT), else steps x
        the stage's tokens per step (pretrain's packed rows)."""
        if state.num_input_tokens_seen:
            return int(state.num_input_tokens_seen)
        if logs and isinstance(logs.get("num_tokens"), int | float):
            return int(logs["num_tokens"])
        return state.global_step * (self.tokens_per_step or 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.cluster.is_main or not logs:
            return
        figures = figures_of(logs)
        if figures and self.reporter is not None:
            self.reporter.update(figures=figures)
        if "loss" not in logs or self._last is None or self._start is None:
            return  # the end-of-training summary has no loss of its own
        now, tokens = time.monotonic(), self._tokens(state, logs)
        t0, s0, k0 = self._last
        rate = (tokens - k0) / (now - t0) if tokens > k0 and now > t0 else None
        self._last = (now, state.global_step, tokens)
        done = state.global_step - self._start[1]
        eta = None
        if state.max_steps and done > 0:
            eta = int((now - self._start[0]) / done * max(0, state.max_steps - state.global_step))
        loss = logs["loss"]
        if rate is not None:
            logs.setdefault("tokens_per_second", round(rate, 1))
        log.info("step %d/%d loss %s lr %s tokens/s %s eta %ss%s", state.global_step, state.max_steps, loss,
                 logs.get("learning_rate"), None if rate is None else round(rate), eta,
                 "".join(f" {k} {v:.4g}" for k, v in figures.items()))
        if self.reporter is not None:
            self.reporter.update(step=state.global_step, totalSteps=state.max_steps or None,
                                 epoch=round(state.epoch, 4) if state.epoch is not None else None,
                                 loss=loss, tokensPerSecond=None if rate is None else round(rate, 1), etaSeconds=eta)

    def on_step_end(self, args, state, control, **kwargs):
        if self.reporter is not None and self.cluster.is_main:
            self.reporter.update(step=state.global_step, totalSteps=state.max_steps or None)


class PreemptionCallback(TrainerCallback):
    """After SIGTERM on any rank: all ranks save at the same step and stop (checked every step)."""

    def __init__(self) -> None:
        self.triggered = False
        self.step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if distributed.any_rank(distributed.preempted.is_set()):
            log.warning("SIGTERM: saving a checkpoint at step %d and stopping", state.global_step)
            self.triggered, self.step = True, state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class TestHooks(TrainerCallback):
    """Faults and probes for tests: DHAD_TEST_CRASH_AT_STEP=N raises on DHAD_TEST_CRASH_RANK (default 0) once
    step N's checkpoint upload (if any) is complete; DHAD_TEST_STEP_SECONDS slows every step down;
    DHAD_TEST_PARAMS_LOG=path makes every rank write, when training begins, the parameter elements it holds
    (a sharded parameter's local shard) and their dtypes to path.rank<r>."""

    def __init__(self, checkpoint: CheckpointCallback, cluster: Cluster) -> None:
        self.crash_at = int(os.environ.get("DHAD_TEST_CRASH_AT_STEP", "0"))
        self.crash_rank = int(os.environ.get("DHAD_TEST_CRASH_RANK", "0"))
        self.sleep = float(os.environ.get("DHAD_TEST_STEP_SECONDS", "0"))
        self.params_log = os.environ.get("DHAD_TEST_PARAMS_LOG")
        self.checkpoint, self.cluster = checkpoint, cluster

    @classmethod
    def wanted(cls) -> bool:
        return any(k in os.environ for k in ("DHAD_TEST_CRASH_AT_STEP", "DHAD_TEST_STEP_SECONDS", "DHAD_TEST_PARAMS_LOG"))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not self.params_log or model is None:
            return
        import json

        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
        record = {"rank": self.cluster.rank, "local": sum(t.numel() for t in local),
                  "full": sum(p.numel() for p in model.parameters()), "dtypes": sorted({str(t.dtype) for t in local}),
                  "type": type(model).__name__}
        Path(f"{self.params_log}.rank{self.cluster.rank}").write_text(json.dumps(record))

    def on_step_end(self, args, state, control, **kwargs):
        if self.sleep:
            time.sleep(self.sleep)
        if self.crash_at and state.global_step == self.crash_at:
            self.checkpoint.wait()
            distributed.barrier()
            if self.cluster.rank == self.crash_rank:
                raise RuntimeError(f"injected crash at step {state.global_step} (DHAD_TEST_CRASH_AT_STEP)")


def weights_sha256(model) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes, in name order (tied weights once)."""
    import torch

    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class WeightsDigest(TrainerCallback):
    """At the end of training, this rank's weights_sha256 (kept in `sha256`; written to `<path>.rank<r>`
    when a path is given). DDP and ZeRO-1/2 replicate weights, so every rank must hold the same digest."""

    ENV = "DHAD_TEST_WEIGHTS_FILE"

    def __init__(self, rank: int, path: str | None = None) -> None:
        self.rank, self.path, self.sha256 = rank, path, None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        self.sha256 = weights_sha256(model)
        if self.path:
            Path(f"{self.path}.rank{self.rank}").write_text(self.sha256, encoding="utf-8")
