"""The EvalJob stage: maps `spec.evaluation` onto the evaluation library and writes the report.

`run(run)` evaluates the model at `run.model_dir` and writes `run.output_dir/report/` (results.json,
summary.md, PNG charts, per-item predictions), which the runtime uploads to `<root>/eval/report/`.
Only rank 0 evaluates: a report is small work next to training, and one process keeps the item order
and the report deterministic; other ranks return at once. `dhad eval` calls `evaluate` directly.

How the spec maps (choices the API leaves open):
- `limit` caps items per suite in file order (the library's limit_per="total").
- `shots` applies to arabic-mmlu and exams; ACVA stays zero-shot as in AceGPT. With `shots: 0` the
  model is treated as a chat model: prompts go through its chat template when its tokenizer has one.
- `excludeDuplicates` adds the figures without every member of a duplicate group (policy "all");
  duplicate counts are reported either way.
- open-ended answers get at most min(512, context/2) new tokens, so the question keeps half the window.
- the judge is RLAIF's (`dhad_trainer.llm.judges`, Arabic prompt) with AceGPT's answer-quality criteria as
  its constitution; the scorer asks in both orders. `judge.model` is a local folder: `run.inputs["judge"]` (the runtime resolves fromJob,
  s3:// and hf:// there) or else an absolute path in `uri`; `judge.endpoint` reads its key from env
  DHAD_JUDGE_API_KEY when `apiKeySecretRef` is set (the runtime injects it under that name).
- `referenceAnswers` is a folder or s3:// prefix in the format of `evaluation.references`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dhad_api.jobs import EvalJobSpec
from dhad_api.layout import REPORT
from dhad_api.stages import Evaluation, Judge
from dhad_trainer.evaluation.job import EvalSettings, load_references, run_eval
from dhad_trainer.evaluation.loaders import OPEN_SUITES
from dhad_trainer.stages.base import StageResult, StageRun

log = logging.getLogger(__name__)

SUMMARY = f"{REPORT}/summary.md"
# What the judge weighs: the Vicuna/AceGPT answer-quality criteria, not RLAIF's longer constitution.
EVAL_CRITERIA = (
    "قيّم الإجابتين من حيث الفائدة والصلة بالسؤال والدقة ومستوى التفصيل، وسلامة اللغة العربية وطلاقتها، "
    "وملاءمتها للثقافة العربية وقيمها."
)


def has_chat_template(model_dir: str | Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).chat_template is not None


def load_runner(
    model_dir: str | Path,
    *,
    shots: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
) -> Any:
    """An `HFModelRunner`; zero-shot means a chat model, so its chat template is used when it has one."""
    from dhad_trainer.evaluation.runner import HFModelRunner

    chat = shots == 0 and has_chat_template(model_dir)
    return HFModelRunner.from_pretrained(
        str(model_dir), dtype=dtype, device=device, batch_size=batch_size, chat_template=chat
    )


def open_answer_tokens(runner: Any) -> int:
    return max(16, min(512, runner.max_length // 2))


def make_judge(judge: Judge, local_dir: str | Path | None = None, *, batch_size: int = 8) -> Any:
    """The RLAIF judge (`dhad_trainer.llm.judges`) for the spec; its `compare()` is the evaluation's Judge."""
    from dhad_trainer.llm.judges import EndpointJudge, ModelJudge, endpoint_config

    common: dict[str, Any] = dict(
        constitution=EVAL_CRITERIA,
        language="ar",
        max_new_tokens=judge.max_new_tokens,
        max_attempts=judge.max_attempts,
    )
    if judge.endpoint is not None:
        return EndpointJudge(endpoint_config(judge.endpoint), **common)
    assert judge.model is not None  # the API rule: exactly one of model and endpoint
    path = local_dir or (judge.model.uri if (judge.model.uri or "").startswith("/") else None)
    if path is None:
        where = judge.model.uri or f"fromJob {judge.model.from_job.name}"  # type: ignore[union-attr]
        raise ValueError(
            f"judge model {where} is not a local folder: the runtime must put it at run.inputs['judge'] "
            "(dhad eval: pass --judge-model DIR)"
        )
    return ModelJudge(path, batch_size=batch_size, **common)


def settings_for(ev: Evaluation, max_new_tokens_open: int = 512) -> EvalSettings:
    return EvalSettings(
        source=ev.benchmarks or "hf://",
        suites=tuple(s.value for s in ev.suites),
        methods=(ev.method.value,),
        base_model=ev.shots > 0,
        k_shot=ev.shots,
        limit=ev.limit,
        limit_per="total",
        duplicates="all" if ev.exclude_duplicates else "none",
        max_new_tokens_open=max_new_tokens_open,
    )


def evaluate(
    ev: Evaluation,
    model_dir: str | Path,
    report_dir: str | Path,
    *,
    work_dir: str | Path,
    store: Any = None,
    judge_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str = "auto",
    model_name: str | None = None,
    max_new_tokens_open: int | None = None,
) -> dict[str, float]:
    """Evaluate one model as `ev` says; returns the headline scores ("<suite>/<method>" -> score)."""
    from dhad_trainer.evaluation.references import fetch_references

    open_suites = [s.value for s in ev.suites if s.value in OPEN_SUITES]
    references, judge = None, None
    if open_suites:
        if ev.reference_answers is None or ev.judge is None:
            raise ValueError("open-ended suites (vicuna-80, alpaca-eval) need judge and referenceAnswers")
        paths = fetch_references(
            ev.reference_answers, open_suites, store=store, cache=Path(work_dir) / "references"
        )
        references = {suite: load_references(p) for suite, p in paths.items()}
        judge = make_judge(ev.judge, judge_dir, batch_size=ev.batch_size)
    runner = load_runner(model_dir, shots=ev.shots, batch_size=ev.batch_size, device=device, dtype=dtype)
    settings = settings_for(ev, max_new_tokens_open or open_answer_tokens(runner))
    log.info("evaluating %s on %s (%s)", model_dir, ", ".join(settings.suites), ev.method.value)
    return run_eval(
        settings,
        runner,
        report_dir,
        model=model_name or Path(model_dir).name,
        judge=judge,
        references=references,
        store=store,
    )


def run(run: StageRun) -> StageResult:
    """The stage contract: evaluate `run.model_dir`, report into `run.output_dir/report`."""
    spec = run.spec
    if not isinstance(spec, EvalJobSpec):
        raise TypeError(f"the eval stage needs an EvalJob spec, got {type(spec).__name__}")
    if not run.is_main:
        return StageResult(metrics={"skipped": f"rank {run.rank}: rank 0 evaluates"})
    model = spec.model.uri or f"{spec.model.from_job.kind}/{spec.model.from_job.name}"  # type: ignore[union-attr]
    scores = evaluate(
        spec.evaluation,
        run.model_dir,
        run.output_dir / REPORT,
        work_dir=run.work_dir,
        store=run.data_store,
        judge_dir=run.inputs.get("judge"),
        device="cpu" if run.use_cpu else f"cuda:{run.local_rank}",
        dtype=spec.model.dtype.value,
        model_name=model,
    )
    return StageResult(metrics={"scores": scores, "report": SUMMARY})
