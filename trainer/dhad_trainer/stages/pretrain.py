"""Continued pre-training (AceGPT step 1): causal LM on the prepared blocks, with warmup + cosine,
gradient accumulation and clipping (all from the spec), after an optional vocabulary expansion.

Training never prepares data. The prepare sub-stage left `<root>/prepare/prepared.json` naming a
prepared dataset in S3 (shards of packed blocks, a MANIFEST with the sources' mixture); each rank
streams its own contiguous share of the mixture order (data.mixture) shard by shard, fetching the
next shards in the background, so no node downloads the corpus. Which blocks an optimizer step trains
depends on the training seed, the micro batch and the global batch (processes x accumulation steps)
only, not on how the global batch is split: two processes train the same blocks per step as one
process accumulating two micro batches, and a resumed run sees the same blocks in the same order (the
Trainer skips the batches already trained, as before).

When the prepared dataset carries an expanded tokenizer, each node's leader resizes the model from
its vocabulary.json (new rows are the mean of their parts); vocabulary.warmupSteps first trains only
the embeddings for that many steps (a fresh run only: a checkpoint already holds the warmed rows).

Packing without cross-document attention: blocks carry position_ids that restart at every document
start, no attention_mask is passed and the model cache is off. What that guarantees (transformers
5.24, Llama and models on the same masking utilities):
- flash_attention_2 (GPU, if flash-attn is installed) reads the segments from position_ids: varlen
  kernels, nothing crosses documents and no mask is built;
- sdpa and eager (CPU, GPU without flash-attn) get a block-diagonal causal mask built from the
  position_ids (masking_utils.find_packed_sequence_indices): exact, but an O(L^2) mask per sequence.
- It holds only with `use_cache=False`: with a cache the packed-sequence detection is skipped and
  documents silently attend to each other (measured: logits differ by 0.5 with the cache on, 2e-7 off).
The label of each document's first token is -100, so no document is trained to follow another.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from dhad_api.jobs import PretrainJobSpec
from dhad_trainer.data import mixture
from dhad_trainer.data.prepare import MANIFEST_FILE, STATS_FILE
from dhad_trainer.data.readers import DataError
from dhad_trainer.runtime import distributed, tracking
from dhad_trainer.runtime.callbacks import ProgressCallback
from dhad_trainer.stages.base import (
    StageResult,
    StageRun,
    effective_precision,
    save_model,
    training_arguments,
    weights_dtype,
)
from dhad_trainer.stages.prepare import pointer_uri
from dhad_trainer.storage.routing import open_store

log = logging.getLogger(__name__)


class StreamedBlocks(torch.utils.data.Dataset):
    """This rank's share of a prepared dataset's mixture, read from the store shard by shard.

    Map-style (so the Trainer's resume skips batches without reading them), sampled in order: index
    i is mixture position `mixture.rank_position(i, ...)`. The rank owns `accumulation` lanes of the
    order (one per micro batch of an optimizer step) and reads them side by side. Shards are fetched
    whole (one ranged, resumable stream each) into an LRU cache that holds every lane's current
    shuffle window (WINDOW shards) and one more, the next `ahead` shards in this rank's reading order
    fetched ahead of need, so each shard is read once per epoch.
    """

    def __init__(self, store, root: str, manifest: dict, *, rank: int, world: int, micro_batch: int, seed: int,
                 accumulation: int = 1, cache: int | None = None, ahead: int = 2) -> None:
        self.store, self.root = store, root.rstrip("/")
        self.shards = mixture.shard_list(manifest)
        self.order = mixture.order(manifest, seed)
        self.world, self.micro, self.accumulation, self.rank = world, micro_batch, accumulation, rank
        self.lane = mixture.lane_length(len(self.order), world, micro_batch, accumulation)
        if not self.lane:
            raise DataError(f"prepared data {root}: {len(self.order)} block(s) in the mixture, fewer than one global "
                            f"batch ({world} process(es) x {accumulation} accumulation step(s) x micro batch "
                            f"{micro_batch})")
        # this rank's positions in the order it reads them: step by step, its lanes' micro batches in turn
        steps, lanes = self.lane // micro_batch, rank * accumulation + np.arange(accumulation)
        self.reading = (np.arange(steps)[:, None, None] * micro_batch + lanes[None, :, None] * self.lane
                        + np.arange(micro_batch)[None, None, :]).reshape(-1)
        self.cache: OrderedDict[int, dict] = OrderedDict()
        self.cache_size, self.ahead = cache or (mixture.WINDOW + 1) * accumulation, ahead
        self.pending: dict[int, object] = {}
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shards")
        self.lock = threading.Lock()
        self.fetched: list[int] = []  # shard numbers in the order they were read (tests)

    def __len__(self) -> int:
        return self.lane * self.world * self.accumulation

    def __getstate__(self):  # DataLoader workers (none today) would rebuild their own pool
        state = dict(self.__dict__)
        state.update(pool=None, lock=None, pending={}, cache=OrderedDict())
        return state

    def _read(self, shard: int) -> dict:
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(self.store.get_bytes(f"{self.root}/{self.shards[shard][0]}")))
        self.fetched.append(shard)
        return {name: np.stack(table.column(name).to_numpy(zero_copy_only=False)) for name in ("input_ids", "position_ids")}

    def _shard(self, shard: int, cursor: int) -> dict:
        with self.lock:
            if shard in self.cache:
                self.cache.move_to_end(shard)
                return self.cache[shard]
            future = self.pending.pop(shard, None)
        data = future.result() if future is not None else self._read(shard)
        with self.lock:
            self.cache[shard] = data
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
            self._prefetch(cursor)
        return data

    def _prefetch(self, cursor: int, chunk: int = 4096) -> None:
        """Starts fetching the next `ahead` shards this rank reads after `cursor` (in its reading order)."""
        upcoming: list[int] = []
        for start in range(cursor, len(self.reading), chunk):
            for shard in self.order[self.reading[start : start + chunk], 0]:
                shard = int(shard)
                if shard not in upcoming and shard not in self.cache:
                    upcoming.append(shard)
                if len(upcoming) >= self.ahead:
                    break
            if len(upcoming) >= self.ahead:
                break
        for shard in upcoming:
            if shard not in self.pending and self.pool is not None:
                self.pending[shard] = self.pool.submit(self._read, shard)

    def __getitem__(self, i: int) -> dict:
        position = mixture.rank_position(int(i), self.world, self.micro, self.accumulation, self.lane)
        batch, j = divmod(int(i), self.micro)
        shard, row = (int(x) for x in self.order[position])
        data = self._shard(shard, (batch // self.world) * self.micro + j)  # this rank's k-th block
        return {"input_ids": data["input_ids"][row], "position_ids": data["position_ids"][row], "position": position}


class PackedCollator:
    """Stacks blocks; labels skip each document's first token. DHAD_TEST_BATCH_LOG records, per micro
    batch, the mixture positions of its blocks (what was trained, whatever the index mapping)."""

    def __init__(self) -> None:
        self.batch_log = os.environ.get("DHAD_TEST_BATCH_LOG")
        self.rank = int(os.environ.get("RANK", "0"))

    def __call__(self, examples: list[dict]) -> dict:
        ids = torch.from_numpy(np.stack([e["input_ids"] for e in examples]).astype(np.int64))
        pos = torch.from_numpy(np.stack([e["position_ids"] for e in examples]).astype(np.int64))
        labels = ids.clone()
        labels[pos == 0] = -100
        if self.batch_log:
            with open(f"{self.batch_log}.rank{self.rank}", "a") as f:
                f.write(json.dumps([e["position"] for e in examples]) + "\n")
        return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False}


def prepared_dataset(run: StageRun) -> tuple[object, str, dict, dict]:
    """(store, URI, manifest, stats) of the dataset the prepare sub-stage named for this job."""
    spec: PretrainJobSpec = run.spec
    root_store = open_store(run.root, spec.storage)
    try:
        pointer = json.loads(root_store.get_bytes(pointer_uri(run.root)))
    except FileNotFoundError:
        raise DataError(f"no prepared data at {pointer_uri(run.root)}: the prepare sub-stage has not finished "
                        "(training never prepares data)") from None
    store = open_store(pointer["uri"], spec.storage)
    manifest = json.loads(store.get_bytes(f"{pointer['uri']}/{MANIFEST_FILE}"))
    stats = json.loads(store.get_bytes(f"{pointer['uri']}/{STATS_FILE}"))
    return store, pointer["uri"], manifest, stats


def expanded_model(run: StageRun, store, uri: str) -> Path:
    """The base model resized for the prepared dataset's expanded tokenizer (node leaders write it)."""
    from dhad_trainer.data.vocab import expand_model

    out = run.work_dir / "expanded-model"
    if run.local_rank == 0:
        tokenizer = run.work_dir / "prepared-tokenizer"
        store.download_dir(f"{uri}/tokenizer", tokenizer)
        expand_model(run.model_dir, tokenizer, out, run.spec.model.dtype.value)
    distributed.barrier()
    return out


def warm_embeddings(run: StageRun, model, dataset, args_kwargs: dict, steps: int) -> None:
    """`steps` optimizer steps that update only the input and output embeddings (the rest frozen)."""
    from transformers import Trainer, TrainingArguments

    embeddings = {id(model.get_input_embeddings().weight)}
    if model.get_output_embeddings() is not None:
        embeddings.add(id(model.get_output_embeddings().weight))
    frozen = [p for p in model.parameters() if id(p) not in embeddings and p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    args = TrainingArguments(**{**args_kwargs, "max_steps": steps, "save_strategy": "no",
                                "output_dir": str(run.work_dir / "embedding-warmup")})
    warm = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PackedCollator())
    warm.train()
    del warm
    gc.collect()
    for p in frozen:
        p.requires_grad_(True)
    log.info("embeddings warmed up for %d steps", steps)


def attention_for(run: StageRun) -> str:
    """model.attention; auto is flash_attention_2 (varlen over the packed segments) on GPU with 16-bit
    compute (mixed or pure) and flash-attn installed, sdpa (block-diagonal mask from position_ids) otherwise.
    The launcher has already refused flash-attention-2 where flash-attn or GPUs are missing."""
    import importlib.util

    from dhad_api.common import Attention
    from dhad_api.training import Precision

    choice = run.spec.model.attention
    if choice != Attention.AUTO:
        return {Attention.SDPA: "sdpa", Attention.EAGER: "eager", Attention.FLASH_ATTENTION_2: "flash_attention_2"}[choice]
    if run.use_cpu or not importlib.util.find_spec("flash_attn"):
        return "sdpa"
    sixteen = effective_precision(run, run.spec.training) in (Precision.BF16, Precision.BF16_PURE, Precision.FP16)
    return "flash_attention_2" if sixteen else "sdpa"


def max_steps_for(spec: PretrainJobSpec, world_size: int, sequence_length: int) -> int | None:
    """maxTokens -> optimizer steps (tokens per step = micro batch x accumulation x processes x length)."""
    t = spec.training
    if t.max_tokens is None:
        return t.max_steps
    per_step = t.micro_batch_size * t.gradient_accumulation_steps * world_size * sequence_length
    return max(1, math.ceil(t.max_tokens / per_step))


def run(run: StageRun) -> StageResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    spec: PretrainJobSpec = run.spec
    store, uri, manifest, stats = prepared_dataset(run)
    model_dir = expanded_model(run, store, uri) if manifest.get("tokenizer") else run.model_dir
    tokenizer_dir = model_dir if manifest.get("tokenizer") else run.inputs.get("tokenizer", run.model_dir)
    seq = manifest["sequence_length"]
    t = spec.training
    steps = max_steps_for(spec, run.world_size, seq)
    kwargs = training_arguments(run, t, max_steps=steps or -1, remove_unused_columns=False,
                                ddp_find_unused_parameters=False, train_sampling_strategy="sequential")
    args = TrainingArguments(**kwargs)  # before the model: ZeRO-3
    dataset = StreamedBlocks(store, uri, manifest, rank=run.rank, world=run.world_size,
                             micro_batch=t.micro_batch_size, accumulation=t.gradient_accumulation_steps, seed=t.seed)
    attn = attention_for(run)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(run, t), attn_implementation=attn)
    model.config.use_cache = False  # required for the packed-sequence mask (see the module docstring)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if manifest.get("tokenizer") and spec.vocabulary.warmup_steps and run.resume_from is None:
        warm_embeddings(run, model, dataset, kwargs, spec.vocabulary.warmup_steps)
    for cb in run.callbacks:
        if isinstance(cb, ProgressCallback):
            cb.tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * run.world_size * seq
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PackedCollator(),
                      processing_class=tokenizer, callbacks=list(run.callbacks))
    tracking.integrations_last(trainer)
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    save_model(trainer, run.output_dir)
    metrics = {"train_loss": result.training_loss, "global_step": trainer.state.global_step,
               "attn_implementation": attn, "data_shards_read": len(set(dataset.fetched)),
               **{f"data_{k}": stats[k] for k in ("documents_in", "kept", "tokens", "blocks", "tokens_in_mixture")}}
    if stats.get("vocabulary"):
        metrics.update({f"vocab_{k}": v for k, v in stats["vocabulary"].items()})
    if run.is_main:
        metrics["input_sha256"] = {"prepared_data": f"{uri} ({manifest['key']})"}
    return StageResult(metrics=metrics, model_dir=run.output_dir)
