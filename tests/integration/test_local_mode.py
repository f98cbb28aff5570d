"""Local mode: `dhad run -f` runs an SFTJob with a respond sub-stage on this machine: a teacher (the
OpenAI-compatible test server) answers the project's Arabic prompts, then SFT trains on the answers,
through the same launcher, torchrun and stages as a cluster pod, against an embedded S3 server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from dhad_trainer.data.chat import ASSETS
from dhad_trainer.local.tiny import init_tiny_model
from tests.conftest import ACEGPT
from tests.integration.jobs import REPO
from tests.support.openai_server import OpenAIServer, Reply

pytestmark = [pytest.mark.s3, pytest.mark.torchrun]


def test_dhad_run_trains_on_teacher_answers(tmp_path):
    prompts = [json.loads(line)["prompt"] for line in (ASSETS / "arabic_prompts.jsonl").read_text().splitlines()[:6]]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in prompts))
    model = init_tiny_model(tmp_path / "tiny-base")
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "sft.yaml").read_text())
    def answer(body, attempt):
        question = body["messages"][-1]["content"]
        return Reply(content=f"الجواب المختصر عن سؤالك ذي الكلمات {len(question.split())}: المعرفة نور والعلم يرفع صاحبه.")

    with OpenAIServer("sk-local-test", script=answer) as teacher:
        doc["spec"].update(
            model={"uri": "s3://dhad-demo/models/tiny-base"}, data=[],
            resources={"nodes": 1, "gpusPerNode": 0},
            respond={"prompts": [{"uri": "s3://dhad-demo/data/prompts.jsonl", "schema": "prompt-completion"}],
                     "teacher": {"endpoint": {"baseUrl": teacher.base_url, "model": "teacher",
                                              "apiKeySecretRef": {"name": "teacher", "key": "key"}}},
                     "quality": {"minArabicRatio": 0.0}},
        )
        doc["spec"]["training"].update(maxSteps=4, packing=False)
        manifest = tmp_path / "sft.yaml"
        manifest.write_text(yaml.safe_dump(doc, allow_unicode=True))
        env = {**os.environ, "DHAD_TEACHER_API_KEY": "sk-local-test", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "dhad_trainer.cli", "run", "-f", str(manifest), "--workdir", str(tmp_path / "run"),
             "-o", str(tmp_path / "out"), "--put", f"{model}=s3://dhad-demo/models/tiny-base", "--put", f"{tmp_path / 'prompts.jsonl'}=s3://dhad-demo/data/prompts.jsonl"],
            env=env, capture_output=True, text=True, timeout=600)
        answered = dict(teacher.counts)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert '"state": "Succeeded"' in done.stdout and "/sft/model" in done.stdout
    assert len(answered) == len(prompts) and all(count == 1 for count in answered.values()), answered
    logs = (tmp_path / "run" / "jobs" / "sftjob-tiny-sft")
    assert "respond" in (logs / "respond-1-0.log").read_text() and (logs / "sft-1-0.log").exists()


@pytest.mark.benchmarks
def test_dhad_run_evaluates_a_model_beside_a_compared_one(tmp_path):
    """An EvalJob with evaluation.compare: the runtime downloads both models, the stage scores them on the
    same sample, and the status carries both models' scores ("base:" for the compared one)."""
    bench = ACEGPT / "EXAMS_Arabic"
    aligned, base = init_tiny_model(tmp_path / "aligned"), init_tiny_model(tmp_path / "base", seed=1)
    doc = yaml.safe_load((REPO / "examples" / "tiny" / "eval.yaml").read_text())
    doc["spec"]["model"] = {"uri": "s3://dhad-demo/models/aligned"}
    for field in ("judge", "referenceAnswers"):  # MC only: no judge (and no job it comes from) to wait for
        doc["spec"]["evaluation"].pop(field)
    doc["spec"]["evaluation"].update(suites=["exams"], limit=12, compare=[{"name": "base", "model": {"uri": "s3://dhad-demo/models/base"}}])
    manifest = tmp_path / "eval.yaml"
    manifest.write_text(yaml.safe_dump(doc, allow_unicode=True))
    puts = [f"{aligned}=s3://dhad-demo/models/aligned", f"{base}=s3://dhad-demo/models/base",
            f"{bench}=s3://dhad-demo/benchmarks/acegpt/EXAMS_Arabic"]
    done = subprocess.run(
        [sys.executable, "-m", "dhad_trainer.cli", "run", "-f", str(manifest), "--workdir", str(tmp_path / "run"),
         "-o", str(tmp_path / "out"), *[arg for put in puts for arg in ("--put", put)]],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = json.loads(done.stdout[re.search(r"^\{$(?![\s\S]*^\{$)", done.stdout, re.M).start():])  # the last, pretty-printed document
    assert status["state"] == "Succeeded"
    logs = tmp_path / "run" / "jobs" / "evaljob-tiny-eval"
    final = json.loads((logs / "eval-progress.jsonl").read_text(encoding="utf-8").splitlines()[-1])
    assert set(final["scores"]) == {"exams/loglikelihood", "base:exams/loglikelihood"}  # what status.scores gets
    log = (logs / "eval-1-0.log").read_text()
    assert "evaluating s3://dhad-demo/models/aligned, base on exams" in log
