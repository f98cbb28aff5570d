"""Continued pre-training (AceGPT step 1): Arabic data prep, optional vocabulary expansion, causal LM
on packed blocks with warmup + cosine, gradient accumulation and clipping (all from the spec).

Data preparation: every node's leader (local rank 0) prepares into its own node-local work dir while
the other ranks wait; the pipeline is deterministic, so all nodes get byte-identical shards, which
is checked (an all-gather of shard hashes) before any step runs. This costs each node the prep CPU
time but needs no shared filesystem or object-store round trip; restarts prepare again.

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

import hashlib
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from dhad_api.data_prep import SourceSpec
from dhad_api.jobs import PretrainJobSpec
from dhad_trainer.data.pack import eos_id_for
from dhad_trainer.data.prepare import STATS_FILE, prepare
from dhad_trainer.data.readers import DataError, iter_source
from dhad_trainer.runtime import distributed
from dhad_trainer.runtime.callbacks import ProgressCallback
from dhad_trainer.stages.base import (
    StageResult,
    StageRun,
    effective_precision,
    save_model,
    training_arguments,
    weights_dtype,
)
from dhad_trainer.storage.models import tree_hash

log = logging.getLogger(__name__)


class PackedBlocks(torch.utils.data.Dataset):
    """The prepared parquet shards as a memory-mapped map-style dataset (resumable sampler state)."""

    def __init__(self, shards: list[Path], cache_dir: Path) -> None:
        import datasets

        self.ds = datasets.load_dataset("parquet", data_files=[str(s) for s in shards], split="train",
                                        cache_dir=str(cache_dir)).with_format("numpy")

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[int(i)]
        return {"input_ids": row["input_ids"], "position_ids": row["position_ids"], "index": int(i)}


class PackedCollator:
    """Stacks blocks; labels skip each document's first token. DHAD_TEST_BATCH_LOG records block order."""

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
                f.write(json.dumps([e["index"] for e in examples]) + "\n")
        return {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False}


def _corpus_for_vocabulary(run: StageRun, tokenizer, base_data: Path) -> list[str]:
    spec: PretrainJobSpec = run.spec
    if spec.vocabulary.corpus:
        raw = iter_source(SourceSpec(uri=spec.vocabulary.corpus), run.data_store)
        return [t for t in raw if isinstance(t, str) and t.strip()]
    from dhad_trainer.data.vocab import documents_from_blocks

    prepare(spec.data, tokenizer, base_data, store=run.data_store)
    return list(documents_from_blocks(sorted(base_data.glob("part-*.parquet")), tokenizer,
                                      eos_id_for(tokenizer, spec.data.packing)))


def prepare_on_node(run: StageRun, tokenizer_dir: Path) -> dict:
    """Node leader: optional vocabulary expansion, then the data pipeline. Returns what it reports."""
    from transformers import AutoTokenizer

    spec: PretrainJobSpec = run.spec
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    report: dict = {}
    if spec.vocabulary.new_tokens:
        from dhad_trainer.data.vocab import expand_vocabulary

        texts = _corpus_for_vocabulary(run, tokenizer, run.work_dir / "data-base-vocab")
        held_out, train = texts[::20], [t for i, t in enumerate(texts) if i % 20]
        report["vocabulary"] = expand_vocabulary(run.model_dir, train or held_out, held_out, spec.vocabulary.new_tokens,
                                                 run.work_dir / "expanded-model", spec.model.dtype.value)
        tokenizer = AutoTokenizer.from_pretrained(run.work_dir / "expanded-model")
    report["data"] = prepare(spec.data, tokenizer, run.work_dir / "data", store=run.data_store)
    return report


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("part-*.parquet")):
        h.update(p.read_bytes())
    return h.hexdigest()


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
    tokenizer_dir = run.inputs.get("tokenizer", run.model_dir)
    report = prepare_on_node(run, tokenizer_dir) if run.local_rank == 0 else {}
    distributed.barrier()
    data_dir = run.work_dir / "data"
    prints = distributed.all_gather(_fingerprint(data_dir) if run.local_rank == 0 else None)
    if len({p for p in prints if p is not None}) > 1:
        raise RuntimeError("nodes prepared different data shards; the data pipeline is not deterministic here")
    stats = json.loads((data_dir / STATS_FILE).read_text())
    if not stats["blocks"]:
        raise DataError(f"the corpus gave no full block of {stats['sequence_length']} tokens ({stats['tokens']} tokens kept)")
    model_dir = run.work_dir / "expanded-model" if spec.vocabulary.new_tokens else run.model_dir
    if spec.vocabulary.new_tokens:
        tokenizer_dir = model_dir

    seq = stats["sequence_length"]
    t = spec.training
    steps = max_steps_for(spec, run.world_size, seq)
    args = TrainingArguments(**training_arguments(run, t, max_steps=steps or -1, remove_unused_columns=False,
                                                  ddp_find_unused_parameters=False))  # before the model: ZeRO-3
    shards = sorted(data_dir.glob("part-*.parquet"))
    if run.local_rank != 0:
        distributed.barrier()  # leaders convert parquet to the arrow cache first, then everyone maps it
    dataset = PackedBlocks(shards, run.work_dir / "hf-datasets")
    if run.local_rank == 0:
        distributed.barrier()
    attn = attention_for(run)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=weights_dtype(run, t), attn_implementation=attn)
    model.config.use_cache = False  # required for the packed-sequence mask (see the module docstring)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for cb in run.callbacks:
        if isinstance(cb, ProgressCallback):
            cb.tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * run.world_size * seq
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=PackedCollator(),
                      processing_class=tokenizer, callbacks=list(run.callbacks))
    result = trainer.train(resume_from_checkpoint=str(run.resume_from) if run.resume_from else None)
    save_model(trainer, run.output_dir)
    metrics = {"train_loss": result.training_loss, "global_step": trainer.state.global_step,
               "attn_implementation": attn, **{f"data_{k}": stats[k] for k in ("documents_in", "kept", "tokens", "blocks")}}
    if "vocabulary" in report:
        metrics.update({f"vocab_{k}": v for k, v in report["vocabulary"].items()})
    if run.is_main:
        metrics["input_sha256"] = {"prepared_data": tree_hash(data_dir)}
    return StageResult(metrics=metrics, model_dir=run.output_dir)
