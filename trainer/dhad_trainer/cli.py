"""`dhad`: the command line. Each subcommand is a thin wrapper over a library function."""

from __future__ import annotations

import argparse
import json
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
    from dhad_trainer.tiny import init_tiny_model

    out = init_tiny_model(args.output, kind=args.kind, seed=args.seed)
    print(f"tiny {args.kind} model written to {out}")
    return 0


@command("prepare")
def prepare_data(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from dhad_api.jobs import PretrainJobSpec, parse_spec
    from dhad_trainer.data.prepare import prepare

    doc = load_manifest(args.file)
    spec = parse_spec(doc["kind"], doc["spec"])
    if not isinstance(spec, PretrainJobSpec):
        raise SystemExit(f"dhad prepare: {args.file} is a {doc['kind']}, expected a PretrainJob")
    data = spec.data
    if args.source:
        data = data.model_copy(update={"sources": [s.model_copy(update={"uri": args.source}) for s in data.sources]})
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    stats = prepare(data, tokenizer, Path(args.output))
    print(json.dumps(stats, indent=2, ensure_ascii=False))
    return 0


@command("crds")
def write_crds(args: argparse.Namespace) -> int:
    from dhad_api import crd

    return crd.main(["crd", args.output] if args.output else ["crd"])


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dhad", description="Localize LLMs to Arabic: pre-train, SFT, RLAIF, evaluate.")
    sub = top.add_subparsers(dest="command", required=True)
    p = sub.add_parser("init-model", help="write a tiny random Llama + Arabic BPE tokenizer (tests and demo)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--kind", choices=["causal-lm", "reward"], default="causal-lm")
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="run a PretrainJob's data pipeline locally")
    p.add_argument("-f", "--file", required=True, type=Path, help="PretrainJob manifest")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--source", help="override every source URI (for example a local copy)")
    p = sub.add_parser("crds", help="write the CRDs generated from the API models")
    p.add_argument("--output", default=None)
    p = sub.add_parser("demo", help="the Dhad recipe on tiny models, on this machine")
    p.add_argument("--workdir", type=Path, default=Path("out/demo"))
    return top


@command("demo")
def demo(args: argparse.Namespace) -> int:
    from dhad_trainer.demo import run_demo

    return run_demo(args.workdir)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
