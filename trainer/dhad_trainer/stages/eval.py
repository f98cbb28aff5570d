"""The EvalJob stage: maps `spec.evaluation` onto the evaluation library and writes the report.

`run(run)` evaluates the model at `run.model_dir` (and `evaluation.compare`'s models, which the runtime
puts at `run.inputs["compare-<name>"]`) and writes `run.output_dir/report/` (results.json, summary.md,
PNG charts, per-item predictions), which the runtime uploads to `<root>/eval/report/`. Only rank 0
evaluates: a report is small work next to training, and one process keeps the item order and the
report deterministic; other ranks return at once. `dhad eval` calls `evaluate` directly.

How the spec maps (choices the API leaves open):
- `limit` draws a seeded sample stratified by subject/topic (`limitPer`, `seed`); every model sees it.
- `shots` applies to arabic-mmlu and exams; ACVA stays zero-shot as in AceGPT. With `shots: 0` the
  model is treated as a chat model: prompts go through its chat template when its tokenizer has one.
- `excludeDuplicates` adds the figures without every member of a duplicate group (policy "all");
  duplicate counts are reported either way.
- open-ended answers get at most min(512, context/2) new tokens, so the question keeps half the window.
- judge-pairwise uses RLAIF's judge (`dhad_trainer.llm.judges`, Arabic prompt) with AceGPT's answer-quality
  criteria as its constitution; judge-scores uses evaluation.judging's 1-10 prompt. A local judge
  (`judge.model`: `run.inputs["judge"]`, or an absolute path in `uri`) runs on the job's device in
  `judge.model.dtype`, or the job's dtype when that is auto; both metrics share its weights. An endpoint
  judge (`judge.endpoint`) reads its key from env DHAD_JUDGE_API_KEY when `apiKeySecretRef` is set.
- `useVllm` generates with vLLM when it is installed and the job has a GPU; otherwise batched
  transformers, and the report's settings say which backend produced each model's answers.
- `referenceAnswers` is a folder or s3:// prefix in the format of `evaluation.references`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dhad_api.jobs import EvalJobSpec
from dhad_api.layout import REPORT
from dhad_api.stages import Evaluation, Judge
from dhad_trainer.evaluation.job import EvalSettings, load_references, run_eval
from dhad_trainer.evaluation.loaders import OPEN_SUITES
from dhad_trainer.evaluation.scoring import PAIRWISE, SCORES
from dhad_trainer.stages.base import StageResult, StageRun

log = logging.getLogger(__name__)

SUMMARY = f"{REPORT}/summary.md"
STATUS_SCORES = 32  # status.scores holds at most this many entries (dhad_api.status)
# What the judge weighs: the Vicuna/AceGPT answer-quality criteria, not RLAIF's longer constitution.
EVAL_CRITERIA = (
    "قيّم الإجابتين من حيث الفائدة والصلة بالسؤال والدقة ومستوى التفصيل، وسلامة اللغة العربية وطلاقتها، "
    "وملاءمتها للثقافة العربية وقيمها."
)


def has_chat_template(model_dir: str | Path) -> bool:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir)).chat_template is not None


def context_length(model_dir: str | Path) -> int:
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(str(model_dir)), "max_position_embeddings", 4096) or 4096)


def generation_backend(use_vllm: bool, device: str | None) -> tuple[str, str]:
    """(backend, what the report says about it)."""
    from dhad_trainer.evaluation.runner import vllm_available

    if not use_vllm:
        return "transformers", "transformers (batched)"
    if device == "cpu" or not vllm_available():
        why = "no GPU" if device == "cpu" else "vLLM is not installed or no GPU is visible"
        return "transformers", f"transformers (batched; useVllm asked for vLLM: {why})"
    return "vllm", "vllm"


def load_runner(
    model_dir: str | Path,
    *,
    shots: int = 0,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    backend: str = "transformers",
) -> Any:
    """A runner for one model; zero-shot means a chat model, so its chat template is used when it has one."""
    from dhad_trainer.evaluation.runner import HFModelRunner, VllmRunner

    chat = shots == 0 and has_chat_template(model_dir)
    if backend == "vllm":
        return VllmRunner(str(model_dir), dtype=dtype, chat_template=chat)
    return HFModelRunner.from_pretrained(
        str(model_dir), dtype=dtype, device=device, batch_size=batch_size, chat_template=chat
    )


def release_runner(runner: Any) -> None:
    """Frees a model's memory before the next one loads (vLLM's engine needs an explicit close)."""
    import gc

    import torch

    close = getattr(runner, "close", None)
    if close is not None:
        close()
    if hasattr(runner, "model"):
        runner.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def open_answer_tokens(runner_or_length: Any) -> int:
    length = runner_or_length if isinstance(runner_or_length, int) else runner_or_length.max_length
    return max(16, min(512, length // 2))


def judge_dtype(judge: Judge, job_dtype: str) -> str:
    own = str(judge.model.dtype) if judge.model is not None else "auto"
    return own if own != "auto" else job_dtype


def _local_judge_path(judge: Judge, local_dir: str | Path | None) -> str | Path:
    assert judge.model is not None  # the API rule: exactly one of model and endpoint
    path = local_dir or (judge.model.uri if (judge.model.uri or "").startswith("/") else None)
    if path is None:
        where = judge.model.uri or f"fromJob {judge.model.from_job.name}"  # type: ignore[union-attr]
        raise ValueError(
            f"judge model {where} is not a local folder: the runtime must put it at run.inputs['judge'] "
            "(dhad eval: pass --judge-model DIR)"
        )
    return path


def make_judge(judge: Judge, local_dir: str | Path | None = None, *, batch_size: int = 8,
               device: str = "cpu", dtype: str = "auto") -> Any:
    """The RLAIF judge (`dhad_trainer.llm.judges`) for the spec; its `judge_many()` is the pairwise judge."""
    from dhad_trainer.llm.judges import EndpointJudge, ModelJudge, endpoint_config

    common: dict[str, Any] = dict(
        constitution=EVAL_CRITERIA,
        language="ar",
        max_new_tokens=judge.max_new_tokens,
        max_attempts=judge.max_attempts,
    )
    if judge.endpoint is not None:
        return EndpointJudge(endpoint_config(judge.endpoint), **common)
    return ModelJudge(_local_judge_path(judge, local_dir), batch_size=batch_size, device=device,
                      dtype=judge_dtype(judge, dtype), **common)


def make_judges(judge: Judge, metrics: list[str], local_dir: str | Path | None = None, *, batch_size: int = 8,
                device: str = "cpu", dtype: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """(pairwise judge, scoring judge) for the metrics asked for; a local judge's weights load once."""
    from dhad_trainer.evaluation.judging import EndpointScoreJudge, LocalScoreJudge
    from dhad_trainer.evaluation.runner import HFModelRunner
    from dhad_trainer.llm.judges import endpoint_config

    pairwise = make_judge(judge, local_dir, batch_size=batch_size, device=device, dtype=dtype) \
        if PAIRWISE in metrics else None
    scores = None
    if SCORES in metrics:
        kw = dict(max_new_tokens=judge.max_new_tokens, max_attempts=judge.max_attempts, seed=seed)
        if judge.endpoint is not None:
            scores = EndpointScoreJudge(endpoint_config(judge.endpoint), **kw)
        else:
            path = _local_judge_path(judge, local_dir)
            if pairwise is not None:  # share the weights ModelJudge loaded
                runner = HFModelRunner(pairwise.model, pairwise.tokenizer, batch_size=batch_size)
            else:
                runner = HFModelRunner.from_pretrained(str(path), dtype=judge_dtype(judge, dtype), device=device,
                                                       batch_size=batch_size)
            scores = LocalScoreJudge(runner, Path(path).name, **kw)
    return pairwise, scores


