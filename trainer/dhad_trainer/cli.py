"""`dhad`: the command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def load_manifest(path: Path) -> dict:
    """One manifest (YAML or JSON); a clear error names the file when it is not a Dhad job."""
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as error:
        raise SystemExit(f"dhad: cannot read manifest {path}: {error}") from None
    if not isinstance(doc, dict) or "kind" not in doc or "spec" not in doc:
        raise SystemExit(f"dhad: {path} is not a Dhad job manifest (expected kind and spec)")
    return doc


@command("init-model")
def init_model(args: argparse.Namespace) -> int:
    from dhad_trainer.local.tiny import init_tiny_model

    out = init_tiny_model(args.output, kind=args.kind, seed=args.seed)
    print(f"tiny {args.kind} model written to {out}")
    return 0


@command("prepare")
def prepare_data(args: argparse.Namespace) -> int:
    from dhad_api.jobs import PretrainJobSpec, parse_spec
    from dhad_trainer.data.prepare import prepare
    from dhad_trainer.storage.routing import RoutingStore, open_store

    doc = load_manifest(args.file)
    spec = parse_spec(doc["kind"], doc["spec"])
    if not isinstance(spec, PretrainJobSpec):
        raise SystemExit(f"dhad prepare: {args.file} is a {doc['kind']}, expected a PretrainJob")
    data = spec.data
    if args.source:
        data = data.model_copy(update={"sources": [s.model_copy(update={"uri": args.source}) for s in data.sources]})
    output = str(args.output)
    stats = prepare(data, Path(args.tokenizer), output, store=open_store(output, spec.storage),
                    data_store=RoutingStore(spec.storage), index=args.index, workers=args.workers or data.workers)
    if stats is not None:
        print(json.dumps({k: v for k, v in stats.items() if k != "shards"}, indent=2, ensure_ascii=False))
    return 0


@command("crds")
def write_crds(args: argparse.Namespace) -> int:
    from dhad_api import crd

    return crd.main(["crd", args.output] if args.output else ["crd"])


def _models(values: list[str]) -> tuple[str, dict[str, str]]:
    """--model DIR [--model NAME=DIR ...]: the first is the model evaluated, the others compared with it."""
    first, *others = values
    compare = {}
    for value in others:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = Path(value).name.lower(), value
        compare[name] = str(Path(path).resolve())
    return first.partition("=")[2] or first, compare


@command("eval")
def evaluate(args: argparse.Namespace) -> int:
    if args.eval_command == "score":
        return score_outputs(args)
    from pydantic import ValidationError

    from dhad_api.stages import Evaluation
    from dhad_trainer.stages.eval import evaluate as run_evaluation

    if not args.model:
        raise SystemExit("dhad eval: --model is required (or use dhad eval score)")
    settings: dict = {}
    if args.file:
        doc = load_manifest(args.file)
        if doc["kind"] != "EvalJob":
            raise SystemExit(f"dhad eval: {args.file} is a {doc['kind']}, expected an EvalJob")
        settings = dict(doc["spec"].get("evaluation") or {})
    model, compare = _models(args.model)
    overrides = {
        "suites": args.suites.split(",") if args.suites else None,
        "method": args.method,
        "shots": args.shots,
        "limit": args.limit,
        "limitPer": args.limit_per,
        "seed": args.seed,
        "runs": args.runs,
        "batchSize": args.batch_size,
        "benchmarks": args.benchmarks,
        "referenceAnswers": args.references,
        "excludeDuplicates": True if args.exclude_duplicates else None,
        "useVllm": True if args.use_vllm else None,
        "compare": [{"name": n, "model": {"uri": p}} for n, p in compare.items()] or None,
    }
    settings.update({k: v for k, v in overrides.items() if v is not None})
    settings.setdefault("suites", ["acva", "arabic-mmlu", "exams"])
    if args.judge_model:  # keeps maxNewTokens / maxAttempts from the manifest
        kept = {k: v for k, v in (settings.get("judge") or {}).items() if k not in ("model", "endpoint")}
        settings["judge"] = {**kept, "model": {"uri": str(Path(args.judge_model).resolve())}}
    try:
        ev = Evaluation.model_validate(settings)
        scores = run_evaluation(
            ev,
            model,
            args.output / "report",
            work_dir=args.output / "work",
            max_new_tokens_open=args.max_new_tokens,
            compare_dirs=compare,
            model_name=Path(model).name,
        )
    except (ValidationError, ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dhad eval: {error}") from None
    width = max((len(k) for k in scores), default=0)
    for key, value in scores.items():
        print(f"{key:<{width}}  {value:.4f}")
    print(f"report: {args.output / 'report' / 'summary.md'}")
    return 0


def score_outputs(args: argparse.Namespace) -> int:
    """`dhad eval score`: another harness's outputs, parsed and scored with Dhad's rules."""
    from dhad_trainer.evaluation.external import score_outputs as score
    from dhad_trainer.evaluation.report import write_report

    try:
        result = score(args.suite, args.outputs, args.benchmarks)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"dhad eval score: {error}") from None
    m, o = result.metrics, result.metrics["outputs"]
    report = args.output / "report"
    write_report({args.outputs.stem: [result]}, report)
    (report / "disagreements.jsonl").write_text(
        "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in o["disagreements"]), encoding="utf-8"
    )
    ci = m.get("ci95") or [0.0, 0.0]
    print(f"{args.suite}: {m['headline_metric']} {m['headline']:.4f} [{ci[0]:.4f}, {ci[1]:.4f}] on {o['scored']} items "
          f"({o['missing']} without a record; skipped: {o['skipped'] or 'none'})")
    reasons = ", ".join(f"{k} {v}" for k, v in m["unparsed_reasons"].items()) or "none"
    print(f"unparseable: {m['unparsed']} ({reasons})")
    if o["with_their_prediction"]:
        theirs = o["their_accuracy"]
        print(f"their parser: agrees on {o['agree']} of {o['with_their_prediction']}, accuracy by their labels "
              f"{theirs:.4f}; disagreements: {report / 'disagreements.jsonl'}")
    print(f"report: {report / 'summary.md'}")
    return 0


@command("duplicates")
def duplicates(args: argparse.Namespace) -> int:
    from dhad_trainer.evaluation.duplicates import find_duplicates
    from dhad_trainer.evaluation.loaders import load_suite

    items = load_suite(args.suite, args.benchmarks, args.split)
    s = find_duplicates(items, threshold=args.threshold, ngram=args.ngram).summary(top=args.top)
    print(f"{args.suite} ({args.split}): {s['n_items']} items")
    print(
        f"exact duplicates: {s['items_in_exact_groups']} items in {s['exact_groups']} groups "
        f"(largest {s['largest_exact_group']}, {s['exact_redundant']} redundant copies)"
    )
    print(
        f"with near duplicates: {s['items_in_groups']} items in {s['groups']} groups "
        f"({s['near_groups']} near groups holding {s['items_in_near_groups']} items)"
    )
    print(f"groups with conflicting answers: {s['groups_with_conflicting_answers']}")
    print(f"rule: {s['rule']}")
    for g in s["top_groups"]:
        print(f"  {g['kind']:<5} {g['size']:>4} items, {g['answers']} answers: {g['example'][:80]}")
    return 0


def _manifest_lookup(paths: list[Path]):
    """fromJob -> the referenced manifest's spec: the given files first, then their folders' other manifests."""
    docs: dict[tuple[str, str], dict] = {}
    for folder in {p.resolve().parent for p in paths}:
        for other in sorted(folder.glob("*.y*ml")):
            try:
                doc = yaml.safe_load(other.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(doc, dict) and "kind" in doc and "spec" in doc:
                docs.setdefault((doc["kind"], doc["metadata"]["name"]), doc["spec"])
    for path in paths:
        doc = load_manifest(path)
        docs[(doc["kind"], doc["metadata"]["name"])] = doc["spec"]
    return lambda kind, name: docs.get((kind, name))


def format_plan(plan, verdict) -> str:
    from dhad_api.plan import gib

    lines = [f"model {plan.architecture.name}: {plan.architecture.parameters / 1e9:.2f} B parameters; "
             f"GPU {plan.gpu.name + ' ' + gib(plan.gpu.memory) if plan.gpu else 'unknown'}; MFU {plan.mfu:.0%}"]
    for stage in plan.stages:
        lines.append(f"  {stage.stage}: {stage.strategy}, {stage.processes} process(es): {gib(stage.total)} per GPU")
        for name, value in stage.components:
            lines.append(f"    {name:<64} {gib(value):>10}")
        if stage.cpu_per_node:
            lines.append(f"    {'CPU memory per node (offload)':<64} {gib(stage.cpu_per_node):>10}")
        if stage.tokens_per_step:
            when = f", {stage.step_seconds:.1f} s per step" if stage.step_seconds else ""
            lines.append(f"    tokens per optimizer step {stage.tokens_per_step:,}{when}")
        lines += [f"    note: {n}" for n in stage.notes]
    lines.append(f"Planned={verdict.status} ({verdict.reason}): {verdict.message}")
    return "\n".join(lines)


@command("plan")
def plan_memory(args: argparse.Namespace) -> int:
    from dhad_api.jobs import parse_spec
    from dhad_api.plan import Architecture, planned_condition

    doc = load_manifest(args.file)
    spec = parse_spec(doc["kind"], doc["spec"])
    if args.gpu_memory:
        spec = spec.model_copy(update={"plan": spec.plan.model_copy(update={"gpu_memory": args.gpu_memory})})
    arch = None
    if args.model_config:
        arch = Architecture.from_config(json.loads(Path(args.model_config).read_text()), Path(args.model_config).parent.name)
    verdict = planned_condition(doc["kind"], spec, lookup=_manifest_lookup([args.file]), mfu=args.mfu, architecture=arch)
    if verdict.plan is None:
        print(f"Planned={verdict.status} ({verdict.reason}): {verdict.message}")
        return 1
    print(format_plan(verdict.plan, verdict))
    return 0 if verdict.status != "False" else 2


@command("eval-references")
def eval_references(args: argparse.Namespace) -> int:
    from dhad_trainer.evaluation.references import write_references
    from dhad_trainer.stages.eval import load_runner, open_answer_tokens

    runner = load_runner(args.model, batch_size=args.batch_size)
    written = write_references(
        runner,
        args.benchmarks,
        args.output,
        suites=args.suites.split(","),
        limit=args.limit,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens or open_answer_tokens(runner),
        model=Path(args.model).name,
    )
    for suite, path in written.items():
        print(f"{suite}: {path}")
    return 0


def _eval_parsers(sub) -> None:
    p = sub.add_parser("eval", help="evaluate models on the AceGPT Arabic suites and write a report; "
                                    "'dhad eval score' scores outputs made elsewhere")
    p.add_argument("-f", "--file", type=Path, help="EvalJob manifest: its spec.evaluation, overridden by flags")
    p.add_argument("--model", action="append", help="model folder; repeat as NAME=DIR to compare models side by side")
    p.add_argument("--suites", help="comma-separated: acva,arabic-mmlu,exams,vicuna-80,alpaca-eval")
    p.add_argument("--method", choices=["generate", "loglikelihood"])
    p.add_argument("--shots", type=int, help="dev examples per MC prompt (ACVA stays zero-shot)")
    p.add_argument("--limit", type=int, help="items per suite: a seeded sample stratified by subject")
    p.add_argument("--limit-per", choices=["total", "subject"], help="total (proportional) or subject (equal counts)")
    p.add_argument("--seed", type=int, help="the sample's and the intervals' seed")
    p.add_argument("--runs", type=int, help="judge-scores runs (AceGPT: 3)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--benchmarks", help="folder, s3:// prefix or hf:// with the benchmark files")
    p.add_argument("--references", help="folder of <suite>.jsonl reference answers (open-ended suites)")
    p.add_argument("--judge-model", help="local judge model folder (open-ended suites)")
    p.add_argument("--max-new-tokens", type=int, help="open-ended answer length; default min(512, context/2)")
    p.add_argument("--exclude-duplicates", action="store_true", help="also score without duplicate questions")
    p.add_argument("--use-vllm", action="store_true", help="generate with vLLM (GPU, when installed)")
    p.add_argument("--output", type=Path, default=Path("out/eval"))
    verbs = p.add_subparsers(dest="eval_command")
    s = verbs.add_parser("score", help="score model outputs produced elsewhere with Dhad's parsing and metrics")
    s.add_argument("--suite", required=True, choices=["acva", "arabic-mmlu", "exams"])
    s.add_argument("--outputs", required=True, type=Path, help='jsonl: {"id", "response"[, "prediction"]} per item')
    s.add_argument("--benchmarks", required=True, help="folder with the benchmark files")
    s.add_argument("--output", type=Path, default=Path("out/eval-score"))
    p = sub.add_parser("duplicates", help="count exact and near-duplicate questions in a suite")
    p.add_argument("--suite", required=True)
    p.add_argument("--benchmarks", required=True)
    p.add_argument("--split", choices=["test", "dev"], default="test")
    p.add_argument("--threshold", type=float, default=0.8, help="near: character n-gram Jaccard at least this")
    p.add_argument("--ngram", type=int, default=5)
    p.add_argument("--top", type=int, default=5, help="largest groups to show")
    p = sub.add_parser("eval-references", help="answer the open-ended suites with a model (a reference system)")
    p.add_argument("--model", required=True)
    p.add_argument("--benchmarks", required=True)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--suites", default="vicuna-80,alpaca-eval")
    p.add_argument("--limit", type=int, help="answer the sample an evaluation with this limit and --seed draws")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int)


class _Version(argparse.Action):
    """`dhad --version`: the package version and the code commit, computed only when asked."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the dhad version and commit, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from dhad_trainer.local.versions import version_line

        print(version_line())
        parser.exit()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dhad", description="Localize LLMs to Arabic: pre-train, SFT, RLAIF, evaluate.")
    top.add_argument("--version", action=_Version)
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env", help="versions of dhad, torch, transformers, TRL, DeepSpeed, CUDA and the accelerator seen (for bug reports)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of aligned lines")
    p = sub.add_parser("init-model", help="write a tiny random Llama + Arabic BPE tokenizer (tests and demo)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--kind", choices=["causal-lm", "reward"], default="causal-lm")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="run a PretrainJob's data pipeline locally")
    p.add_argument("-f", "--file", required=True, type=Path, help="PretrainJob manifest")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the prepared dataset")
    p.add_argument("--source", help="override every source URI (for example a local copy)")
    p.add_argument("--workers", type=int, default=0, help="workers sharing the output (default data.workers)")
    p.add_argument("--index", type=int, default=0, help="this worker's index; worker 0 writes the manifest")
    p = sub.add_parser("crds", help="write the CRDs generated from the API models")
    p.add_argument("--output", default=None)
    _eval_parsers(sub)
    p = sub.add_parser("run", help="local mode: run manifests on this machine through the trainer's own code path")
    p.add_argument("-f", "--file", action="append", required=True, type=Path, help="manifest (repeat to chain jobs)")
    p.add_argument("--workdir", type=Path, default=Path("out/run"))
    p.add_argument("--store", choices=["embedded", "env"], default="embedded",
                   help="embedded: start a SeaweedFS S3 server for the run; env: use AWS_* from the environment")
    p.add_argument("--put", action="append", default=[], metavar="LOCAL=s3://bucket/key",
                   help="upload a local file or folder into the store before running")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field in every manifest, e.g. --set resources.gpusPerNode=0 --set "
                        "training.maxSteps=5 (VALUE is YAML; null removes the field; list items by index: data.0.uri)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="where each job's final model, report and TensorBoard events are downloaded when it ends "
                        "(default ./dhad-output/<job>; with several manifests, DIR/<job>)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no streamed stage logs")
    p = sub.add_parser("plan", help="per-GPU memory, tokens per step and time per step of a manifest, as the operator checks it")
    p.add_argument("-f", "--file", required=True, type=Path, help="job manifest (fromJob is read from manifests beside it)")
    p.add_argument("--gpu-memory", help="one GPU's memory, for example 80Gi (default: plan.gpuMemory or the nodeSelector's product)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation the time estimate assumes (default 0.4)")
    p.add_argument("--model-config", help="a config.json for a model whose architecture Dhad does not know")
    p = sub.add_parser("demo", help="the Dhad recipe on tiny models, on this machine")
    p.add_argument("--workdir", type=Path, default=Path("out/demo"))
    return top


