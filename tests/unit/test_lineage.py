"""Lineage: each output model's lineage.json carries the chain back to the first base model, evaluations are
recorded beside the model they scored, and `dhad lineage` prints both (local folders stand in for S3 here;
the local-mode pipeline test reads them from the embedded S3 server)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dhad_api.jobs import Job
from dhad_trainer.storage import lineage

REPO = Path(__file__).resolve().parents[2]


def job(kind: str, name: str, example: str, model_uri: str) -> Job:
    doc = yaml.safe_load((REPO / "examples" / "tiny" / f"{example}.yaml").read_text())
    doc["spec"]["model"] = {"uri": model_uri}
    return Job(kind=kind, metadata={"name": name, "namespace": "ml", "uid": f"uid-{name}"}, spec=doc["spec"])


def made(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_the_chain_grows_one_entry_per_job_and_carries_evaluations_recorded_in_between(tmp_path, monkeypatch):
    base = made(tmp_path, "base")
    code = {"dhad": "0.1.0", "commit": "abc123"}
    monkeypatch.setenv("DHAD_PIPELINE", "recipe")
    monkeypatch.setenv("DHAD_PIPELINE_STAGE", "pretrain")
    monkeypatch.setenv("DHAD_CACHE_KEY", "k" * 64)
    pretrain = job("PretrainJob", "recipe-pretrain-aaaaaa", "pretrain", str(base))
    first_dir = made(tmp_path, "pretrain")
    first = lineage.build(pretrain, pretrain.typed_spec(), "pretrain", output_uri=str(first_dir), base_uri=str(base), base_dir=base,
                          inputs={"model": "m" * 64, "prepared_data": "d" * 64}, code=code)
    lineage.write(first_dir, first)
    assert [e.get("root", False) for e in first["chain"]] == [True, False]
    entry = first["chain"][1]
    assert entry["pipeline"] == "ml/recipe" and entry["pipelineStage"] == "pretrain" and entry["specHash"] == "k" * 64
    assert entry["data"] == ["s3://dhad-demo/data/arabic_corpus.txt"] and entry["inputsSha256"] == {"prepared_data": "d" * 64}
    assert entry["baseModel"] == str(base) and entry["baseModelSha256"] == "m" * 64 and entry["code"] == code

    monkeypatch.setenv("DHAD_PIPELINE_STAGE", "pretrain")
    gate = job("EvalJob", "recipe-pretrain-gate-bbbbbb", "eval", str(first_dir))
    where = lineage.record_evaluation(gate, str(first_dir), {"acva/loglikelihood": 0.61}, "s3://x/report/summary.md", {"suites": ["acva"]})
    assert where == f"{tmp_path}/pretrain/evaluations/model/ml-recipe-pretrain-gate-bbbbbb-uid-reci.json"
    assert not any(p.name.endswith(".json") and "evaluations" in str(p) for p in first_dir.rglob("*"))  # outside the model

    monkeypatch.setenv("DHAD_PIPELINE_STAGE", "sft")
    monkeypatch.delenv("DHAD_CACHE_KEY")
    sft = job("SFTJob", "recipe-sft-cccccc", "sft", str(first_dir))
    second_dir = made(tmp_path, "sft")
    second = lineage.build(sft, sft.typed_spec(), "sft", output_uri=str(second_dir), base_uri=str(first_dir), base_dir=first_dir,
                           inputs={"model": "p" * 64}, code=code)
    assert [e["model"] for e in second["chain"]] == [str(base), str(first_dir), str(second_dir)]
    assert second["chain"][1]["evaluations"][0]["scores"] == {"acva/loglikelihood": 0.61}
    assert len(second["chain"][2]["specHash"]) == 64 and second["chain"][2]["specHash"] != "k" * 64  # computed outside a pipeline
    lineage.write(second_dir, second)

    text = lineage.describe(lineage.read_lineage(second_dir), {str(first_dir): lineage.read_evaluations(str(first_dir))})
    lines = text.splitlines()
    assert lines[0].startswith(f"0. base model {base}")
    assert f"made by pipeline ml/recipe stage sft, SFTJob ml/recipe-sft-cccccc (sft) from {first_dir}" in text
    assert text.count("evaluated by pipeline ml/recipe stage pretrain, ml/recipe-pretrain-gate-bbbbbb: acva/loglikelihood 0.6100") == 1


def test_dhad_lineage_prints_the_chain_and_refuses_a_model_without_one(tmp_path):
    base = made(tmp_path, "base")
    child = made(tmp_path, "child")
    spec_job = job("SFTJob", "alone", "sft", str(base))
    lineage.write(child, lineage.build(spec_job, spec_job.typed_spec(), "sft", output_uri=str(child), base_uri=str(base),
                                       base_dir=base, inputs={}, code={"dhad": "0.1.0", "commit": None}))
    done = subprocess.run([sys.executable, "-m", "dhad_trainer.cli", "lineage", str(child)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"0. base model {base}" in done.stdout and "SFTJob ml/alone (sft)" in done.stdout
    as_json = subprocess.run([sys.executable, "-m", "dhad_trainer.cli", "lineage", str(child), "--json"], capture_output=True, text=True, timeout=120)
    assert json.loads(as_json.stdout)["chain"][1]["job"] == "ml/alone"
    missing = subprocess.run([sys.executable, "-m", "dhad_trainer.cli", "lineage", str(base)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "has no lineage.json" in missing.stderr


@pytest.mark.parametrize("uri,where", [
    ("s3://b-1/dhad/ml/sft-uid/sft/model", "s3://b-1/dhad/ml/sft-uid/sft/evaluations/model"),
    ("s3://b-1/models/tiny-base", "s3://b-1/models/evaluations/tiny-base"),
])
def test_evaluations_live_beside_the_model_not_under_its_prefix(uri, where):
    assert lineage.evaluations_uri(uri) == where
    assert not where.startswith(uri)  # a prefix listing of the model never includes them


def test_a_hub_model_gets_no_evaluation_record():
    gate = job("EvalJob", "e", "eval", "hf://org/model")
    assert lineage.record_evaluation(gate, "hf://org/model", {"acva/generate": 0.5}, None, {}) is None
