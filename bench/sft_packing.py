"""SFT tokens/s with and without packing, on the same data, through the real SFT stage code.

Tokens/s counts real (non-padding) tokens trained per second of `trainer.train()`. Packing uses the
stage's settings (best-fit decreasing, padding-free, per-document position_ids); unpacked batches
hold about as many conversations as one packed row, padded to the longest. Run:

    .venv/bin/python bench/sft_packing.py [--repeat 4] [--hidden 256] [--layers 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dhad_api.jobs import SFTJobSpec
from dhad_trainer.local.tiny import DEFAULT_INSTRUCTIONS, init_tiny_model
from dhad_trainer.stages import sft
from dhad_trainer.stages.base import StageRun


def measure(model_dir: Path, data: Path, root: Path, packing: bool, sequence_length: int, batch: int) -> dict:
    spec = SFTJobSpec.model_validate({
        "model": {"uri": "/bench"}, "storage": {"bucket": "bench"}, "data": [{"uri": str(data)}],
        "training": {"sequenceLength": sequence_length, "packing": packing, "microBatchSize": batch, "epochs": 1,
                     "learningRate": 1e-4, "logEverySteps": 1000}, "checkpoint": {"intervalSteps": 1_000_000}})
    run = StageRun(spec=spec, stage="sft", model_dir=model_dir, work_dir=root / "work", output_dir=root / "out")
    trainer, _, _ = sft.build_trainer(run)
    rows = trainer.train_dataset
    tokens = sum(sum(r["seq_lengths"]) for r in rows) if packing else sum(len(r["input_ids"]) for r in rows)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    docs = sum(len(r["seq_lengths"]) for r in rows) if packing else len(rows)
    return {"packing": packing, "rows": len(rows), "documents": docs, "micro_batch": batch, "steps": trainer.state.global_step,
            "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4, help="copies of the 72 Arabic instructions")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=512)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dhad-bench-") as tmp:
        root = Path(tmp)
        model_dir = init_tiny_model(root / "model", hidden_size=args.hidden, num_layers=args.layers,
                                    max_position=args.sequence_length)
        data = root / "data.jsonl"
        data.write_text(DEFAULT_INSTRUCTIONS.read_text(encoding="utf-8") * args.repeat, encoding="utf-8")
        packed = measure(model_dir, data, root / "packed", True, args.sequence_length, 1)
        per_row = max(1, round(packed["documents"] / packed["rows"]))  # conversations in one packed row
        plain = measure(model_dir, data, root / "plain", False, args.sequence_length, per_row)
    for r in (packed, plain):
        print(f"{'packed  ' if r['packing'] else 'unpacked'} rows={r['rows']:4d} batch={r['micro_batch']} "
              f"steps={r['steps']:4d} tokens={r['tokens']} time={r['seconds']}s tokens/s={r['tokens_per_s']}")
    print(f"speed-up packed/unpacked: {packed['tokens_per_s'] / plain['tokens_per_s']:.2f}x")
    print(json.dumps({"packed": packed, "unpacked": plain}))


if __name__ == "__main__":
    main()
