"""Training throughput in real (non-padding) tokens per second, as ratios against a baseline from the same run.

Default comparison (one process, CPU or one GPU): the same tiny Llama and the same documents trained
1. padded:        plain HF Trainer, one document per row, padded to the longest in the batch  <- baseline
2. length-grouped: the same, with HF's LengthGroupedSampler (train_sampling_strategy=group_by_length),
                  so a batch holds documents of similar length and pads little: the usual fix
3. padding-free:  HF's DataCollatorWithFlattening: a batch's documents concatenated into one row with
                  restarting position_ids (no padding, no cross-document attention; no packing across
                  steps, so the tokens per step vary with the documents drawn)
4. packed:        HF Trainer + Dhad's packed blocks and collator (what the pretrain stage runs)
                  goal >= 1.5x the padded baseline; its ratio to the best of 1-3 is printed too
5. bare:          a bare PyTorch loop over the same packed batches (no Trainer)  packed within 10% of it
Every rate counts real tokens (no padding) of exactly the batches trained in the timed steps.

`--scaling` instead runs the pretrain stage through the launcher as 1 node x 1 process (baseline) and
2 nodes x 1 process on this machine, reading tokens/s from the progress reports.

Documents are made from the project's Arabic corpus with lognormal lengths (1 to ~40 lines), as web
text is: that spread is what padding wastes. python bench/train_throughput.py [--steps 30 --seq 256]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def documents(n: int, seed: int = 0) -> list[str]:
    from dhad_trainer.local.tiny import DEFAULT_CORPUS

    lines = [line for line in DEFAULT_CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    return [" ".join(rng.choice(lines) for _ in range(max(1, min(40, int(rng.lognormvariate(1.2, 0.9))))))
            for _ in range(n)]


def packed_batches(tokenizer, docs: list[str], seq: int):
    from dhad_api.data_prep import PackingSpec
    from dhad_trainer.data.pack import pack_texts

    packer, blocks = pack_texts(docs, tokenizer, PackingSpec(sequence_length=seq))
    import numpy as np

    return [{"input_ids": np.array(b.input_ids), "position_ids": np.array(b.position_ids), "index": i}
            for i, b in enumerate(blocks)]


class CountingCollator:
    """Wraps a collator and records each batch's real (non-padding) tokens, in the order batches are made,
    so the rate counts exactly the batches of the timed steps (batch k is step k + 1, prefetch or not)."""

    def __init__(self, collator) -> None:
        self.collator, self.tokens = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        mask = batch.get("attention_mask")
        self.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
        return batch


def timed_trainer(model_dir, dataset, collator, args_kw: dict) -> float:
    """Real tokens/s of HF Trainer over `max_steps` steps after 3 warm-up steps."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    marks: dict = {}
    counting = CountingCollator(collator)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                marks["t0"] = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], save_strategy="no", logging_steps=10**6,
                             disable_tqdm=True, dataloader_num_workers=0, seed=0, learning_rate=1e-3,
                             remove_unused_columns=False, **args_kw)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=counting, callbacks=[Clock()])
    trainer.train()
    elapsed = time.perf_counter() - marks["t0"]
    return sum(counting.tokens[3:args_kw["max_steps"]]) / elapsed


