"""Every job a manifest makes: the job itself, or a Pipeline's stages and gates with its defaults applied."""

from __future__ import annotations

from pathlib import Path

import yaml


def example_jobs(path: Path) -> list[tuple[str, str, object]]:
    """(label, kind, spec) of each job the manifest at `path` runs."""
    from dhad_api.jobs import parse_spec
    from dhad_api.pipeline import parse_pipeline, plan_pipeline

    doc = yaml.safe_load(path.read_text())
    if doc["kind"] == "Pipeline":
        return [(step.label, step.kind, step.spec) for step in plan_pipeline(parse_pipeline(doc["spec"]))]
    return [(doc["metadata"]["name"], doc["kind"], parse_spec(doc["kind"], doc["spec"]))]
