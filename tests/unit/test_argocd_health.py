"""The Argo CD health script (charts/dhad/argocd/health.lua) run on Lua 5.1, as Argo CD's gopher-lua is,
with `obj` built from a Python dict the way Argo CD builds it from the object's JSON."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from lupa.lua51 import LuaRuntime

REPO = Path(__file__).resolve().parents[2]
SCRIPT = (REPO / "charts" / "dhad" / "argocd" / "health.lua").read_text()
KINDS = ("PretrainJob", "SFTJob", "RLAIFJob", "EvalJob", "Pipeline")


def health(obj: dict) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)
    env = lua.globals()
    for unsafe in ("os", "io", "require", "dofile", "loadfile", "package", "debug"):
        env[unsafe] = None  # Argo CD does not promise these; the script must not need them
    env.obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def job(status: dict | None = None, generation: int = 1, kind: str = "SFTJob") -> dict:
    obj = {"apiVersion": "dhad.dev/v1alpha1", "kind": kind,
           "metadata": {"name": "acegpt-7b-sft", "namespace": "llm", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, reason: str = "", message: str = "", status: str = "True") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


CASES = {
    "no status": (job(), "Progressing", "Waiting for the Dhad operator"),
    "empty status": (job({}), "Progressing", "Pending"),
    "pending": (job({"state": "Pending", "conditions": [cond("Created", "Created", "children created")]}),
                "Progressing", "Pending"),
    "queued": (job({"state": "Queued", "conditions": [cond("Queued", "Queued", "waiting for Kueue admission")]}),
               "Progressing", "Queued: waiting for Kueue admission"),
    "unschedulable": (job({"state": "Pending", "conditions": [
        cond("Unschedulable", "Unschedulable", "0/4 nodes have 8 nvidia.com/gpu")]}),
        "Progressing", "Unschedulable: 0/4 nodes have 8 nvidia.com/gpu"),
    "running with progress": (job({"state": "Running", "observedGeneration": 1,
                                   "conditions": [cond("Running", "Running", "attempt 1 on 2 nodes")],
                                   "progress": {"step": 120, "totalSteps": 1000, "loss": 1.25}}),
                              "Progressing", "Running: attempt 1 on 2 nodes (step 120/1000)"),
    "running a sub-stage": (job({"state": "Running", "stage": "reward", "progress": {"step": 7}}, kind="RLAIFJob"),
                            "Progressing", "Running (stage reward, step 7)"),
    "restarting": (job({"state": "Restarting", "conditions": [
        cond("Running", status="False"), cond("Restarting", "WorkerFailed", "rank 3 exited 70; attempt 2 in 20 s")]}),
        "Progressing", "WorkerFailed: rank 3 exited 70; attempt 2 in 20 s"),
    "suspended": (job({"state": "Suspended", "observedGeneration": 2,
                       "conditions": [cond("Suspended", "Suspended", "spec.suspend is true")]}, generation=2),
                  "Suspended", "Suspended: spec.suspend is true"),
    "suspend not yet observed": (job({"state": "Running", "observedGeneration": 1}, generation=2),
                                 "Progressing", "Waiting for the operator to observe generation 2"),
    "resumed, not yet observed": (job({"state": "Suspended", "observedGeneration": 2}, generation=3),
                                  "Progressing", "Waiting for the operator to observe generation 3"),
    "succeeded": (job({"state": "Succeeded", "outputModel": "s3://llm/dhad/llm/sft-1/model/",
                       "conditions": [cond("Succeeded", "Succeeded", "training finished at step 1000")]}),
                  "Healthy", "Succeeded: training finished at step 1000 (model: s3://llm/dhad/llm/sft-1/model/)"),
    "succeeded, condition only": (job({"conditions": [cond("Running", status="False"), cond("Succeeded")]}),
                                  "Healthy", "Succeeded"),
    "failed": (job({"state": "Failed", "conditions": [
        cond("Failed", "BadConfig", "spec.data[0].uri: s3://llm-data/x.jsonl does not exist")]}),
        "Degraded", "BadConfig: spec.data[0].uri: s3://llm-data/x.jsonl does not exist"),
    "failed, condition only": (job({"conditions": [cond("Running", status="False"),
                                                   cond("Failed", "BackoffLimitExceeded", "3 restarts used up")]}),
                               "Degraded", "BackoffLimitExceeded: 3 restarts used up"),
    "failed beats a stale generation": (job({"state": "Failed", "observedGeneration": 1,
                                             "conditions": [cond("Failed", "OOMKilled")]}, generation=2),
                                        "Degraded", "OOMKilled"),
    "pipeline at a gate": (job({"state": "Running", "stage": "sft/gate", "progress": "1/4",
                                "conditions": [cond("Running", "Running", "gate of stage sft: EvalJob running")]}, kind="Pipeline"),
                           "Progressing", "Running: gate of stage sft: EvalJob running (stage sft/gate, 1/4 stages done)"),
    "pipeline gate failed": (job({"state": "Failed", "stage": "sft/gate", "progress": "1/4", "conditions": [
        cond("Failed", "GateFailed", "gate of stage sft failed: acva/generate = 0.4100 < atLeast 0.6; nothing is promoted")]},
        kind="Pipeline"),
        "Degraded", "GateFailed: gate of stage sft failed: acva/generate = 0.4100 < atLeast 0.6; nothing is promoted"),
    "pipeline succeeded": (job({"state": "Succeeded", "progress": "4/4", "outputModel": "s3://llm/dhad/llm/p-rlaif/policy/model",
                                "conditions": [cond("Succeeded", "Succeeded", "every stage and gate succeeded")]}, kind="Pipeline"),
                           "Healthy", "Succeeded: every stage and gate succeeded (model: s3://llm/dhad/llm/p-rlaif/policy/model)"),
    "false conditions are ignored": (job({"conditions": [cond("Failed", "X", "no", status="False")]}),
                                     "Progressing", "Pending"),
}


@pytest.mark.parametrize("obj,status,message", CASES.values(), ids=CASES.keys())
def test_health_maps_status_to_argo_health(obj, status, message):
    assert health(obj) == (status, message)


@pytest.mark.parametrize("kind", KINDS)
def test_one_script_serves_every_kind(kind):
    assert health(job({"state": "Succeeded"}, kind=kind))[0] == "Healthy"
    assert health(job({"state": "Failed"}, kind=kind)) == ("Degraded", "Failed")


def test_docs_snippet_is_the_script_for_every_kind():
    """docs/install.md's argocd-cm snippet gives each of the four kinds this exact script."""
    text = (REPO / "docs" / "install.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "argocd-cm" in b]
    assert len(blocks) == 1
    assert blocks[0]["data"] == {f"resource.customizations.health.dhad.dev_{kind}": SCRIPT for kind in KINDS}
