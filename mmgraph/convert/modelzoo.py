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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml

from mmgraph.convert.checkpoint import Checkpoint, _maybe_json
from mmgraph.convert.write import _copy_tokenizer
from mmgraph.core import mdl
from mmgraph.core.config import ModelConfig
from mmgraph.core.config.release import model_class, params_for_release, sections_of, version_string
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.mdl_layout import FINAL_NORM, LN_F, from_modelzoo, modelzoo_name, native_name, to_modelzoo, transform
from mmgraph.core.tensorio import Entry

_STEP = re.compile(r"checkpoint_(\d+)\.mdl$")


def find_mdl(src: Path) -> Optional[Path]:
    """The .mdl a source names: the file itself, or the newest ``checkpoint_<N>.mdl`` (else the
    only ``.mdl``) in a folder; None when there is none."""
    if src.is_file():
        return src if src.suffix == ".mdl" or mdl.is_mdl(src) else None
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


def is_modelzoo_checkpoint(path: str | Path) -> bool:
    """A Model Zoo .mdl: a file, or a folder of ``checkpoint_<N>.mdl`` that is not one of
    mmgraph's (no ``checkpoints/``, no ``model.safetensors``)."""
    p = Path(path)
    if p.is_dir() and ((p / "checkpoints").is_dir() or (p / "model.safetensors").is_file()
                       or (p / "model.safetensors.index.json").is_file()):
        return False
    return p.suffix == ".mdl" or find_mdl(p) is not None


def model_weights(src: Path, cfg: ModelConfig,
                  shapes: Optional[dict[str, tuple[int, ...]]] = None) -> dict[str, torch.Tensor]:
    """The model's weights of a .mdl, in mmgraph's names and layout. ``shapes``: what the model
    holds; a tensor of another shape is refused before anything is read (the caller checks the
    rest: missing and extra keys, with its own strictness)."""
    path = find_mdl(src)
    if path is None:
        raise UserError(Problem(str(src), None, "no .mdl checkpoint here"))
    state = mdl.read(path).subtree("model")
    if not isinstance(state, dict) or not state:
        raise UserError(Problem(str(path), "model", "no model state dict in this checkpoint"))
    entries = from_modelzoo(state, cfg, str(path))
    if shapes is not None:
        bad = [Problem(str(path), f"model.{modelzoo_name(k, cfg)}", f"shape {list(e.shape)} does not match the "
                       f"params' {list(shapes[k])} (mmgraph {k})") for k, e in entries.items()
               if k in shapes and tuple(e.shape) != tuple(shapes[k])]
        if bad:
            raise UserError(bad)
    return {k: e.load() for k, e in entries.items()}


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


# ---------------------------------------------------------------------------------------------
# a training run's start (`mmgraph run --checkpoint_path X.mdl`)
# ---------------------------------------------------------------------------------------------


@dataclass
class MdlStart:
    """What a run takes from a .mdl: weights (mmgraph's names and layout), and where the
    checkpoint's states are asked for and match, the optimizer state (``Optimizer.state_dict``
    form) and the step."""

    path: Path
    weights: dict[str, torch.Tensor]
    optimizer: Optional[dict] = None
    step: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def _states(value: Optional[str]) -> set[str]:
    """``load_checkpoint_states`` as the Model Zoo reads it: unset or ``all`` is every state."""
    if value is None or value.strip() == "all":
        return {"model", "optimizer", "global_step", "schedulers", "dataloader"}
    return {s.strip() for s in value.split(",") if s.strip()}


def training_start(src: Path, cfg: ModelConfig, states: Optional[str], trainable: list[str],
                   no_decay: frozenset[str], optimizer_type: Optional[str],
                   shapes: Optional[dict[str, tuple[int, ...]]] = None) -> MdlStart:
    path = find_mdl(src)
    if path is None:
        raise UserError(Problem(str(src), None, "no .mdl checkpoint here"))
    out = MdlStart(path, model_weights(path, cfg, shapes))
    file = mdl.read(path)
    wanted = _states(states)
    state = file.subtree("model")
    step = file.subtree("global_step")
    if "global_step" in wanted and isinstance(step, int) and not isinstance(step, bool) and step > 0:
        out.step = step
    if "optimizer" in wanted and out.step:
        try:
            out.optimizer = _optimizer_state(file, state, cfg, trainable, no_decay, optimizer_type, out.step)
        except _Mismatch as why:
            out.notes.append(f"{path}: optimizer state not loaded ({why}); the optimizer starts afresh")
    if "dataloader" in wanted and out.step:
        out.notes.append(f"{path}: the data continue at step {out.step}'s batch (the sampler's own state is "
                         "not read)")
    return out


class _Mismatch(Exception):
    pass


def _param_order(state: dict, cfg: ModelConfig) -> list[str]:
    """mmgraph's names in the Model Zoo's ``named_parameters`` order (the state dict's order,
    each parameter once: ``ln_f`` is the final norm's first name)."""

    seen: list[str] = []
    for key in state:
        name = native_name(key, cfg)
        if name is not None and name.startswith(LN_F):
            name = FINAL_NORM + name[len(LN_F):]
        if name is not None and name not in seen:
            seen.append(name)
    return seen


def _optimizer_state(file: mdl.MdlFile, state: dict, cfg: ModelConfig, trainable: list[str],
                     no_decay: frozenset[str], optimizer_type: Optional[str], step: int) -> Optional[dict]:
    """The .mdl's optimizer state under mmgraph's names and layout: its state is indexed in the
    order of its param groups (group 0 decayed, group 1 not: ``optim_utils.py``
    ``_partition_params_groups_with_weight_decay``), each in ``named_parameters`` order."""

    opt = file.subtree("optimizer")
    if not isinstance(opt, dict) or not opt.get("state"):
        raise _Mismatch("the checkpoint has none")
    if optimizer_type not in ("Adam", "AdamW"):
        raise _Mismatch(f"the params' optimizer is {optimizer_type}; Adam / AdamW states are read")
    wanted = set(trainable)
    order = [n for n in _param_order(state, cfg) if n in wanted]
    if set(order) != wanted:
        raise _Mismatch(f"{len(wanted - set(order))} trainable weights are not in the checkpoint")
    groups = [[n for n in order if n not in no_decay], [n for n in order if n in no_decay]]
    names = groups[0] + groups[1]
    theirs = [g.get("params") for g in opt.get("param_groups") or [] if isinstance(g, dict)]
    ours = [list(range(len(groups[0]))), list(range(len(groups[0]), len(names)))]
    if [list(p) for p in theirs if p] != [p for p in ours if p]:
        raise _Mismatch(f"its param groups hold {[len(p or []) for p in theirs]} weights, the params train "
                        f"{[len(p) for p in ours]} (decayed, not decayed)")
    out: dict = {"step_count": torch.tensor(step)}
    for index, name in enumerate(names):
        entry = opt["state"].get(index)
        if not isinstance(entry, dict):
            raise _Mismatch(f"no state for weight {index} ({name})")
        fn = transform(name, cfg, False)
        for key in ("exp_avg", "exp_avg_sq"):
            e = entry.get(key)
            shape = tuple(state[modelzoo_name(name, cfg)].shape)
            if not isinstance(e, Entry) or tuple(e.shape) != shape:
                raise _Mismatch(f"optimizer.state.{index}.{key} is not a {list(shape)} tensor ({name})")
            t = e.load()
            out[f"{name}::{key}"] = fn(t) if fn else t
    return out
