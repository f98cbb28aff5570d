"""Local mode runs the recipe as one Pipeline: `dhad demo` (what `make demo` runs) seeds the embedded store
and runs examples/tiny/pipeline.yaml end to end (pretrain -> gated SFT -> gated RLAIF -> eval, real
torchrun); `dhad run -f` of the same file afterwards reuses every stage; a changed stage runs again alone;
a gate set above the model's score fails the pipeline at once from cached scores and promotes nothing;
`dhad lineage` prints the output model's chain back to the base model, with the gates' scores."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dhad_trainer.storage.embedded_s3 import EmbeddedS3

pytestmark = [pytest.mark.s3, pytest.mark.torchrun]
REPO = Path(__file__).resolve().parents[2]
PIPELINE = REPO / "examples" / "tiny" / "pipeline.yaml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def cli(*args, timeout=1500, env=ENV) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dhad_trainer.cli", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def status_of(done: subprocess.CompletedProcess) -> dict:
    """The last, pretty-printed document of `dhad run`'s stdout: the pipeline's status."""
    out = done.stdout
    return json.loads(out[re.search(r"^\{$(?![\s\S]*^\{$)", out, re.M).start():])


def job_folders(workdir: Path) -> set[str]:
    return {p.name for p in (workdir / "jobs").iterdir()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    done = cli("demo", "--workdir", workdir, timeout=2400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return workdir, done.stdout


def test_the_demo_runs_the_recipe_as_one_pipeline_in_order(demo):
    workdir, out = demo
    assert "pipeline Succeeded" in out
    lines = [line for line in out.splitlines() if line.startswith("== stage ")]
    assert [" ".join(line.split()[2:-2]) for line in lines] == [
        "pretrain:", "sft:", "sft gate:", "rlaif:", "rlaif gate:", "rlaif gate baseline (the stage's input model):", "eval:"]
    folders = job_folders(workdir)
    assert len(folders) == 7 and sum(f.startswith("evaljob-tiny-recipe-") for f in folders) == 4
    assert len(list((workdir / "pipeline-cache").glob("*.json"))) == 7
    model = workdir / "final" / "model"
    chain = json.loads((model / "lineage.json").read_text())["chain"]
    assert [e.get("pipelineStage") for e in chain] == [None, "pretrain", "sft", "rlaif"] and chain[0]["root"]
    assert chain[0]["model"] == "s3://dhad-demo/models/tiny-base"
    assert all(e["pipeline"] == "local/tiny-recipe" and len(e["specHash"]) == 64 for e in chain[1:])
    (sft_gate,) = chain[2]["evaluations"]  # recorded beside the SFT model by its gate, before RLAIF trained on it
    assert sft_gate["pipelineStage"] == "sft" and set(sft_gate["scores"]) == {"acva/loglikelihood"}
    assert (workdir / "final" / "report" / "summary.md").exists()


def test_dhad_run_again_reuses_every_stage_and_runs_nothing(demo, tmp_path):
    workdir, _ = demo
    before = job_folders(workdir)
    done = cli("run", "-f", PIPELINE, "--workdir", workdir, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = status_of(done)
    assert status["state"] == "Succeeded" and all(s["cached"] for s in status["stages"])
    assert "== stage" not in done.stdout and job_folders(workdir) == before


def test_a_gate_above_the_models_score_fails_from_cached_scores_and_promotes_nothing(demo, tmp_path):
    workdir, _ = demo
    doc = yaml.safe_load(PIPELINE.read_text())
    doc["spec"]["stages"][1]["gate"]["require"][0]["atLeast"] = 0.99
    manifest = tmp_path / "strict.yaml"
    manifest.write_text(yaml.safe_dump(doc, allow_unicode=True))
    before = job_folders(workdir)
    done = cli("run", "-f", manifest, "--workdir", workdir, "-o", tmp_path / "out")
    assert done.returncode == 1
    status = status_of(done)
    assert status["state"] == "Failed" and status["reason"] == "GateFailed" and "outputModel" not in status
    assert "gate of stage sft failed: acva/loglikelihood = " in status["message"] and "< atLeast 0.99" in status["message"]
    assert [s["name"] for s in status["stages"]] == ["pretrain", "sft"] and job_folders(workdir) == before


def test_a_changed_stage_runs_again_and_only_it(demo, tmp_path):
    workdir, _ = demo
    doc = yaml.safe_load(PIPELINE.read_text())
    doc["spec"]["stages"][3]["eval"]["evaluation"]["limit"] = 12
    manifest = tmp_path / "changed.yaml"
    manifest.write_text(yaml.safe_dump(doc, allow_unicode=True))
    before = job_folders(workdir)
    done = cli("run", "-f", manifest, "--workdir", workdir, "-o", tmp_path / "out")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    status = status_of(done)
    assert [s.get("cached", False) for s in status["stages"]] == [True, True, True, False]
    new = job_folders(workdir) - before
    assert len(new) == 1 and next(iter(new)).startswith("evaljob-tiny-recipe-eval-")


def test_dhad_lineage_prints_the_chain_back_to_the_base_model(demo):
    workdir, _ = demo
    model_uri = json.loads((workdir / "final" / "model" / "lineage.json").read_text())["model"]
    with EmbeddedS3(workdir / "s3") as s3:
        done = cli("lineage", model_uri, env={**ENV, **s3.env()}, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert text.startswith("0. base model s3://dhad-demo/models/tiny-base")
    for stage, kind in (("pretrain", "PretrainJob"), ("sft", "SFTJob"), ("rlaif", "RLAIFJob")):
        assert f"made by pipeline local/tiny-recipe stage {stage}, {kind} local/tiny-recipe-{stage}-" in text
    assert "evaluated by pipeline local/tiny-recipe stage sft, local/tiny-recipe-sft-gate-" in text
    assert "evaluated by pipeline local/tiny-recipe stage rlaif, local/tiny-recipe-rlaif-gate-" in text  # the final model's gate
    assert "evaluated by pipeline local/tiny-recipe stage rlaif, local/tiny-recipe-rlaif-base-" in text  # its baseline: the SFT model
