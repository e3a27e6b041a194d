"""Shared pieces of the params schema: a strict base model and key suggestions."""

from __future__ import annotations

import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class Section(BaseModel):
    """A params-file mapping: unknown keys are errors, values are validated, nothing coerced silently."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _no_silent_coercion(cls, data):
        """``true`` is not the number 1. (Strings are left to pydantic: YAML reads ``5e-5`` as a
        string, which must still be the number 5e-5.)"""
        if not isinstance(data, dict):
            return data
        for key, value in data.items():
            field = cls.model_fields.get(key) if isinstance(key, str) else None
            if field is None or not isinstance(value, bool):
                continue
            kinds = set(_members(field.annotation))
            if kinds & {int, float} and bool not in kinds:
                raise PydanticCustomError("number_type", "{key}: must be a number, not a boolean ({value})",
                                          {"key": key, "value": str(value).lower()})
        return data

    @classmethod
    def key_names(cls) -> list[str]:
        """Every key this mapping accepts, aliases included."""
        names = []
        for name, field in cls.model_fields.items():
            names.append(name)
            alias = field.validation_alias
            choices = getattr(alias, "choices", None)
            if choices:
                names.extend(c for c in choices if isinstance(c, str))
            elif isinstance(alias, str):
                names.append(alias)
        return names


def _members(tp: Any) -> list[Any]:
    """Strip Optional/Annotated/Union wrappers: the concrete types a value may have."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _members(typing.get_args(tp)[0])
    if origin is Union or str(origin) == "types.UnionType":
        out = []
        for arg in typing.get_args(tp):
            out.extend(_members(arg))
        return out
    return [tp]


def section_at(root: type[Section], loc: tuple) -> type[Section] | None:
    """The ``Section`` class that holds the last key of ``loc`` (used to suggest key names).

    ``loc`` is a pydantic error location: field names, list indices and, for tagged unions,
    the tag. Returns None when the path leaves the schema.
    """
    candidates: list[Any] = [root]
    for part in loc[:-1]:
        members = [m for tp in candidates for m in _members(tp)]
        sections = [m for m in members if isinstance(m, type) and issubclass(m, Section)]
        tagged = [m for m in sections if _tag_of(m) == part]
        if tagged:  # a discriminated-union step ('ViTModel'): narrow to that member
            candidates = tagged
            continue
        nxt: list[Any] = []
        for member in members:
            origin = typing.get_origin(member)
            if member in sections and isinstance(part, str) and part in member.model_fields:
                nxt.append(member.model_fields[part].annotation)
            elif origin in (list, tuple) and isinstance(part, int):
                nxt.extend(typing.get_args(member)[:1])
            elif origin is dict and isinstance(part, str):
                nxt.extend(typing.get_args(member)[1:2])
        if nxt or not isinstance(part, str):
            candidates = nxt
        # else: a tag of a callable-discriminated union ('one', 'list'): keep the candidates
    for tp in candidates:
        for member in _members(tp):
            if isinstance(member, type) and issubclass(member, Section):
                return member
    return None


def _tag_of(cls: type[Section]) -> str | None:
    field = cls.model_fields.get("name") or cls.model_fields.get("scheduler")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if typing.get_origin(field.annotation) is typing.Literal and args else None

