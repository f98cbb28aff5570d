"""The demo: the whole AceGPT recipe on tiny models, end to end in local mode, with the real code paths.

An embedded S3 server is seeded with a tiny base model (random Llama + Arabic BPE), the project's own
Arabic text, instructions and prompts, and the AceGPT benchmark files; then examples/tiny/{pretrain,
sft, rlaif, eval}.yaml run in order through `dhad run`'s machinery (launcher -> torchrun -> stages),
each job starting from the previous one's model through model.fromJob.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny"
BENCHMARKS = Path(os.environ.get("DHAD_BENCHMARKS", REPO.parent / "shared" / "benchmarks" / "acegpt"))
BUCKET = "s3://dhad-demo"


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def seed(workdir: Path, store) -> None:
    """What the manifests reference: the base model, the data, the benchmarks and reference answers."""
    from dhad_trainer.data.chat import ASSETS
    from dhad_trainer.evaluation.references import write_references
    from dhad_trainer.local.tiny import init_tiny_model
    from dhad_trainer.stages.eval import load_runner

    base = init_tiny_model(workdir / "models" / "tiny-base")
    store.upload_dir(base, f"{BUCKET}/models/tiny-base")
    for name in ("arabic_corpus.txt", "arabic_instructions.jsonl", "arabic_prompts.jsonl"):
        store.upload_file(ASSETS / name, f"{BUCKET}/data/{name}")
    if not BENCHMARKS.is_dir():
        raise SystemExit(f"dhad demo: benchmark files not found at {BENCHMARKS} (set DHAD_BENCHMARKS)")
    store.upload_dir(BENCHMARKS, f"{BUCKET}/benchmarks/acegpt")
    references = workdir / "reference-answers"
    write_references(load_runner(str(base), batch_size=8), str(BENCHMARKS), str(references),
                     suites=["vicuna-80", "alpaca-eval"], limit=24, max_new_tokens=24, model="tiny-base")
    store.upload_dir(references, f"{BUCKET}/benchmarks/reference-answers")


def scores_table(summary: Path) -> str:
    """The report's first table: every suite and method, one column per model."""
    lines = summary.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| suite |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def run_demo(workdir: Path) -> int:
    from dhad_trainer.local.run import Session, run_job
    from dhad_trainer.storage.embedded_s3 import EmbeddedS3
    from dhad_trainer.storage.routing import open_store

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    with EmbeddedS3(workdir / "s3") as s3:
        os.environ.update(s3.env())
        s3.ensure_bucket("dhad-demo")
        store = open_store(BUCKET)
        started = step("0. seed: tiny base model, the project's Arabic data, AceGPT benchmark files, reference answers")
        seed(workdir, store)
        print(f"   embedded S3 at {s3.url} ({time.monotonic() - started:.0f} s)")
        session = Session(workdir, s3.env())
        titles = {"pretrain": "1. continued pre-training (data prep, vocabulary expansion, 2 nodes)",
                  "sft": "2. supervised fine-tuning on Arabic instructions (2 nodes)",
                  "rlaif": "3. RLAIF: feedback (judge under the Arabic constitution) -> reward model -> GRPO policy",
                  "eval": "4. evaluation on samples of ACVA, Arabic MMLU, EXAMs, Vicuna-80, AlpacaEval"}
        statuses = {}
        for name, title in titles.items():
            started = step(title)
            doc = yaml.safe_load((TINY / f"{name}.yaml").read_text())
            statuses[name] = run_job(doc, session)
            print(f"   {json.dumps({k: v for k, v in statuses[name].items() if k != 'logs'})} ({time.monotonic() - started:.0f} s)")
        final = workdir / "final"
        model_dir = final / "model"
        store.download_dir(statuses["rlaif"]["outputModel"], model_dir)
        report_dir = final / "report"
        store.download_dir(f"{statuses['eval']['outputRoot']}/eval/model/report", report_dir)
    summary = report_dir / "summary.md"
    print("\nScores, the aligned model beside its base (struck out: flagged, see the report):")
    print(scores_table(summary))
    print(f"\nDone in {time.monotonic() - began:.0f} s.")
    print(f"Aligned model (Hugging Face format): {model_dir}")
    print(f"Evaluation report: {summary} (JSON and PNG charts beside it: {', '.join(sorted(p.name for p in report_dir.glob('*.png')))})")
    print(f"Logs of every stage: {workdir / 'jobs'}")
    return 0
