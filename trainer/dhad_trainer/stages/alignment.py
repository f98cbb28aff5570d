"""What the SFT and RLAIF stages share: the input names the runtime fills, chat-template setup, pair and
prompt files, the resumable shard cache and gathering results on rank 0.

Stage inputs (`StageRun.inputs`, local folders the runtime downloaded or resolved):
  "feedback"      the feedback stage's output_dir (pairs/, prompts/, stats.json): reward, policy (dpo)
  "reward_model"  the reward model: policy (grpo, rloo, online-dpo); the reward stage's output by default
  "judge"         a local judge model folder, when feedback.judge.model is set
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dhad_api.stages import ChatTemplate, ChatTemplateSource
from dhad_trainer.data.chat import IM_END, IM_START, load_chat_template
from dhad_trainer.stages.base import (
    StageRun,
    save_model,
    stage_optimization,
    training_arguments,
    weights_dtype,
)

INPUT_FEEDBACK, INPUT_REWARD_MODEL, INPUT_JUDGE = "feedback", "reward_model", "judge"
PAIRS_DIR, PROMPTS_DIR, CACHE_DIR, STATS_FILE = "pairs", "prompts", "cache", "stats.json"
TRAIN, HELD_OUT = "train", "heldout"
ROWS_PER_SHARD = 10_000


def stage_arguments(run: StageRun, opt, **overrides: Any) -> dict[str, Any]:
    """training_arguments(), but without a DDP backend in a single process: accelerate treats an explicit
    "gloo" as a request for a process group and fails when torchrun's env is absent (unit tests, local)."""
    kwargs = training_arguments(run, opt, **overrides)
    if run.world_size == 1 and "RANK" not in os.environ:
        kwargs["ddp_backend"] = None
    return kwargs


def require_input(run: StageRun, name: str, needed_for: str) -> Path:
    path = run.inputs.get(name)
    if path is None or not Path(path).exists():
        raise ValueError(f"{needed_for} needs run.inputs[{name!r}] (a local folder); got {path!r}")
    return Path(path)


def prompt_id(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]


def split_of(pid: str, held_out_fraction: float) -> str:
    """Held-out by a hash of the prompt: stable across restarts, ranks and dataset order."""
    return HELD_OUT if int(pid, 16) / 16 ** len(pid) < held_out_fraction else TRAIN


