"""Responses per second of the respond stage against the scripted OpenAI server (fixed latency).

The teacher's latency, not our code, should bound throughput: at concurrency c the stage should
approach c / latency. Runs the whole stage (reading, journaling, gates, shards), not just the client.

    .venv/bin/python bench/respond_concurrency.py [--latency 0.2] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dhad_api.jobs import SFTJobSpec  # noqa: E402
from dhad_trainer.stages.base import StageRun  # noqa: E402
from dhad_trainer.stages.respond import respond  # noqa: E402
from tests.support.openai_server import OpenAIServer, Reply, prompt_of  # noqa: E402


def answer(body, attempt):
    return Reply(content=f"جواب مفصل عن الطلب {abs(hash(prompt_of(body)))} يشرح الفكرة بوضوح وبأمثلة.")


def measure(concurrency: int, latency: float, prompts: int) -> tuple[float, dict]:
    with tempfile.TemporaryDirectory() as tmp, OpenAIServer("sk-bench", script=answer, latency_s=latency) as srv:
        src = Path(tmp) / "prompts.jsonl"
        src.write_text("".join(json.dumps({"prompt": f"سؤال رقم {i} عن الحياة"}, ensure_ascii=False) + "\n"
                               for i in range(prompts)))
        spec = SFTJobSpec.model_validate({"model": {"uri": "/m"}, "storage": {"bucket": "dhad"}, "respond": {
            "prompts": [{"uri": str(src), "schema": "prompt-completion"}],
            "teacher": {"endpoint": {"baseUrl": srv.base_url, "model": "bench", "maxConcurrency": concurrency,
                                     "apiKeySecretRef": {"name": "k", "key": "k"}}}}})
        run = StageRun(spec=spec, stage="respond", model_dir=Path(tmp), work_dir=Path(tmp),
                       output_dir=Path(tmp) / "out")
        started = time.perf_counter()
        stats = respond(run)
        elapsed = time.perf_counter() - started
        assert stats["responses"] == prompts and srv.peak_in_flight <= concurrency, (stats, srv.peak_in_flight)
        return stats["responses"] / elapsed, {"peak_in_flight": srv.peak_in_flight, "seconds": round(elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=4.0, help="target duration per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["DHAD_TEACHER_API_KEY"] = "sk-bench"
    rates = {}
    for c in args.concurrency:
        prompts = max(c, round(args.seconds * c / args.latency))
        rate, info = measure(c, args.latency, prompts)
        rates[c] = rate
        print(f"concurrency {c:>3}: {prompts:>4} responses, {rate:7.1f} responses/s "
              f"(ideal {c / args.latency:.1f}), {info}")
    lo, hi = min(args.concurrency), max(args.concurrency)
    print(f"speed-up {hi} vs {lo}: {rates[hi] / rates[lo]:.1f}x (ideal {hi / lo:.0f}x)")


if __name__ == "__main__":
    main()
