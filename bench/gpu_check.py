"""One GPU check of the trainer's GPU path: a ~1B-parameter Llama with random weights, bf16 mixed precision
(fp32 master weights), trained a few steps by HF Trainer with the configs the runtime builds from a spec
(`deepspeed_config.build`, `fsdp_config.build`, `stages.base.training_arguments`), per strategy:

    python -m torch.distributed.run --nproc-per-node 1 bench/gpu_check.py --strategy zero2 --attention sdpa

prints one JSON line: tokens/s, MFU (model FLOPs 6 x parameters + 12 x layers x hidden x sequence per token,
against the GPU's dense bf16 peak from dhad_api.plan), peak memory (torch.cuda.max_memory_allocated and
reserved) and the plan's per-GPU prediction for the same job. `--dry-run` runs a tiny model on CPU (gloo,
fp32) through the same code, to check the script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "api"), str(REPO / "trainer")]

# ~1B Llama (0.94 B parameters): 16 layers of hidden 2048, SwiGLU 5504, vocabulary 32000
GPU_MODEL = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 16,
             "num_attention_heads": 16, "num_key_value_heads": 16, "max_position_embeddings": 4096}
TINY_MODEL = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}
DISTRIBUTED = {"ddp": {"strategy": "ddp"}, "zero2": {"strategy": "deepspeed", "zeroStage": 2},
               "zero3": {"strategy": "deepspeed", "zeroStage": 3}, "fsdp": {"strategy": "fsdp"}}


def spec_for(args, cpu: bool):
    from dhad_api.jobs import PretrainJobSpec

    return PretrainJobSpec.model_validate({
        "model": {"uri": "/bench/model", "dtype": "bfloat16", "attention": args.attention},
        "resources": {"nodes": 1, "gpusPerNode": 0 if cpu else 1},
        "storage": {"bucket": "bench"}, "distributed": DISTRIBUTED[args.strategy],
        "checkpoint": {"intervalSteps": 10**6},
        "data": {"sources": [{"uri": "/bench/data"}], "packing": {"sequenceLength": args.seq}},
        "training": {"learningRate": 1e-4, "microBatchSize": args.micro, "maxSteps": args.steps, "logEverySteps": 1,
                     "precision": "fp32" if cpu else "bf16", "gradientCheckpointing": args.checkpointing, "warmupSteps": 1},
    })


class Tokens:
    """Random token blocks: the check measures the trainer, not data."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        import torch

        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=list(DISTRIBUTED), default="ddp")
    p.add_argument("--attention", choices=["sdpa", "flash-attention-2", "eager"], default="sdpa")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks the script without a GPU")
    args = p.parse_args()
    if args.dry_run:
        args.seq, args.micro, args.steps, args.warmup = min(args.seq, 64), min(args.micro, 2), min(args.steps, 3), 1

    import torch
    import transformers

    from dhad_api.plan import Architecture, Gpu, gpu_for_product, training_plan
    from dhad_trainer.runtime import deepspeed_config, distributed, fsdp_config
    from dhad_trainer.stages.base import StageRun, training_arguments, weights_dtype

    cpu = args.dry_run or not torch.cuda.is_available()
    if cpu and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run for the CPU check", file=sys.stderr)
        return 2
    spec = spec_for(args, cpu)
    ds = deepspeed_config.build(spec.distributed, cpu)
    cluster = distributed.setup(always=True)
    if ds is not None:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo" if cpu else "nccl")
    fsdp = fsdp_config.build(spec.distributed, cluster.nnodes, cluster.local_world_size)
    if fsdp is not None and cpu:
        fsdp_config.enable_on_cpu()
    work = Path(tempfile.mkdtemp(prefix="dhad-gpu-check-"))
    run = StageRun(spec=spec, stage="pretrain", model_dir=work, work_dir=work, output_dir=work / "out", deepspeed=ds,
                   fsdp=fsdp, rank=cluster.rank, world_size=cluster.world_size, local_rank=cluster.local_rank, use_cpu=cpu)
    targs = transformers.TrainingArguments(**training_arguments(run, spec.training, save_strategy="no",
                                                                remove_unused_columns=False))
    shape = TINY_MODEL if args.dry_run else GPU_MODEL
    attn = {"sdpa": "sdpa", "eager": "eager", "flash-attention-2": "flash_attention_2"}[args.attention]
    config = transformers.LlamaConfig(**shape, attn_implementation=attn, use_cache=False)
    torch.manual_seed(0)
    with torch.device("cpu" if cpu else f"cuda:{cluster.local_rank}"):  # random init on the GPU: seconds, not a minute
        model = transformers.LlamaForCausalLM(config).to(weights_dtype(run, spec.training))
    steps: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *a, **k):
            if not cpu:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if not cpu:
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.t)

    data = Tokens(args.steps * args.micro * cluster.world_size, args.seq, shape["vocab_size"])
    trainer = transformers.Trainer(model=model, args=targs, train_dataset=data, callbacks=[Clock()])
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    arch = Architecture.from_config(config.to_dict(), "check")
    name = "cpu" if cpu else torch.cuda.get_device_name()
    gpu = gpu_for_product(name.replace(" ", "-")) or Gpu(name, torch.cuda.get_device_properties(0).total_memory if not cpu else 0)
    plan = training_plan("pretrain", spec, arch, spec.training, args.seq, gpu, 0.4)
    timed = steps[args.warmup:] or steps
    tokens_per_s = args.micro * args.seq * cluster.world_size / (sum(timed) / len(timed))
    flops_per_token = 6 * arch.parameters + 12 * arch.num_layers * arch.hidden_size * args.seq
    result = {
        "strategy": args.strategy, "attention": args.attention, "device": name, "parameters": arch.parameters,
        "sequence": args.seq, "micro_batch": args.micro, "checkpointing": args.checkpointing, "steps": len(steps),
        "tokens_per_s": round(tokens_per_s, 1),
        "mfu": round(tokens_per_s * flops_per_token / gpu.bf16_flops, 4) if gpu.bf16_flops and not cpu else None,
        "peak_allocated_gib": None if cpu else round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": None if cpu else round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "plan_gib": round(plan.total / 2**30, 2),
        "plan": {k: round(v / 2**30, 3) for k, v in plan.components},
        "loss": [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h],
    }
    if cluster.is_main:
        print(json.dumps(result), flush=True)
    distributed.teardown()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
