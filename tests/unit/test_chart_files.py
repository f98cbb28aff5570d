"""The Helm chart's files that must follow the rest of the repository without Helm or a cluster."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dhad"


def test_chart_crds_are_byte_identical_copies_of_crds():
    """Helm installs charts/dhad/crds/; they are copies of the generated crds/ (hack/sync-chart-crds.sh)."""
    generated = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_bytes() for p in (CHART / "crds").iterdir()}
    assert sorted(in_chart) == sorted(generated), "run hack/sync-chart-crds.sh"
    stale = [name for name in generated if in_chart[name] != generated[name]]
    assert not stale, f"{stale} differ from crds/: run hack/sync-chart-crds.sh"
    assert not any(p.is_symlink() for p in (CHART / "crds").iterdir())


def test_chart_versions_follow_the_project():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["apiVersion"] == "v2" and chart["name"] == "dhad"
    assert chart["version"] == "0.1.0" and chart["appVersion"] == version


def test_values_schema_is_strict_and_covers_every_default():
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(node: dict, value, path: str):
        if node.get("type") == "object" and "properties" in node:
            assert node.get("additionalProperties") is False, f"{path or 'values'} is not strict"
            assert set(value) <= set(node["properties"]), f"{path}: {set(value) - set(node['properties'])} undeclared"
            for key, child in value.items():
                walk(node["properties"][key], child, f"{path}.{key}".lstrip("."))

    walk(schema, values, "")