@command("run")
def run_manifests(args: argparse.Namespace) -> int:
    """Local mode: each manifest in order, fromJob resolved from the ones before it."""
    from pydantic import ValidationError

    from dhad_api.jobs import parse_spec
    from dhad_api.layout import split_s3
    from dhad_trainer.local.run import LocalRunError, Session, apply_overrides, download_outputs, run_job

    say = (lambda *a, **k: None) if args.quiet else print
    workdir = Path(args.workdir).resolve()
    embedded = None
    env: dict[str, str] = {}
    try:
        docs = [apply_overrides(load_manifest(path), args.overrides) for path in args.file]
        for doc in docs:  # before anything starts: a bad --set fails in a second, naming the field
            parse_spec(doc["kind"], doc["spec"])
        if args.store == "embedded":
            from dhad_trainer.storage.embedded_s3 import EmbeddedS3
            from dhad_trainer.storage.routing import open_store

            embedded = EmbeddedS3(workdir / "s3").start()
            env = embedded.env()
            os.environ.update(env)
            for bucket in {doc["spec"]["storage"]["bucket"] for doc in docs} | {split_s3(p.partition("=")[2])[0] for p in args.put}:
                embedded.ensure_bucket(bucket)
            say(f"embedded S3 at {embedded.url} (data in {workdir / 's3'})")
        for item in args.put:
            from dhad_trainer.storage.routing import open_store

            source, _, target = item.partition("=")
            store = open_store(target)
            (store.upload_dir(source, target) if Path(source).is_dir() else store.upload_file(Path(source), target))
        session = Session(workdir, env, show_progress=not args.quiet)
        for doc in docs:
            name = doc["metadata"]["name"]
            say(f"== {doc['kind']} {name}", flush=True)
            status = run_job(doc, session)
            dest = (args.output / name if len(docs) > 1 else args.output) if args.output else Path("dhad-output") / name
            written = download_outputs(status, doc["kind"], dest)
            print(json.dumps({**status, "downloaded": written}, indent=2, ensure_ascii=False))
    except ValidationError as error:
        first = error.errors()[0]
        print(f"dhad run: invalid spec: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}", file=sys.stderr)
        return 2
    except LocalRunError as error:
        print(f"dhad run: {error}", file=sys.stderr)
        return 1
    finally:
        if embedded:
            embedded.stop()
    return 0


@command("env")
def environment(args: argparse.Namespace) -> int:
    from dhad_trainer.local.versions import environment_report

    report = environment_report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {value}")
    return 0


@command("demo")
def demo(args: argparse.Namespace) -> int:
    from dhad_trainer.local.demo import run_demo

    return run_demo(args.workdir)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
