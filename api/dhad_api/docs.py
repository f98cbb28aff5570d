"""The API reference, generated from the same models as the CRDs: `python -m dhad_api.docs` writes docs/api.md.

It walks the CRD schemas (`dhad_api.crd`), so every field's JSON path, type, default, bounds and
description, and every CEL rule, reads exactly as the apiserver enforces them.
`tests/unit/test_api_docs.py` fails when the committed file drifts from the models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dhad_api import crd
from dhad_api.jobs import API_VERSION, KINDS, KindInfo
from dhad_api.naming import MAX_NAME_LENGTH, STAGE_CODES
from dhad_api.status import JobStatus

OUT = Path(__file__).resolve().parents[2] / "docs" / "api.md"
HIDDEN_RULES = (crd.IMMUTABLE_MESSAGE, "optional fields (")  # stated once in the notes instead


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _text(text: object) -> str:
    """Prose in a table cell: `<name>` would otherwise be read as an HTML tag."""
    return _cell(text).replace("<", "&lt;")


def _code(text: object) -> str:
    return f"`{_cell(text)}`"


def _type(schema: dict) -> str:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return "object (Kubernetes, passed through)"
    kind = schema.get("type", "object")
    if "enum" in schema:
        return "enum"
    if kind == "array":
        return f"[]{_type(schema['items'])}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map[string]{_type(schema['additionalProperties'])}"
    return kind


def _bounds(schema: dict) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(_code(v) for v in schema["enum"]))
    for low, high, unit in (("minimum", "maximum", ""), ("minLength", "maxLength", " chars"),
                            ("minItems", "maxItems", " items"), ("minProperties", "maxProperties", " entries")):
        if low in schema:
            parts.append(f"{'>' if schema.get('exclusiveMinimum') else '>='} {schema[low]}{unit}")
        if high in schema:
            parts.append(f"{'<' if schema.get('exclusiveMaximum') else '<='} {schema[high]}{unit}")
    if "pattern" in schema:
        parts.append("pattern " + _code(schema["pattern"]))
    return "; ".join(parts)


def _default(schema: dict, required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in schema:
        return ""
    text = json.dumps(schema["default"], ensure_ascii=False, separators=(",", ":"))
    return _code(text) if len(text) <= 60 else "see description"


def walk(schema: dict, path: str, rows: list, rules: list, required: bool = False, leaves: frozenset = frozenset()) -> None:
    """Appends (path, type, default, bounds, description) rows and (path, rule, message) rules, depth first;
    paths in `leaves` get their own row but not their fields' (documented elsewhere)."""
    rows.append((path, _type(schema), _default(schema, required), _bounds(schema), schema.get("description", "")))
    rules.extend((path, r["rule"], r["message"]) for r in schema.get("x-kubernetes-validations", [])
                 if not r["message"].startswith(HIDDEN_RULES))
    if path in leaves:
        return
    needed = set(schema.get("required", []))
    for key, sub in schema.get("properties", {}).items():
        walk(sub, f"{path}.{key}", rows, rules, key in needed, leaves)
    if schema.get("type") == "array" and "properties" in schema["items"]:
        for key, sub in schema["items"]["properties"].items():
            walk(sub, f"{path}[].{key}", rows, rules, key in set(schema["items"].get("required", [])), leaves)
        rules.extend((f"{path}[]", r["rule"], r["message"]) for r in schema["items"].get("x-kubernetes-validations", []))


def _fields_table(rows: list) -> list[str]:
    out = ["| Field | Type | Default | Bounds | Description |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {_code(p)} | {_cell(t)} | {d} | {b} | {_text(desc)} |" for p, t, d, b, desc in rows]
    return out


def kind_section(info: KindInfo) -> list[str]:
    root = crd.crd(info)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rows: list = []
    rules = [("metadata.name", r["rule"], r["message"]) for r in root["x-kubernetes-validations"]]
    walk(crd.model_schema(info.spec), "spec", rows, rules)
    stages = ", ".join(f"`{s}` (Job `<name>-{STAGE_CODES[s]}-<attempt>`)" for s in info.stages)
    out = [f"## {info.kind.value}", "", " ".join((info.spec.__doc__ or "").split()), "",
           f"`apiVersion: {API_VERSION}`, plural `{info.plural}`, short names {', '.join(f'`{s}`' for s in info.short_names)}, "
           f"category `dhad`. Children are named `<name>-{info.code}...`; sub-stages in order: {stages}.", "",
           f"### {info.kind.value} spec", ""]
    out += _fields_table(rows)
    out += ["", f"### {info.kind.value} validation rules (CEL)", "",
            "| Applies to | Rule | Message |", "| --- | --- | --- |"]
    out += [f"| {_code(p)} | {_code(rule)} | {_text(message)} |" for p, rule, message in rules]
    out += ["", "Status: see [Status](#status); columns: see [Printer columns](#printer-columns).", ""]
    return out


