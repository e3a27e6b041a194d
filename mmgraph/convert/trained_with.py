"""What a native checkpoint was trained with: where its weights and params are, and the
tokenizer and conversation template of its training data.

- Source: a ``model_dir`` (its latest checkpoint under ``checkpoints/``), a checkpoint folder
  (``model_dir/checkpoints/ckpt-N``), a ``mmgraph convert`` output folder or a ``.safetensors``
  file.
- Params: ``--config``, else ``params.yaml`` beside the weights, else the model_dir's compile
  record (``MODEL_DIR/compile/report.json`` names the params file ``mmgraph run`` / ``compile``
  used; a relative name is tried from the working directory, then beside the model_dir).
- Tokenizer and template: ``--tokenizer`` / ``--template``, else the preprocessing record of the
  params' ``train_input.data_dir`` (``data_params.json``: ``processing.huggingface_tokenizer``,
  ``dataset.template`` / ``dataset.phase``), else a ``tokenizer/`` folder beside the weights or
  beside the data (as ``mmgraph data synth`` lays it out), and the template by the recorded
  phase (``plain`` for phase 1, else ``vicuna_v1``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mmgraph.core.config.layouts import normalize
from mmgraph.core.errors import Problem, UserError
from mmgraph.runtime import checkpoint

TEMPLATES = ("plain", "vicuna_v1", "chat")


@dataclass
class Located:
    weights: Path                      # what read_native reads (a folder or a .safetensors file)
    params: Optional[Path]             # None: read_native looks beside the weights
    model_dir: Optional[Path] = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainedWith:
    tokenizer: Optional[Path]
    template: str
    phase: Optional[int] = None
    image_token: str = "<image>"
    end_of_turn: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / "state.json").is_file() and (p / "model.safetensors").is_file()


def locate(src: Path, config: Optional[Path]) -> Located:
    """The weights and params of a native source (see the module docstring)."""

    model_dir = None
    weights = src
    notes: list[str] = []
    if src.is_dir() and (src / checkpoint.CHECKPOINTS).is_dir():
        last = checkpoint.latest(src)
        if last is None:
            raise UserError(Problem(str(src), None, "a model_dir with no finished checkpoint under checkpoints/"))
        model_dir, weights = src, last
        notes.append(f"{src}: model_dir: converting its latest checkpoint {last.name}")
    elif _is_checkpoint(src) and src.parent.name == checkpoint.CHECKPOINTS:
        model_dir = src.parent.parent
    if config is not None:
        return Located(weights, config, model_dir, notes)
    folder = weights if weights.is_dir() else weights.parent
    if (folder / "params.yaml").is_file() or model_dir is None:
        return Located(weights, None, model_dir, notes)
    params = params_from_compile_record(model_dir)
    notes.append(f"{model_dir}: params from its compile record: {params}")
    return Located(weights, params, model_dir, notes)


def params_from_compile_record(model_dir: Path) -> Path:
    report = model_dir / "compile" / "report.json"
    if not report.is_file():
        raise UserError(Problem(str(model_dir), None, "no params.yaml beside the checkpoint and no compile record "
                                "(compile/report.json); pass --config PARAMS"))
    try:
        name = json.loads(report.read_text(encoding="utf-8")).get("params")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise UserError(Problem(str(report), None, f"not a compile report ({err}); pass --config PARAMS")) from None
    if not isinstance(name, str) or not name:
        raise UserError(Problem(str(report), "params", "missing: pass --config PARAMS"))
    for cand in (Path(name), model_dir.parent / name, model_dir / name):
        if cand.is_file():
            return cand
    raise UserError(Problem(str(report), "params", f"{name!r} is not found (from the working directory or beside "
                            f"{model_dir}); pass --config PARAMS"))


def _data_dir(params: dict, params_path: Optional[str]) -> Optional[Path]:
    for section in ("train_input", "eval_input"):
        d = (params.get(section) or {}).get("data_dir")
        if isinstance(d, list):
            d = d[0] if d else None
        if isinstance(d, str) and d:
            p = Path(d)
            if not p.exists() and params_path and not p.is_absolute():
                p = Path(params_path).parent / d
            return p
    return None


def _has_tokenizer(p: Path) -> bool:
    return (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()


def _read_data_params(data_dir: Optional[Path]) -> tuple[dict, Optional[Path]]:
    if data_dir is None:
        return {}, None
    path = data_dir / "data_params.json"
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), None, f"not valid JSON ({err})")) from None
    return (data if isinstance(data, dict) else {}), path


def _record_tokenizer(record: dict, record_path: Path) -> Optional[Path]:
    name = (record.get("processing") or {}).get("huggingface_tokenizer")
    if not isinstance(name, str) or not name:
        return None
    for cand in (Path(name), record_path.parent / name, record_path.parent.parent / Path(name).name):
        if _has_tokenizer(cand):
            return cand
    raise UserError(Problem(str(record_path), "processing.huggingface_tokenizer",
                            f"{name!r}: no tokenizer folder there (pass --tokenizer DIR)"))


def trained_with(params: Optional[dict], params_path: Optional[str], weights: Path,
                 tokenizer: Optional[str] = None, template: Optional[str] = None,
                 known_tokenizer: Optional[Path] = None) -> TrainedWith:
    """The tokenizer and template the model was trained with (explicit overrides first)."""
    params = params or {}
    if "trainer" in params:                    # the 2.4+ layout: its data sections by their 2.3 names
        params = normalize(params).sections
    record, record_path = _read_data_params(_data_dir(params, params_path))
    dataset = record.get("dataset") or {}
    notes = []
    tok: Optional[Path] = None
    if tokenizer is not None:
        tok = Path(tokenizer)
        if not _has_tokenizer(tok):
            raise UserError(Problem(tokenizer, None, "not a tokenizer folder (--tokenizer)"))
    elif record_path is not None:
        tok = _record_tokenizer(record, record_path)
        if tok is not None:
            notes.append(f"{record_path}: tokenizer {tok}")
    if tok is None:
        tok = known_tokenizer or _nearby_tokenizer(weights, _data_dir(params, params_path))
    phase = dataset.get("phase")
    chosen = template or dataset.get("template") or dataset.get("style")
    if chosen is None:
        chosen = "plain" if phase == 1 else "vicuna_v1"
        where = f"{record_path}" if record_path else "the training data (no data_params.json)"
        notes.append(f"{where}: no template recorded; {chosen} (pass --template to choose)")
    if chosen not in TEMPLATES:
        where = (str(record_path), "dataset.template") if template is None else (None, "--template")
        raise UserError(Problem(where[0], where[1], f"{chosen!r}: the export reproduces {', '.join(TEMPLATES)}"))
    processing = record.get("processing") or {}
    return TrainedWith(tok, chosen, phase, image_token=processing.get("image_token") or dataset.get("image_token")
                       or "<image>", end_of_turn=processing.get("end_of_turn") or dataset.get("end_of_turn"),
                       notes=notes)


def _nearby_tokenizer(weights: Path, data_dir: Optional[Path]) -> Optional[Path]:
    """``tokenizer/`` beside the weights (convert output), or beside the data (``data synth``)."""
    folder = weights if weights.is_dir() else weights.parent
    cands = [folder / "tokenizer", folder.parent / "tokenizer", folder.parent.parent / "tokenizer"]
    if data_dir is not None:
        cands.append(data_dir.parent / "tokenizer")
    return next((c for c in cands if _has_tokenizer(c)), None)
