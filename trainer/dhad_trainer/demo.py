"""The demo: the Dhad recipe on tiny models, end to end on this machine, with the real code paths."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from dhad_api.jobs import parse_spec

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "examples" / "tiny"


def step(title: str):
    print(f"\n== {title}", flush=True)
    return time.monotonic()


def run_demo(workdir: Path) -> int:
    from transformers import AutoTokenizer

    from dhad_trainer.data.prepare import prepare
    from dhad_trainer.tiny import DEFAULT_CORPUS, init_tiny_model

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = step("1. tiny base model: random Llama + byte-level BPE trained on the project's Arabic text")
    base = init_tiny_model(workdir / "models" / "tiny-base")
    print(f"   {base} ({time.monotonic() - started:.1f} s)")

    started = step("2. prepare Arabic data (normalize, filter, dedup, decontaminate, pack) from examples/tiny/pretrain.yaml")
    doc = yaml.safe_load((TINY / "pretrain.yaml").read_text())
    spec = parse_spec(doc["kind"], doc["spec"])
    data = spec.data.model_copy(update={"sources": [spec.data.sources[0].model_copy(update={"uri": str(DEFAULT_CORPUS)})]})
    stats = prepare(data, AutoTokenizer.from_pretrained(base), workdir / "data" / "pretrain")
    print("   " + json.dumps({k: stats[k] for k in ("documents_in", "kept", "tokens", "blocks")}, ensure_ascii=False))
    print(f"   ({time.monotonic() - started:.1f} s)")
    print(f"\nDemo outputs are under {workdir}")
    return 0
