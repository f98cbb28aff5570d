"""The Flux health checks (charts/dhad/flux/health-checks.yaml) evaluated with cel-python on the same
sample objects as the Argo CD Lua test, in Flux's order: a stale observedGeneration is InProgress
before any expression, then inProgress, failed, current; none true is InProgress."""

from __future__ import annotations

import re
from pathlib import Path

import celpy
import pytest
import yaml

from tests.unit.test_argocd_health import CASES, KINDS, job

REPO = Path(__file__).resolve().parents[2]
CHECKS = yaml.safe_load((REPO / "charts" / "dhad" / "flux" / "health-checks.yaml").read_text())["healthCheckExprs"]
ENV = celpy.Environment()
# Argo CD's health for each sample -> what Flux reports. Suspended is Current: at rest as asked.
FLUX = {"Progressing": "InProgress", "Healthy": "Current", "Degraded": "Failed", "Suspended": "Current"}
# Where Flux's own generation rule comes first (Argo CD lets Failed win over a stale generation).
FLUX_ONLY = {"failed beats a stale generation": "InProgress"}


def evaluate(expr: str, obj: dict) -> bool:
    # cel-go (Flux) errors on a variable the object lacks; cel-python would answer has() with false.
    missing = {name for name in re.findall(r"\b(status|spec|metadata)\.", expr) if name not in obj}
    if missing:
        raise LookupError(f"no such attribute: {sorted(missing)}")
    result = ENV.program(ENV.compile(expr)).evaluate({k: celpy.json_to_cel(v) for k, v in obj.items()})
    assert isinstance(result, celpy.celtypes.BoolType), f"{expr!r} gave {result!r}, not a bool"
    return bool(result)


def flux_status(obj: dict) -> str:
    """kustomize-controller's StatusEvaluator, with an evaluation error read as still waiting."""
    check = next(c for c in CHECKS if c["kind"] == obj["kind"] and c["apiVersion"] == obj["apiVersion"])
    status, generation = obj.get("status") or {}, obj["metadata"].get("generation")
    if "observedGeneration" in status and generation is not None and status["observedGeneration"] != generation:
        return "InProgress"
    try:
        for key, result in (("inProgress", "InProgress"), ("failed", "Failed"), ("current", "Current")):
            if key in check and evaluate(check[key], obj):
                return result
    except LookupError:
        return "InProgress (waiting: no status yet)"
    return "InProgress"


@pytest.mark.parametrize("obj,argo,message", CASES.values(), ids=CASES.keys())
def test_flux_health_matches_argo_cd_on_the_same_samples(obj, argo, message):
    case = next(name for name, value in CASES.items() if value[0] is obj)
    expected = FLUX_ONLY.get(case, FLUX[argo])
    assert flux_status(obj).split(" (")[0] == expected


def test_no_status_is_waited_on_not_failed():
    assert flux_status(job()) == "InProgress (waiting: no status yet)"


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_the_same_checks(kind):
    assert flux_status(job({"state": "Succeeded"}, kind=kind)) == "Current"
    assert flux_status(job({"state": "Failed"}, kind=kind)) == "Failed"
    assert flux_status(job({"state": "Running"}, kind=kind)) == "InProgress"
    assert {c["kind"] for c in CHECKS} == set(KINDS) and len(CHECKS) == len(KINDS)
    assert len({(c["failed"], c["current"]) for c in CHECKS}) == 1


def test_docs_show_the_checks_verbatim():
    text = (REPO / "docs" / "install.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "healthCheckExprs" in b]
    assert len(blocks) == 1 and blocks[0]["spec"]["healthCheckExprs"] == CHECKS
