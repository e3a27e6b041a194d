"""Load a params YAML: parse, validate every section, check cross-key rules, derive values.

Every problem is collected and reported at once as ``FILE: section.key: message``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mmgraph.core.config.base import Section
from mmgraph.core.config.checks import semantic_problems
from mmgraph.core.config.data import InputConfig
from mmgraph.core.config.layouts import normalize
from mmgraph.core.config.model import ModelConfig
from mmgraph.core.config.optim import OptimizerConfig
from mmgraph.core.config.params import (
    REQUIRED_FOR_MODE,
    Params,
)
from mmgraph.core.config.reading import dedupe, format_errors, read_yaml
from mmgraph.core.config.run import RunConfig
from mmgraph.core.errors import Problem, UserError, did_you_mean

SECTIONS: dict[str, type[Section]] = {
    "train_input": InputConfig,
    "eval_input": InputConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "runconfig": RunConfig,
}
def load_params(path: str | Path, mode: str = "train") -> Params:
    """Read and validate a params file; raise ``UserError`` listing every problem."""
    path = str(path)
    raw = read_yaml(path)
    norm = normalize(raw)
    problems = [Problem(path, where, message) for where, message in norm.problems]
    sections: dict[str, Any] = {}

    for key, value in norm.sections.items():
        if key not in SECTIONS:
            hint = did_you_mean(str(key), list(SECTIONS) + ["trainer"])
            problems.append(Problem(path, str(key), "unknown section" + hint))
            continue
        if value is None:
            value = {}
        try:
            sections[key] = SECTIONS[key].model_validate(value)
        except ValidationError as err:
            problems.extend(format_errors(path, key, SECTIONS[key], err, norm))

    needed = ("model",) + REQUIRED_FOR_MODE.get(mode, ())
    for key in needed:
        if key not in norm.sections:
            problems.append(Problem(path, norm.where(key), f"missing section (required for --mode {mode})"
                                    if key != "model" else "missing section"))

    problems.extend(Problem(p.file, norm.where(p.where or ""), p.message)
                    for p in semantic_problems(path, sections))
    if problems:
        raise UserError(dedupe(problems))
    ignored = list(norm.ignored)
    if sections.get("optimizer") is not None:
        ignored += [(f"{norm.where('optimizer')}.{k}", "collected in optim_params; not used by "
                     f"{sections['optimizer'].optimizer_type} here") for k in sections["optimizer"].optim_params]
    return Params(path=path, raw=raw, file_layout=norm.layout, ignored=tuple(ignored), **sections)
