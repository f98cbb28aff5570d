"""Questions/s of batched log-likelihood scoring vs per-question generation, on the same MC items.

Why: log-likelihood answers a question in one batched forward (the four letters share one row), where
AceGPT-style generation runs up to 10 decode steps per question. This prints both rates and their
ratio (goal >= 5x), plus batched generation as the fairer baseline and the forward-pass counts, which
do not depend on how busy the machine is. Each method runs `--repeats` times, interleaved, best kept.

    .venv/bin/python bench/eval_speed.py [--model DIR] [--items 64] [--shots 5]

Without --model two tiny random Llamas are built in a temporary folder: one with dhad init-model's
tokenizer, which has no " A" token, so each letter is its own 2-token continuation and row; and one
whose tokenizer, like real ones, encodes " A".." D" as one token, so a question is one row.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dhad_trainer.evaluation.loaders import MMLU, load_suite
from dhad_trainer.evaluation.runner import HFModelRunner
from dhad_trainer.evaluation.scoring import GENERATE, LOGLIKELIHOOD, score_suite

BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "benchmarks" / "acegpt"


def tiny_model(out: Path, letters: bool) -> str:
    """A tiny random Llama; `letters` adds AceGPT-style answer lines to its tokenizer corpus, so " A"
    .. " D" become one token each, as in real LLM tokenizers (Llama, Qwen, Jais)."""
    from dhad_trainer.local.tiny import DEFAULT_CORPUS, init_tiny_model

    corpus = DEFAULT_CORPUS
    if letters:
        corpus = out.with_suffix(".txt")
        extra = "".join(f"سؤال\nإجابة: {x}\n" for x in "ABCD") * 50
        corpus.write_text(DEFAULT_CORPUS.read_text(encoding="utf-8") + extra, encoding="utf-8")
    return str(init_tiny_model(out, corpus_path=corpus))


def measure(
    model_dir: str, shots: int, args: argparse.Namespace
) -> tuple[dict[str, float], dict[str, int], str]:
    base = HFModelRunner.from_pretrained(model_dir, device=args.device)
    items = load_suite(MMLU, args.benchmarks, limit=2, limit_per="subject")[: args.items]
    dev = load_suite(MMLU, args.benchmarks, "dev") if shots else []
    calls: list[int] = []
    base.model.register_forward_hook(lambda *_: calls.append(1))
    setups = {
        "loglikelihood, batched": (LOGLIKELIHOOD, args.batch_size),
        "generate, per question": (GENERATE, 1),
        "generate, batched": (GENERATE, args.batch_size),
    }
    best = dict.fromkeys(setups, float("inf"))
    forwards = {}
    for method, batch in setups.values():  # warm-up
        score_suite(
            items[:2], HFModelRunner(base.model, base.tok, batch_size=batch), method, dev=dev, k_shot=1
        )
    for _ in range(args.repeats):
        for name, (method, batch) in setups.items():
            runner = HFModelRunner(base.model, base.tok, batch_size=batch)
            calls.clear()
            start = time.perf_counter()
            score_suite(items, runner, method, dev=dev, k_shot=shots)
            best[name] = min(best[name], time.perf_counter() - start)
            forwards[name] = len(calls)
    letter_tokens = len(base.tok(" A", add_special_tokens=False)["input_ids"])
    return (
        {n: len(items) / t for n, t in best.items()},
        forwards,
        f"{base.device}, ' A' = {letter_tokens} token(s)",
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder; default: tiny random models (see --tokenizer)")
    ap.add_argument(
        "--tokenizer",
        choices=["tiny", "letters", "both"],
        default="both",
        help="tiny: dhad init-model's tokenizer; letters: one with single-token ' A'..' D'",
    )
    ap.add_argument("--benchmarks", default=str(BENCH))
    ap.add_argument("--items", type=int, default=64, help="arabic-mmlu questions (2 per subject)")
    ap.add_argument(
        "--shots", default="0,5", help="dev examples per prompt, comma-separated (AceGPT: 0 chat, 5 base)"
    )
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    print(f"{args.items} arabic-mmlu questions, batch {args.batch_size}, best of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            models = {args.model: args.model}
        else:
            kinds = ["tiny", "letters"] if args.tokenizer == "both" else [args.tokenizer]
            models = {
                f"tiny random Llama, {k} tokenizer": tiny_model(Path(tmp) / k, k == "letters") for k in kinds
            }
        for label, path in models.items():
            for shots in (int(k) for k in args.shots.split(",")):
                qps, forwards, where = measure(path, shots, args)
                print(f"{label}, {shots}-shot ({where})")
                for name in qps:
                    print(f"  {name:<24} {qps[name]:8.1f} questions/s  {forwards[name]:5d} forward passes")
                ll = qps["loglikelihood, batched"]
                print(
                    f"  ratio loglikelihood / per-question generation: {ll / qps['generate, per question']:.1f}x"
                )
                print(
                    f"  ratio loglikelihood / batched generation:      {ll / qps['generate, batched']:.1f}x"
                )


if __name__ == "__main__":
    main()
