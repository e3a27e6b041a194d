"""A checkpoint in flight between formats, and the names every format shares."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from mmgraph.core.tensorio import Entry
from mmgraph.core.errors import Problem, UserError

VIT = "image_model.image_model_list.0.0."
PROJ = "image_model.projection."
TEXT = "text_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "chat_template.jinja")
# Keys checkpoints carry that are not weights (recomputed by every loader).
_BUFFERS = ("position_ids", "rotary_emb.inv_freq")


@dataclass
class Checkpoint:
    """A checkpoint in flight: native names -> lazily read tensors, and its configuration."""

    entries: dict[str, Entry]
    model: dict                                   # the params' model section
    source: dict = field(default_factory=dict)    # layout facts for writing back the same keys
    tokenizer: Optional[Path] = None
    preprocessor: Optional[dict] = None
    params: Optional[dict] = None                 # a whole params file, when the source had one
    config_file: Optional[str] = None             # the file the model section came from (errors name it)
    notes: list[str] = field(default_factory=list)  # what the conversion does not carry over
    cfg: Any = None                               # the validated ModelConfig (set by convert.check)


def _json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(Problem(str(path), None, "does not exist"))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), None, f"not valid JSON ({err})")) from err
    if not isinstance(data, dict):
        raise UserError(Problem(str(path), None, f"holds a JSON {type(data).__name__}, not an object"))
    return data


def _maybe_json(path: Path) -> Optional[dict]:
    return _json(path) if path.is_file() else None