def read_jsonl(paths: Iterable[Path]) -> list[dict]:
    rows = []
    for path in sorted(paths):
        with open(path, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    """Atomic: a crash leaves the old file or the new one, never half a shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_shards(directory: Path, prefix: str, rows: list[dict]) -> list[Path]:
    for old in directory.glob(f"{prefix}-*.jsonl"):
        old.unlink()
    count = max(1, -(-len(rows) // ROWS_PER_SHARD))
    paths = [directory / f"{prefix}-{i:05d}-of-{count:05d}.jsonl" for i in range(count)]
    for i, path in enumerate(paths):
        write_jsonl(path, rows[i * ROWS_PER_SHARD:(i + 1) * ROWS_PER_SHARD])
    return paths


def read_pairs(feedback_dir: Path, split: str) -> list[dict]:
    return read_jsonl((Path(feedback_dir) / PAIRS_DIR).glob(f"{split}-*.jsonl"))


def read_prompts(feedback_dir: Path, split: str) -> list[list[dict]]:
    return [row["prompt"] for row in read_jsonl((Path(feedback_dir) / PROMPTS_DIR).glob(f"{split}.jsonl"))]


class ShardCache:
    """Key -> value, stored as append-only jsonl shards, so a restarted stage re-reads what it paid for.

    Every rank writes its own shards (no write races) and reads everyone's, so a restart with another
    world size still hits. A shard is written atomically per batch; a crash loses at most one batch.
    """

    def __init__(self, directory: Path, kind: str, rank: int = 0) -> None:
        self.directory, self.kind, self.rank = Path(directory), kind, rank
        self.entries: dict[str, Any] = {}
        for row in read_jsonl(self.directory.glob(f"{kind}-*.jsonl")):
            self.entries[row["key"]] = row["value"]

    def get(self, key: str) -> Any:
        return self.entries.get(key)

    def put_many(self, values: dict[str, Any]) -> None:
        if not values:
            return
        self.entries.update(values)
        name = f"{self.kind}-r{self.rank:03d}-{uuid.uuid4().hex[:12]}.jsonl"
        write_jsonl(self.directory / name, ({"key": k, "value": v} for k, v in values.items()))


def gather_to_main(run: StageRun, obj: Any) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere); one process needs no process group."""
    import torch.distributed as dist

    if run.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * run.world_size if run.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier(run: StageRun) -> None:
    import torch.distributed as dist

    if run.world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_dtype(run: StageRun):
    """The dtype the stage's model loads in: a training stage's `weights_dtype` (fp32 master weights under
    mixed precision); otherwise the spec's model dtype, "auto" keeping the checkpoint's on GPUs and float32 on CPU."""
    import torch

    opt = stage_optimization(run)
    if opt is not None:
        return weights_dtype(run, opt)
    name = run.spec.model.dtype.value
    if name == "auto":
        return torch.float32 if run.use_cpu else "auto"
    return getattr(torch, name)


def set_chat_template(tokenizer, choice: ChatTemplate) -> list[str]:
    """Install the chosen template; ChatML adds <|im_start|>/<|im_end|> when missing. Returns tokens added."""
    if choice.source is ChatTemplateSource.MODEL:
        if not tokenizer.chat_template:
            raise ValueError("training.chatTemplate.source is model, but the model's tokenizer has no chat template")
        return []
    if choice.source is ChatTemplateSource.CUSTOM:
        tokenizer.chat_template = choice.template
        return []
    tokenizer.chat_template = load_chat_template()
    added = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if added:
        tokenizer.add_tokens(added, special_tokens=True)
    tokenizer.eos_token = IM_END  # a chat turn ends with <|im_end|>: generation must stop there
    return added


def chat_pairs(rows: Iterable[dict]) -> list[dict]:
    """Preference rows with text prompt/chosen/rejected as conversational prompt/chosen/rejected."""
    def turn(role: str, value: Any) -> list[dict]:
        return [{"role": role, "content": value}] if isinstance(value, str) else value

    return [{"prompt": turn("user", r["prompt"]), "chosen": turn("assistant", r["chosen"]),
             "rejected": turn("assistant", r["rejected"])} for r in rows]


def save_final(trainer, tokenizer, run: StageRun) -> Path:
    """The trained model + tokenizer in HF format (safetensors) in run.output_dir; every rank calls it
    (ZeRO-3 gathers shards), only the main process writes."""
    save_model(trainer, run.output_dir)
    if run.is_main:
        tokenizer.save_pretrained(run.output_dir)
    barrier(run)
    return run.output_dir


class FolderCheckpoints:
    """Checkpoints for a stage without an HF Trainer: a snapshot of `folder` becomes
    trainer_dir/checkpoint-N and the runtime's callbacks get `on_save`, exactly as a Trainer save does, so
    it is published to the object store and comes back as run.resume_from after a restart. Every rank
    must call `save()` the same number of times (the runtime's callback meets the others in a barrier)."""

    def __init__(self, run: StageRun, folder: Path) -> None:
        self.run, self.folder = run, folder
        self.step = int(run.resume_from.name.rsplit("-", 1)[-1]) if run.resume_from else 0
        restored = run.resume_from / folder.name if run.resume_from else None
        if restored is not None and restored.is_dir() and run.local_rank == 0:
            _link_files(restored, folder)  # what the last attempt paid for
        barrier(run)

    def save(self) -> None:
        from transformers import TrainerControl, TrainerState

        barrier(self.run)  # every rank's shards are on disk
        self.step += 1
        target = self.run.trainer_dir / f"checkpoint-{self.step}"
        if self.run.local_rank == 0:
            _link_files(self.folder, target / self.folder.name)
        args = SimpleNamespace(output_dir=str(self.run.trainer_dir), should_save=self.run.is_main)
        state, control = TrainerState(global_step=self.step), TrainerControl()
        for callback in self.run.callbacks:
            callback.on_save(args, state, control)
        if self.run.local_rank == 0:  # uploads of older snapshots are done: keep the newest two
            for old in self.run.trainer_dir.glob("checkpoint-*"):
                if int(old.name.rsplit("-", 1)[-1]) < self.step - 1:
                    shutil.rmtree(old, ignore_errors=True)


def _link_files(src: Path, dest: Path) -> None:
    """Hard links (copies across filesystems) of src's files in dest; existing names are kept."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and not (dest / path.name).exists():
            try:
                os.link(path, dest / path.name)
            except OSError:
                shutil.copy2(path, dest / path.name)


def resume_arg(run: StageRun) -> str | None:
    return str(run.resume_from) if run.resume_from else None
