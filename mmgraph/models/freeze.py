"""``model.freeze``: regexes that pick the parameters that do not train (Model Zoo semantics).

A parameter is frozen when a pattern ``re.search``-matches its name or the name of the module
that owns it. A pattern that matches nothing is an error, as in the Model Zoo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from mmgraph.core.errors import Problem, UserError


@dataclass(frozen=True)
class FreezeReport:
    """What each pattern matched (parameter names, in model order)."""

    matches: dict[str, tuple[str, ...]]

    @property
    def frozen(self) -> frozenset[str]:
        return frozenset(n for names in self.matches.values() for n in names)


# The older ``llava`` model's module names, which its files' freeze patterns are written against.
LLAVA_NAMES = (("image_model.image_model_list.0.0.", "image_model."),
               ("image_model.projection.", "projector_image_model."))


def pattern_name(name: str, naming: str = "multimodal_simple") -> str:
    """The name a freeze pattern sees: the parameter's own, or its ``llava`` model name."""
    if naming == "llava":
        for ours, theirs in LLAVA_NAMES:
            if name.startswith(ours):
                return theirs + name[len(ours):]
    return name


def match_freeze_patterns(model: nn.Module, patterns: list[str], naming: str = "multimodal_simple") -> FreezeReport:
    compiled = [(p, re.compile(p)) for p in patterns]
    matches: dict[str, list[str]] = {p: [] for p in patterns}
    for real, _ in model.named_parameters():
        name = pattern_name(real, naming)
        module_path = name.rpartition(".")[0]
        for pattern, rx in compiled:
            if rx.search(name) or (module_path and rx.search(module_path)):
                matches[pattern].append(real)
    return FreezeReport({p: tuple(v) for p, v in matches.items()})


def apply_freeze(model: nn.Module, patterns: list[str], source: str | None = None,
                 naming: str = "multimodal_simple") -> FreezeReport:
    """Set ``requires_grad=False`` on what the patterns match; error on a pattern that matches nothing.

    ``naming="llava"``: the patterns are matched against the llava model's names
    (``image_model.*``, ``projector_image_model.*``, ``text_model.*``)."""
    report = match_freeze_patterns(model, patterns, naming)
    unmatched = [
        Problem(source, f"model.freeze[{i}]", f"pattern {p!r} matches no parameter (names start "
                "with image_model.image_model_list, image_model.projection or text_model)")
        for i, p in enumerate(patterns) if not report.matches[p]
    ]
    if unmatched:
        raise UserError(unmatched)
    frozen = report.frozen
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return report


def component_of(name: str) -> str:
    """The user-facing component a parameter belongs to (for summaries)."""
    parts = name.split(".")
    if name.startswith("image_model.image_model_list."):
        kind = "encoder" if parts[3] == "0" else "projection"
        return f"image_model.image_model_list.{parts[2]} ({kind})"
    if name.startswith("image_model.projection"):
        return "image_model.projection (projector)"
    if name.startswith("text_model"):
        return "text_model (language model)"
    return parts[0]