def bare_loop(model_dir, dataset, collator, batch: int, steps: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = [dataset[i] for i in range(len(dataset))]
    t0 = None
    for step in range(steps):
        if step == 3:
            t0 = time.perf_counter()
        b = collator([rows[(step * batch + j) % len(rows)] for j in range(batch)])
        loss = model(input_ids=b["input_ids"], position_ids=b["position_ids"], labels=b["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (steps - 3) * batch * len(rows[0]["input_ids"]) / (time.perf_counter() - t0)


def compare(args) -> None:
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithFlattening

    from dhad_trainer.local.tiny import init_tiny_model
    from dhad_trainer.stages.pretrain import PackedCollator

    torch.set_num_threads(args.threads)
    model_dir = init_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=args.hidden, num_layers=args.layers,
                                num_heads=4, max_position=max(512, args.seq))
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = documents(args.docs)
    blocks = packed_batches(tok, docs, args.seq)
    padded = [{"input_ids": ids[: args.seq]} for ids in tok(docs, add_special_tokens=False)["input_ids"]]
    pad_collator = DataCollatorForLanguageModeling(tok, mlm=False)
    mean_doc = sum(len(p["input_ids"]) for p in padded) / len(padded)
    batch_docs = max(1, round(args.batch * args.seq / mean_doc))  # about the packed batch's tokens per step
    common = {"max_steps": args.steps, "use_cpu": not torch.cuda.is_available()}
    per_doc = {**common, "per_device_train_batch_size": batch_docs}
    baselines = {
        "padded HF Trainer (baseline)": timed_trainer(model_dir, padded, pad_collator, per_doc),
        "padded, length-grouped": timed_trainer(model_dir, padded, pad_collator,
                                                {**per_doc, "train_sampling_strategy": "group_by_length"}),
        "padding-free (HF flattening)": timed_trainer(model_dir, padded, DataCollatorWithFlattening(), per_doc),
    }
    results = {
        **baselines,
        "packed HF Trainer (Dhad)": timed_trainer(
            model_dir, blocks, PackedCollator(), {**common, "per_device_train_batch_size": args.batch}),
        "bare packed loop": bare_loop(model_dir, blocks, PackedCollator(), args.batch, args.steps),
    }
    base = results["padded HF Trainer (baseline)"]
    print(f"docs={len(docs)} mean_doc_tokens={mean_doc:.0f} seq={args.seq} packed_batch={args.batch} "
          f"padded_batch={batch_docs} hidden={args.hidden} layers={args.layers} threads={args.threads}")
    for name, rate in results.items():
        print(f"{name:32s} {rate:10.0f} real tokens/s   x{rate / base:.2f}")
    packed, bare = results["packed HF Trainer (Dhad)"], results["bare packed loop"]
    best = max(baselines, key=baselines.get)
    print(f"packed vs the best baseline ({best}): x{packed / baselines[best]:.2f}")
    print(f"packed Trainer overhead vs bare loop: {100 * (1 - packed / bare):.1f}%")


def scaling(args) -> None:
    """1 node x 1 process vs 2 nodes x 1 process through the real launcher (tokens/s from progress)."""
    from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model
    from tests.unit.test_launcher import Launch, job_doc

    tmp = Path(tempfile.mkdtemp())
    model = str(init_tiny_model(tmp / "m", hidden_size=args.hidden))
    rates = {}
    for nodes in (1, 2):
        doc = job_doc(model, str(DEFAULT_CORPUS), nodes=nodes, steps=args.steps, interval=10**6, seq=args.seq)
        env = {"DHAD_OUTPUT_ROOT": str(tmp / f"out{nodes}"), "MASTER_PORT": str(29400 + nodes)}
        runs = [Launch.start(doc, tmp / f"n{nodes}-{i}", env, node=i, nproc=1) for i in range(nodes)]
        assert [r.wait(900) for r in runs] == [0] * nodes, runs[0].log[-2000:]
        reports = [r for r in runs[0].reports() if r.get("tokensPerSecond") and not r.get("final")]
        rates[nodes] = sorted(r["tokensPerSecond"] for r in reports)[len(reports) // 2]  # median
    print(f"1 node x 1 proc (baseline) {rates[1]:10.0f} tokens/s   x1.00")
    print(f"2 nodes x 1 proc           {rates[2]:10.0f} tokens/s   x{rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="packed blocks per step")
    p.add_argument("--docs", type=int, default=400)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--scaling", action="store_true", help="2 nodes vs 1 node through the launcher instead")
    a = p.parse_args()
    scaling(a) if a.scaling else compare(a)
