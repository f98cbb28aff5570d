"""The demo: the whole AceGPT recipe on tiny models, end to end in local mode, with the real code paths.

An embedded S3 server is seeded with a tiny base model (random Llama + Arabic BPE), the project's own
Arabic text, instructions and prompts, and benchmark files; then examples/tiny/pipeline.yaml
(pretrain -> gated SFT -> gated RLAIF -> eval, one Pipeline) runs through `dhad run`'s machinery
(launcher -> torchrun -> stages), each stage starting from the previous one's model. Run again in the
same --workdir, every stage comes from the step cache.

Benchmarks: the AceGPT files from $DHAD_BENCHMARKS or ../shared/benchmarks/acegpt beside the clone;
without either, Dhad's own samples in the suites' formats (assets/benchmark-samples), so a fresh
clone needs nothing else. The output and the report say which was used.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
TINY = REPO / "examples" / "tiny"
BUCKET = "s3://dhad-demo"


def benchmark_source() -> tuple[Path, str]:
    """(folder, what it is): the AceGPT files where this machine has them, else Dhad's samples."""
    from dhad_trainer.evaluation.loaders import BENCHMARKS_ENV, SAMPLE_BENCHMARKS, acegpt_files

    try:
        real = acegpt_files(REPO)
    except FileNotFoundError as error:
        raise SystemExit(f"dhad demo: {error}") from None
    if real is not None:
        return real, f"the AceGPT benchmark files in {real}"
    return SAMPLE_BENCHMARKS, (f"Dhad's own small samples in the suites' formats ({SAMPLE_BENCHMARKS}), not the "
                               "AceGPT benchmarks: the scores show that the pipeline works, not how the model "
                               f"compares (set {BENCHMARKS_ENV} to a folder of the AceGPT files for that)")


def step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def seed(workdir: Path, store, benchmarks: Path) -> None:
    """What the manifests reference: the base model, the data, the benchmarks and reference answers."""
    from dhad_trainer.data.chat import ASSETS
    from dhad_trainer.evaluation.references import write_references
    from dhad_trainer.local.tiny import init_tiny_model
    from dhad_trainer.stages.eval import load_runner

    base = init_tiny_model(workdir / "models" / "tiny-base")
    store.upload_dir(base, f"{BUCKET}/models/tiny-base")
    for name in ("arabic_corpus.txt", "arabic_instructions.jsonl", "arabic_prompts.jsonl"):
        store.upload_file(ASSETS / name, f"{BUCKET}/data/{name}")
    store.upload_dir(benchmarks, f"{BUCKET}/benchmarks/acegpt")
    references = workdir / "reference-answers"
    write_references(load_runner(str(base), batch_size=8), str(benchmarks), str(references),
                     suites=["vicuna-80", "alpaca-eval"], limit=24, max_new_tokens=24, model="tiny-base")
    store.upload_dir(references, f"{BUCKET}/benchmarks/reference-answers")


def scores_table(summary: Path) -> str:
    """The report's first table: every suite and method, one column per model."""
    lines = summary.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| suite |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def run_demo(workdir: Path) -> int:
    from dhad_trainer.local.pipeline import run_pipeline
    from dhad_trainer.local.run import Session
    from dhad_trainer.storage.embedded_s3 import EmbeddedS3
    from dhad_trainer.storage.routing import open_store

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    benchmarks, benchmarks_said = benchmark_source()
    print(f"Benchmarks: {benchmarks_said}", flush=True)
    with EmbeddedS3(workdir / "s3") as s3:
        os.environ.update(s3.env())
        s3.ensure_bucket("dhad-demo")
        store = open_store(BUCKET)
        started = step("0. seed: tiny base model, the project's Arabic data, benchmark files, reference answers")
        seed(workdir, store, benchmarks)
        print(f"   embedded S3 at {s3.url} ({time.monotonic() - started:.0f} s)")
        session = Session(workdir, s3.env())
        started = step("1-4. the recipe as one Pipeline (examples/tiny/pipeline.yaml): continued pre-training (data prep, "
                       "vocabulary expansion, 2 nodes) -> SFT on Arabic instructions (2 nodes), gated on ACVA -> RLAIF (judge "
                       "under the Arabic constitution, every verdict a forced likelihood choice kept by useForcedVerdicts "
                       "-> reward model -> GRPO), gated on Arabic MMLU -> evaluation on samples "
                       "of ACVA, Arabic MMLU, EXAMs, Vicuna-80, AlpacaEval")
        status = run_pipeline(yaml.safe_load((TINY / "pipeline.yaml").read_text()), session)
        print(f"   pipeline {status['state']} ({time.monotonic() - started:.0f} s)")
        if status["state"] != "Succeeded":
            raise SystemExit(f"dhad demo: the pipeline {status['state']}: {status.get('message')}")
        final = workdir / "final"
        model_dir = final / "model"
        store.download_dir(status["outputModel"], model_dir)
        report_dir = final / "report"
        report = next(s for s in status["stages"] if s["kind"] == "EvalJob")["report"]
        store.download_dir(report.rsplit("/", 1)[0], report_dir)
    summary = report_dir / "summary.md"
    note_benchmarks(summary, benchmarks_said)
    print("\nScores, the aligned model beside its base (struck out: flagged, see the report):")
    print(scores_table(summary))
    print(f"\nDone in {time.monotonic() - began:.0f} s.")
    print(f"Aligned model (Hugging Face format): {model_dir}")
    print(f"Evaluation report: {summary} (JSON and PNG charts beside it: {', '.join(sorted(p.name for p in report_dir.glob('*.png')))})")
    print(f"Benchmarks: {benchmarks_said}")
    print(f"Logs of every stage: {workdir / 'jobs'}")
    return 0


def note_benchmarks(summary: Path, said: str) -> None:
    """Puts where the benchmark items came from at the top of the report, so no one mistakes sample
    scores for AceGPT scores."""
    summary.write_text(f"> Benchmarks: {said}.\n\n" + summary.read_text(encoding="utf-8"), encoding="utf-8")
