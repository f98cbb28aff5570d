"""docs/api.md is generated from the models (`python -m dhad_api.docs`) and must not drift from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from dhad_api import crd, docs
from dhad_api.jobs import KINDS
from dhad_api.status import JobStatus

REPO = Path(__file__).resolve().parents[2]


def test_committed_api_docs_match_the_models():
    committed = REPO / "docs" / "api.md"
    assert committed.exists(), "docs/api.md missing: run python -m dhad_api.docs"
    assert committed.read_text() == docs.render(), "docs/api.md drifted from api/: run python -m dhad_api.docs"


def _paths(schema: dict, path: str):
    yield path
    for key, sub in schema.get("properties", {}).items():
        yield from _paths(sub, f"{path}.{key}")
    if schema.get("type") == "array":
        for key, sub in schema["items"].get("properties", {}).items():
            yield from _paths(sub, f"{path}[].{key}")


@pytest.mark.parametrize("info", KINDS.values(), ids=lambda i: i.kind.value)
def test_every_field_and_rule_of_each_kind_is_documented(info):
    section = docs.render().split(f"\n## {info.kind.value}\n")[1].split("\n## ")[0]
    for path in _paths(crd.model_schema(info.spec), "spec"):
        assert f"| `{path}` |" in section, path
    root = crd.crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    messages = [r["message"] for r in root["x-kubernetes-validations"]]
    rows, rules = [], []
    docs.walk(crd.model_schema(info.spec), "spec", rows, rules)
    for message in messages + [m for _, _, m in rules]:
        assert docs._text(message) in section, message


def test_status_printer_columns_and_lifecycle_notes_are_documented():
    text = docs.render()
    for path in _paths(crd.model_schema(JobStatus), "status"):
        assert f"| `{path}` |" in text, path
    for column in crd.PRINTER_COLUMNS:
        assert f"`{column['jsonPath']}`" in text
    assert "immutable except `spec.suspend`" in text and "`spec.checkpoint.resumeFrom`" in text