def pipeline_section() -> list[str]:
    """The Pipeline kind: its spec and rules, its own status and printer columns (docs/pipeline.md explains it)."""
    from dhad_api import pipeline as P

    root = P.pipeline_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rows: list = []
    rules = [("metadata.name", r["rule"], r["message"]) for r in root["x-kubernetes-validations"]]
    # a stage template is its kind's spec (documented above) with shared fields optional: no second copy here
    leaves = frozenset([f"spec.stages[].{f}" for f in P.KIND_FIELDS.values()]
                       + [f"spec.defaults.{a}" for a in P.SHARED_ALIASES] + ["spec.stages[].gate.evaluation"])
    walk(crd.model_schema(P.PipelineSpec), "spec", rows, rules, leaves=leaves)
    status_rows: list = []
    walk(crd.model_schema(P.PipelineStatus), "status", status_rows, [])
    out = ["## Pipeline", "", " ".join((P.PipelineSpec.__doc__ or "").split()), "",
           f"`apiVersion: {API_VERSION}`, plural `{P.PLURAL}`, short names {', '.join(f'`{s}`' for s in P.SHORT_NAMES)}, "
           f"category `dhad`. The spec may change after creation (a changed stage runs again, with every stage after it). "
           f"Stage jobs are named `<pipeline>-<stage>-<digest>`, gates `<pipeline>-<stage>-gate-<digest>` and "
           f"`<pipeline>-<stage>-base-<digest>`; `metadata.name` is at most {P.PIPELINE_NAME_MAX} characters. "
           "See docs/pipeline.md for gates, the step cache, lineage, suspend, retry and deletion.", "",
           "### Pipeline spec", ""]
    out += _fields_table(rows)
    out += ["", "### Pipeline validation rules (CEL)", "", "| Applies to | Rule | Message |", "| --- | --- | --- |"]
    out += [f"| {_code(p)} | {_code(rule)} | {_text(message)} |" for p, rule, message in rules]
    out += ["", "### Pipeline status", ""] + _fields_table(status_rows)
    out += ["", "### Pipeline printer columns", "", "| Name | Type | JSON path | Priority | Description |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {c['name']} | {c['type']} | {_code(c['jsonPath'])} | {c.get('priority', 0)} | {_text(c.get('description', ''))} |"
            for c in P.PRINTER_COLUMNS]
    return out + [""]


def render() -> str:
    """The whole of docs/api.md."""
    out = [
        "# Dhad API reference", "",
        f"<!-- Generated from api/dhad_api by `python -m dhad_api.docs`; do not edit. ({API_VERSION}) -->", "",
        "Four kinds, one per AceGPT step: " + ", ".join(f"[{i.kind.value}](#{i.kind.value.lower()})" for i in KINDS.values())
        + ". Field paths are JSON paths in the manifest (`[]` is any list item); every field not marked "
        "**required** may be left out and takes its default. Bounds are enforced by the apiserver (CRD schema) "
        "and, identically, by the trainer in local mode.", "",
        "## Notes", "",
        "- **The spec is immutable except `spec.suspend`.** Any other change is rejected by the apiserver: "
        f"\"spec.&lt;field&gt; {_cell(crd.IMMUTABLE_MESSAGE)}\". Optional fields cannot be added or removed after creation either.",
        "- **Suspend and resume:** set `spec.suspend: true` to stop the pods (checkpoints are kept); set it back to "
        "`false` to resume from the newest complete checkpoint in a new attempt (not counted as a restart).",
        "- **Retrying a failed job:** a Failed job stays Failed. Delete it and apply it again; set "
        "`spec.checkpoint.resumeFrom` to the failed run's checkpoint (`s3://.../<stage>/checkpoints/step-NNNNNN`, see "
        "`status.lastCheckpoint`) to continue from it, since the new object has a new UID and so a new output folder.",
        f"- **Names:** `metadata.name` is at most {MAX_NAME_LENGTH} characters and starts with a letter, so that pod "
        "hostnames `<name>-<stage>-<attempt>-<index>` fit in 63.",
        "- **Outputs** go to `s3://<bucket>/<prefix>/<namespace>/<name>-<uid>/<stage>/` (`checkpoints/`, `model/`, `report/`).",
        "",
    ]
    for info in KINDS.values():
        out += kind_section(info)
    out += pipeline_section()
    rows: list = []
    walk(crd.model_schema(JobStatus), "status", rows, [])
    out += ["## Status", "", "Written by the operator only; the same for every kind.", ""] + _fields_table(rows)
    out += ["", "## Printer columns", "", "Shown by `kubectl get <kind>` (and `kubectl get dhad` for all kinds); "
            "priority 1 columns only with `-o wide`.", "",
            "| Name | Type | JSON path | Priority | Description |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {c['name']} | {c['type']} | {_code(c['jsonPath'])} | {c.get('priority', 0)} | {_text(c.get('description', ''))} |"
            for c in crd.PRINTER_COLUMNS]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
