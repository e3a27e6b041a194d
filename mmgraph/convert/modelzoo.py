"""The Model Zoo's own checkpoint, ``cs-X.Y``: a real ``.mdl`` (``cstorch.save``) with the weight
layout of that release's converters (``mmgraph.core.mdl_layout``) and the params written in
that release's layout (``mmgraph.core.config.release``).

Read: a ``.mdl`` file, or a folder holding one (``checkpoint_<N>.mdl``: the highest N). The params
are ``--config``, else the ones the .mdl embeds (``__metadata__``: every Model Zoo checkpoint
carries the params it was trained with). Only the model's weights convert; the optimizer,
scheduler and data-loader states stay behind (``mmgraph run --checkpoint_path`` reads the
optimizer state).

Written: ``OUT/model_to_cs-X.Y.mdl`` (as the Model Zoo's converter names its output,
``<checkpoint>_to_<format>.mdl``) holding ``model`` (every key the trainer's strict loading
wants, ``ln_f`` included), ``global_step: 0`` and ``__metadata__`` (release, model class,
params), and ``OUT/params_to_cs-X.Y.yaml`` (the same params). The Model Zoo trainer takes the file
as its ``checkpoint_path`` and starts from these weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import yaml

from mmgraph.convert.checkpoint import Checkpoint, _maybe_json
from mmgraph.core import mdl
from mmgraph.core.config import ModelConfig
from mmgraph.core.config.release import (model_class, params_for_release, sections_of, version_string)
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.mdl_layout import from_modelzoo, to_modelzoo

_STEP = re.compile(r"checkpoint_(\d+)\.mdl$")


def find_mdl(src: Path) -> Optional[Path]:
    """The .mdl a source names: the file itself, or the newest ``checkpoint_<N>.mdl`` (else the
    only ``.mdl``) in a folder; None when there is none."""
    if src.is_file():
        return src if mdl.is_mdl(src) else None
    if not src.is_dir():
        return None
    found = sorted(p for p in src.iterdir() if p.suffix == ".mdl" and p.is_file())
    numbered = [p for p in found if _STEP.match(p.name)]
    if numbered:
        return max(numbered, key=lambda p: int(_STEP.match(p.name).group(1)))
    if len(found) > 1:
        raise UserError(Problem(str(src), None, f"{len(found)} .mdl files here ({', '.join(p.name for p in found[:4])}"
                                "); name the one to convert"))
    return found[0] if found else None


def _params_file(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), None, f"not a valid YAML file ({str(err).splitlines()[0]})")) from None
    if not isinstance(raw, dict):
        raise UserError(Problem(str(path), None, "not a params file (a mapping of sections)"))
    return raw


def model_config(raw: dict, where: str) -> tuple[dict, ModelConfig]:
    """The normalized model section of a params dict (any layout) and its validated config."""
    sections = sections_of(raw, where)
    model = sections.get("model")
    if not isinstance(model, dict):
        raise UserError(Problem(where, "model", "missing (a params file with a model section)"))
    try:
        return model, ModelConfig.model_validate(model)
    except Exception as err:  # noqa: BLE001 - pydantic lists the problems
        raise UserError(Problem(where, "model", f"the params are not valid: {err}")) from None


def embedded_params(file: mdl.MdlFile) -> Optional[dict]:
    meta = file.metadata
    params = meta.get("params") if meta else None
    return params if isinstance(params, dict) else None


def read_modelzoo(src: Path, config: Optional[Path]) -> Checkpoint:
    path = find_mdl(src)
    if path is None:
        raise UserError(Problem(str(src), None, "no .mdl checkpoint here (a Model Zoo checkpoint_<N>.mdl)"))
    file = mdl.read(path)
    if config is not None:
        raw, where = _params_file(config), str(config)
    else:
        raw, where = embedded_params(file), f"{path}: __metadata__.params"
        if raw is None:
            raise UserError(Problem(str(path), "__metadata__", "no params in this .mdl: pass --config PARAMS"))
    model, cfg = model_config(raw, where)
    state = file.subtree("model")
    if not isinstance(state, dict) or not state:
        raise UserError(Problem(str(path), "model", "no model state dict in this checkpoint"))
    entries = dict(from_modelzoo(state, cfg, str(path)))
    folder = path.parent
    meta = _maybe_json(folder / "convert.json") or {}
    release = (file.metadata or {}).get("version")
    notes = [f"{path}: the optimizer, scheduler and data-loader states are not converted (only the model's "
             "weights)"] if file.subtree("optimizer") else []
    tok = folder / "tokenizer"
    source = dict(meta.get("source") or {})
    source.setdefault("modelzoo_release", release)
    return Checkpoint(entries, model, source, tokenizer=tok if tok.is_dir() else None,
                      preprocessor=meta.get("preprocessor"), params=raw, config_file=where, notes=notes)


def write_modelzoo(ck: Checkpoint, out: Path, release: tuple[int, int], default_params) -> Path:
    """``model_to_cs-X.Y.mdl`` and ``params_to_cs-X.Y.yaml`` in ``out`` (a fresh temporary folder)."""
    from mmgraph.convert.write import _copy_tokenizer

    fmt = f"cs-{release[0]}.{release[1]}"
    raw = ck.params
    sections = sections_of(raw, ck.config_file or "params.yaml") if raw is not None else default_params(ck)
    params = params_for_release(raw, sections, ck.cfg, release)
    state = {"model": to_modelzoo(ck.entries, ck.cfg), "global_step": 0,
             "__metadata__": [{"version": version_string(release), "model_name": model_class(ck.cfg),
                               "params": params}]}
    target = out / f"model_to_{fmt}.mdl"
    mdl.write(target, state, version_string(release))
    (out / f"params_to_{fmt}.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (out / "convert.json").write_text(json.dumps({"source": ck.source, "preprocessor": ck.preprocessor},
                                                 indent=2) + "\n")
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, out / "tokenizer")
    return target
