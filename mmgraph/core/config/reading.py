"""Reading a YAML file of sections, and pydantic's errors as ``FILE: section.key: message``
problems (params files and target files alike)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from mmgraph.core.config.base import Section, section_at
from mmgraph.core.config.layouts import Normalized
from mmgraph.core.errors import Problem, UserError, did_you_mean

_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
_UNION_TAGS = {"int", "float", "str", "bool", "number", "one", "list", "dict", "none"}


def read_yaml(path: str) -> dict:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(Problem(path, None, f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                f"{err.start}); save the params file as UTF-8")) from None
    except FileNotFoundError:
        raise UserError(Problem(path, None, "no such file")) from None
    except OSError as err:
        raise UserError(Problem(path, None, f"cannot read: {err.strerror}")) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        what = getattr(err, "problem", None) or str(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start:
            what += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
        raise UserError(Problem(path, where, f"YAML syntax error: {what}")) from None
    if raw is None:
        raise UserError(Problem(path, None, "the file is empty"))
    if not isinstance(raw, dict):
        raise UserError(Problem(path, None, f"expected a mapping of sections, got {type(raw).__name__}"))
    return raw


def display_loc(section: str, loc: tuple) -> str:
    """``('image_models', 0, 'image_model', 0, 'ViTModel', 'hidden_size')`` ->
    ``model.image_model_list.image_models[0].image_model[0].hidden_size`` (union tags dropped)."""
    out = section
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            out += f"[{part}]"
        elif last or (_KEY.match(part) and part not in _UNION_TAGS):
            out += f".{part}"
    return out


def format_errors(path: str, section: str, schema: type[Section], err: ValidationError,
                   norm: Optional[Normalized] = None) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        if kind == "number_type":  # raised for the whole mapping: name the key
            loc += (e["ctx"]["key"],)
        where = display_loc(section, loc)
        if kind == "extra_forbidden":
            holder = section_at(schema, loc)
            hint = did_you_mean(str(loc[-1]), holder.key_names()) if holder else ""
            message = "unknown key" + hint
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            got = e.get("input")
            options = re.findall(r"'([^']*)'", expected)
            hint = did_you_mean(str(got), options) if isinstance(got, str) else ""
            message = f"{got!r} is not one of {expected}{hint}"
        elif kind == "number_type":
            message = e["msg"].split(": ", 1)[1]
        elif kind == "union_tag_invalid":
            message = f"unsupported name {e.get('input')!r}, expected one of {e['ctx']['expected_tags']}"
        else:
            message = e["msg"].replace("Input should be", "must be").removeprefix("Value error, ")
            if kind != "value_error" and "input" in e and not isinstance(e["input"], (dict, list)):
                message += f" (got {e['input']!r})"
        problems.append(Problem(path, norm.where(where) if norm else where, message))
    return problems


def dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.where, p.message) not in seen:
            seen.add((p.where, p.message))
            out.append(p)
    return out
