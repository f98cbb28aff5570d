"""Conventions every Dhad API model follows, so the CRD schema and docs can be generated from them.

- camelCase in YAML/JSON, snake_case in Python (alias generator), unknown fields rejected.
- Every field has a description that starts with its JSON name and states the default, units and
  what empty means (Kueue's API types are the model); `tests/unit/test_api_docs.py` enforces it.
- Strings and lists carry max lengths: the apiserver's CEL cost budget needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


class DhadModel(BaseModel):
    """Base of every spec/status model: camelCase aliases, no unknown fields, validated on assignment."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_assignment=True,
        use_enum_values=False,
    )

    def to_json_dict(self) -> dict:
        """The object as the apiserver stores it: camelCase keys, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass(frozen=True)
class Rule:
    """A cross-field rule written once in both languages, side by side.

    `cel` becomes an `x-kubernetes-validations` entry on the model's CRD schema, so the apiserver
    rejects the object at apply time; `check` is the same rule in Python, so the trainer refuses a
    spec the apiserver would (local mode has no apiserver). `tests/integration/test_api_rejects.py`
    applies each bad case to both and checks they agree.
    """

    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None


class RuledModel(DhadModel):
    """A model with cross-field `rules`, checked after field validation."""

    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self