def settings_for(ev: Evaluation, max_new_tokens_open: int = 512) -> EvalSettings:
    return EvalSettings(
        source=ev.benchmarks or "hf://",
        suites=tuple(s.value for s in ev.suites),
        methods=(ev.method.value,),
        base_model=ev.shots > 0,
        k_shot=ev.shots,
        limit=ev.limit,
        limit_per=str(ev.limit_per),  # type: ignore[arg-type]
        seed=ev.seed,
        duplicates="all" if ev.exclude_duplicates else "none",
        max_new_tokens_open=max_new_tokens_open,
        runs=ev.runs,
        open_metrics=tuple(str(m) for m in ev.open_ended_metrics),
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
    compare_dirs: Mapping[str, str | Path] | None = None,
) -> dict[str, float]:
    """Evaluate the model (and `ev.compare`'s, found in `compare_dirs` by name) as `ev` says; returns the
    headline scores ("<suite>/<method>", "<name>:<suite>/<method>" for compared models)."""
    import torch

    from dhad_trainer.evaluation.references import fetch_references

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")  # the judge goes where the models go
    dirs = {model_name or Path(model_dir).name: (Path(model_dir), dtype)}
    for compared in ev.compare:
        where = (compare_dirs or {}).get(compared.name) or (
            compared.model.uri if (compared.model.uri or "").startswith("/") else None)
        if where is None:
            raise ValueError(f"evaluation.compare {compared.name}: its model is not a local folder (the runtime "
                             f"puts it at run.inputs['compare-{compared.name}']; dhad eval: --model NAME=DIR)")
        own = str(compared.model.dtype)
        dirs[compared.name] = (Path(where), own if own != "auto" else dtype)
    open_suites = [s.value for s in ev.suites if s.value in OPEN_SUITES]
    references, judge, score_judge = None, None, None
    if open_suites:
        if ev.reference_answers is None or ev.judge is None:
            raise ValueError("open-ended suites (vicuna-80, alpaca-eval) need judge and referenceAnswers")
        paths = fetch_references(
            ev.reference_answers, open_suites, store=store, cache=Path(work_dir) / "references"
        )
        references = {suite: load_references(p) for suite, p in paths.items()}
        judge, score_judge = make_judges(ev.judge, [str(m) for m in ev.open_ended_metrics], judge_dir,
                                         batch_size=ev.batch_size, device=device, dtype=dtype,
                                         seed=ev.seed)
    backend, described = generation_backend(ev.use_vllm, device)
    shortest = min(context_length(d) for d, _ in dirs.values())
    settings = settings_for(ev, max_new_tokens_open or open_answer_tokens(shortest))
    log.info("evaluating %s on %s (%s, %s)", ", ".join(dirs), ", ".join(settings.suites), ev.method.value, described)

    def factory(path: Path, model_dtype: str):
        return lambda: load_runner(path, shots=ev.shots, batch_size=ev.batch_size, device=device,
                                   dtype=model_dtype, backend=backend)

    return run_eval(
        settings,
        {name: factory(path, d) for name, (path, d) in dirs.items()},
        report_dir,
        judge=judge,
        score_judge=score_judge,
        references=references,
        store=store,
        release=release_runner,
        backends=dict.fromkeys(dirs, described),
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
        compare_dirs={c.name: run.inputs[f"compare-{c.name}"] for c in spec.evaluation.compare
                      if f"compare-{c.name}" in run.inputs},
    )
    if len(scores) > STATUS_SCORES:
        log.info("status keeps %d of %d scores (the job's model first); the report has all", STATUS_SCORES, len(scores))
        scores = dict(list(scores.items())[:STATUS_SCORES])
    return StageResult(metrics={"scores": scores, "report": SUMMARY})
