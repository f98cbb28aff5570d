"""CustomResourceDefinitions generated from the pydantic models.

pydantic's JSON schema is not a structural CRD schema ($ref, anyOf for optionals), so this walks
the models directly: every model becomes an inlined object, optionals are simply not required,
constraints become bounds, model `rules` become `x-kubernetes-validations` (CEL), and every spec
field except `suspend` gets an immutability rule. `python -m dhad_api.crd` rewrites `crds/`.
"""

from __future__ import annotations

import enum
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from dhad_api.jobs import API_VERSION, GROUP, KINDS, VERSION, KindInfo
from dhad_api.naming import MAX_NAME_LENGTH, NAME_PATTERN
from dhad_api.status import JobStatus

IMMUTABLE_MESSAGE = (
    "is immutable; only spec.suspend may change. To retry or change a job, delete it and apply it again "
    "(set checkpoint.resumeFrom to continue from its checkpoint)"
)
# Without explicit bounds, the apiserver's CEL cost estimate assumes huge strings and lists.
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_ITEMS = 64


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    """Strips Optional[...] and Annotated[...], returning the bare type and the collected constraints."""
    metadata: list[Any] = []
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation, *extra = typing.get_args(annotation)
            metadata.extend(extra)
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                raise TypeError(f"unions are not allowed in the API (use exactly-one-of fields): {annotation}")
            annotation = args[0]
        else:
            return annotation, metadata


def _constraints(schema: dict, metadata: list[Any]) -> None:
    for item in metadata:
        if isinstance(item, at.Ge):
            schema["minimum"] = item.ge
        elif isinstance(item, at.Gt):
            schema["minimum"], schema["exclusiveMinimum"] = item.gt, True
        elif isinstance(item, at.Le):
            schema["maximum"] = item.le
        elif isinstance(item, at.Lt):
            schema["maximum"], schema["exclusiveMaximum"] = item.lt, True
        elif isinstance(item, at.MinLen):
            schema["min_length"] = item.min_length
        elif isinstance(item, at.MaxLen):
            schema["max_length"] = item.max_length
        else:  # StringConstraints and pydantic's general metadata (pattern)
            for attr in ("min_length", "max_length", "pattern"):
                value = getattr(item, attr, None)
                if value is not None:
                    schema[attr] = value


def type_schema(annotation: Any, metadata: list[Any]) -> dict:
    annotation, more = _unwrap(annotation)
    metadata = metadata + more
    origin = typing.get_origin(annotation)
    schema: dict
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return model_schema(annotation)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        schema = {"type": "string", "enum": [member.value for member in annotation]}
    elif annotation is bool:
        schema = {"type": "boolean"}
    elif annotation is int:
        schema = {"type": "integer", "format": "int64"}
    elif annotation is float:
        schema = {"type": "number"}
    elif annotation is str:
        schema = {"type": "string"}
    elif origin is list:
        (item,) = typing.get_args(annotation)
        schema = {"type": "array", "items": type_schema(item, [])}
    elif origin is dict:
        _, value = typing.get_args(annotation)
        schema = {"type": "object", "additionalProperties": type_schema(value, [])}
    elif annotation is dict:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    else:
        raise TypeError(f"no CRD schema for {annotation!r}")
    _constraints(schema, metadata)
    _rename_lengths(schema)
    return schema


def _rename_lengths(schema: dict) -> None:
    """min/max_length mean characters for strings, items for arrays, properties for maps."""
    kind = schema["type"]
    names = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems"), "object": ("minProperties", "maxProperties")}[kind] if kind in ("string", "array", "object") else None
    for index, attr in enumerate(("min_length", "max_length")):
        if attr in schema:
            value = schema.pop(attr)
            if names:
                schema[names[index]] = value
    if kind == "string" and "enum" not in schema:
        schema.setdefault("maxLength", DEFAULT_MAX_LENGTH)
    if kind == "array":
        schema.setdefault("maxItems", DEFAULT_MAX_ITEMS)
    if kind == "object" and "additionalProperties" in schema:
        schema.setdefault("maxProperties", DEFAULT_MAX_ITEMS)
    if "pattern" in schema and kind != "string":
        schema.pop("pattern")


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        value = field.default_factory()
    else:
        value = field.default
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(value, enum.Enum):
        return value.value
    return value


def model_schema(model: type[BaseModel]) -> dict:
    properties: dict[str, dict] = {}
    required: list[str] = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        schema = type_schema(field.annotation, list(field.metadata))
        if field.description:
            schema["description"] = field.description
        if field.is_required():
            required.append(key)
        else:
            default = _default(field)
            if default is not None:
                schema["default"] = default
        properties[key] = schema
    schema = {"type": "object", "properties": properties}
    if model.__doc__:
        schema["description"] = " ".join(model.__doc__.split())
    if required:
        schema["required"] = required
    rules = getattr(model, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [
            {"rule": r.cel, "message": r.message} | ({"fieldPath": r.field_path} if r.field_path else {})
            for r in rules
        ]
    return schema


def spec_schema(info: KindInfo) -> dict:
    schema = model_schema(info.spec)
    for key, prop in schema["properties"].items():
        if key != "suspend":
            prop.setdefault("x-kubernetes-validations", []).append({"rule": "self == oldSelf", "message": IMMUTABLE_MESSAGE})
    optional = [k for k in schema["properties"] if k not in schema.get("required", []) and "default" not in schema["properties"][k]]
    if optional:
        rule = " && ".join(f"has(self.{k}) == has(oldSelf.{k})" for k in optional)
        schema.setdefault("x-kubernetes-validations", []).append(
            {"rule": rule, "message": f"optional fields ({', '.join(optional)}) cannot be added or removed after creation; only spec.suspend may change"}
        )
    return schema


PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.stage", "priority": 1},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.percent", "description": "percent of total steps"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "priority": 1},
    {"name": "Nodes", "type": "integer", "jsonPath": ".spec.resources.nodes"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".spec.resources.gpusPerNode", "description": "GPUs per node"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd(info: KindInfo) -> dict:
    singular = info.kind.value.lower()
    root = {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(info),
            "status": model_schema(JobStatus),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"size(self.metadata.name) <= {MAX_NAME_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')",
                "message": f"metadata.name must be at most {MAX_NAME_LENGTH} characters, start with a letter and hold only "
                "lowercase letters, digits and '-': pod hostnames <name>-<stage>-<attempt>-<index> are capped at 63",
            }
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{info.plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind.value, "plural": info.plural, "singular": singular,
                "listKind": f"{info.kind.value}List", "shortNames": list(info.short_names), "categories": ["dhad"],
            },
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
            }],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text for every kind's CRD."""
    from dhad_api.pipeline import pipeline_crd

    header = f"# Generated from api/dhad_api by `python -m dhad_api.crd`; do not edit. ({API_VERSION})\n"
    documents = [crd(info) for info in KINDS.values()] + [pipeline_crd()]
    return {
        f"{doc['metadata']['name']}.yaml": header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)
        for doc in documents
    }


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[2] / "crds"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_all().items():
        (out / name).write_text(text)
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
