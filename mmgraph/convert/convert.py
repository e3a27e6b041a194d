"""``mmgraph convert``: checkpoints between mmgraph (native), Hugging Face and the LLaVA
repository layout, tensor by tensor and bit for bit.

Formats (``mmgraph convert list``):
- ``native``: ``model.safetensors`` (or shards + index) with mmgraph's (Model Zoo) names, a full
  ``params.yaml``, ``convert.json`` (where it came from, so a round trip restores the source's
  key layout), the tokenizer files when known.
- ``hf``: read from either layout users have: the two-folder layout (``image_model/`` = CLIP
  vision, ``text_model/`` = LLaMA with the LLaVA ``config.json`` and the LLM's own
  ``config_lmsys.json``, projector from ``model.mm_projector.*`` keys or ``mm_projector.bin``,
  else initialized), or a transformers ``LlavaForConditionalGeneration`` folder (current or
  older key layout). Written as a ``LlavaForConditionalGeneration`` folder, or in the two-folder
  layout with ``--hf-layout two_folder`` (or when the source was).
- ``llava``: the LLaVA repository layout: ``image_model/`` and ``text_model_llava/`` (the loader
  requires "llava" in the folder name; ``mm_vision_tower`` is the written ``image_model``'s path).
- ``cs-X.Y`` (``cs-2.3`` ... ``cs-2.10``): the Model Zoo's own checkpoint, a real ``.mdl`` with the
  weight layout of that release's converters and the params in its layout (``modelzoo.py``).
  A ``cs-X.Y`` source that is mmgraph's safetensors (what ``cs-X.Y`` meant before) is read as
  ``native``, with a note.
The model is ``mm_simple`` (the Model Zoo's README) or ``mmsimple-llava`` (its registry's name),
or ``llava`` (the Model Zoo's llava model: the same weights under its names); without
``--model``, the source's.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

from mmgraph.convert.checkpoint import TEXT, Checkpoint
from mmgraph.convert.modelzoo import find_mdl, read_modelzoo, write_modelzoo
from mmgraph.convert.read import read_hf, read_native, read_two_folder
from mmgraph.convert.trained_with import locate, trained_with
from mmgraph.convert.write import default_params, write_native, write_transformers, write_two_folder
from mmgraph.core.config import ModelConfig
from mmgraph.core.config.checks import semantic_problems
from mmgraph.core.config.release import parse_release
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.tensorio import parse_size
from mmgraph.models import build_model

FORMATS = {
    "native": "mmgraph weights (safetensors, Model Zoo names) + params.yaml",
    "hf": "Hugging Face: LlavaForConditionalGeneration folder, or image_model/ + text_model/ (read both)",
    "llava": "LLaVA repository layout: image_model/ + text_model_llava/ (mm_projector inside)",
    "cs-X.Y": "the Model Zoo's checkpoint (cs-2.3 ... cs-2.10): a .mdl file with that release's weight layout and "
              "params; to hf it writes image_model/ + text_model/ as the Model Zoo does",
}
MODELS = ("mm_simple", "mmsimple-llava", "llava")
# Freeze patterns between the two models' names (models/freeze.py: LLAVA_NAMES).
_FREEZE_TO_LLAVA = (("^image_model.image_model_list", "^image_model"), ("^image_model.projection",
                                                                         "^projector_image_model"))
_CS = re.compile(r"cs-\d+\.\d+")


def format_name(flag: str, fmt: str) -> str:
    """The format a ``--src-fmt`` / ``--tgt-fmt`` value names (``cs-X.Y``: ``mdl``)."""
    if fmt in FORMATS and fmt != "cs-X.Y":
        return fmt
    if _CS.fullmatch(fmt):
        parse_release(fmt, flag)
        return "mdl"
    raise UserError(Problem(None, flag, f"unknown format {fmt!r}; one of native, hf, llava, cs-X.Y (e.g. cs-2.10)"))


def check(ck: Checkpoint) -> None:
    """Every parameter of the model present with the configured shape; nothing extra."""
    from torch._subclasses.fake_tensor import FakeTensorMode


    try:
        cfg = ModelConfig.model_validate(ck.model)
    except Exception as err:  # noqa: BLE001 - pydantic lists the problems
        raise UserError(Problem(ck.config_file, "model", f"the params are not valid: {err}")) from None
    problems = semantic_problems(ck.config_file, {"model": cfg})    # check's limits, before anything is built
    if problems:
        raise UserError(problems)
    ck.cfg = cfg
    model, _ = build_model(cfg, fake_mode=FakeTensorMode())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = cfg.text_model.share_embedding_weights
    for k, shape in expected.items():
        e = ck.entries.get(k)
        if e is None:
            if tied and k == TEXT + "lm_head.weight":
                continue
            raise UserError(Problem(None, k, "missing from the checkpoint"))
        if e.shape != shape:
            raise UserError(Problem(str(e.file), e.key, f"shape {e.shape} does not match the config's {shape} "
                                    f"(mmgraph {k})"))
        if not e.dtype.is_floating_point:
            raise UserError(Problem(str(e.file), e.key, f"dtype {str(e.dtype).removeprefix('torch.')}: a weight "
                                    f"must be floating point (mmgraph {k})"))
    for k, e in ck.entries.items():
        if k not in expected:
            raise UserError(Problem(str(e.file), e.key, f"no such parameter in the configured model ({k})"))


def _as_model(ck: Checkpoint, name: str) -> None:
    """The Model Zoo model the checkpoint is written as (``--model``): the llava model or
    multimodal_simple; the same weights, other names (in a .mdl) and freeze patterns."""
    if ck.model.get("name", "multimodal_simple") == name:
        return
    images = ck.model.get("image_model_list") or {}
    models = images.get("image_models") or []
    if name == "llava" and (len(models) != 1 or images.get("connector") or (isinstance(models[0], dict) and len(
            models[0].get("image_model") or []) > 1)):
        raise UserError(Problem(ck.config_file, "model.image_model_list", "--model llava: the llava model has one "
                                "image encoder and one projector (no per-encoder projection, no connector)"))
    pairs = _FREEZE_TO_LLAVA if name == "llava" else tuple((b, a) for a, b in _FREEZE_TO_LLAVA)
    freeze = ck.model.get("freeze") or []
    freeze = [freeze] if isinstance(freeze, str) else freeze
    moved = []
    for pattern in freeze:
        for old, new in pairs:
            if pattern.startswith(old):
                pattern = new + pattern[len(old):]
                break
        moved.append(pattern)
    ck.model = {**ck.model, "name": name, "freeze": moved}
    if ck.params is not None:                 # the model section is the one written out
        ck.params = None
        ck.notes.append(f"--model {name}: the params are written from the model section alone (data, optimizer "
                        "and runconfig sections to edit)")


def blockers(ck: Checkpoint, fmt: str, transformers_layout: bool) -> None:
    """Features with no Hugging Face / LLaVA equivalent stop conversion, naming the feature and
    the params file it is set in (``--config``, or the source's ``params.yaml``)."""
    m = ck.model
    images = m.get("image_model_list", {})
    where = ck.config_file or "params.yaml"
    vit = ck.cfg.image_model_list.image_models[0].encoder if len(images.get("image_models", [])) == 1 else None
    if vit is not None and not vit.use_conv_patchified_embedding:
        raise UserError(Problem(where, "model.image_model_list.image_models[0].image_model[0]."
                                "use_conv_patchified_embedding", f"false (a Linear patch embedding): {fmt}'s CLIP "
                                "vision tower patchifies with a convolution"))
    if len(images.get("image_models", [])) != 1:
        raise UserError(Problem(where, "model.image_model_list.image_models", f"{len(images.get('image_models', []))} "
                                f"image encoders: {fmt} has one vision tower"))
    if images["image_models"][0].get("projection"):
        raise UserError(Problem(where, "model.image_model_list.image_models[0].projection",
                                f"a per-encoder projection has no {fmt} equivalent"))
    # Several images per sample (max_num_img > 1) convert: transformers' LLaVA and the LLaVA
    # repository take one <image> per image anywhere in the prompt; the weights are the same.
    if images.get("connector"):
        raise UserError(Problem(where, "model.image_model_list.connector", f"an MM1 connector "
                                f"({images['connector'].get('name', '?')}) has no {fmt} equivalent"))
    text = m.get("text_model", {})
    if (text.get("extra_ffn_params") or {}).get("static_dual_expert"):
        raise UserError(Problem(where, "model.text_model.extra_ffn_params.static_dual_expert",
                                f"visual experts have no {fmt} equivalent"))
    proj = images.get("global_image_projection") or {}
    units = proj.get("layers_units", [])
    acts = proj.get("layers_activation", [])
    if transformers_layout and len(units) != 2:
        raise UserError(Problem(where, "model.image_model_list.global_image_projection.layers_units",
                                f"a {len(units)}-layer projector: transformers' LLaVA projector has 2 layers"))
    if any(a not in ("gelu", None) for a in acts):
        raise UserError(Problem(where, "model.image_model_list.global_image_projection.layers_activation",
                                f"{acts}: LLaVA projectors use gelu"))


def convert(src: str, src_fmt: str, tgt_fmt: str, output_dir: str, config: Optional[str] = None,
            hf_layout: Optional[str] = None, shard_size: str = "5GB", image_token_id: Optional[int] = None,
            model: Optional[str] = None, tokenizer: Optional[str] = None, template: Optional[str] = None) -> Path:
    if model is not None and model not in MODELS:
        raise UserError(Problem(None, "--model", f"{model!r}: mmgraph converts LLaVA-style checkpoints "
                                f"({', '.join(MODELS[:-1])} or {MODELS[-1]})"))
    src_kind, tgt_kind = format_name("--src-fmt", src_fmt), format_name("--tgt-fmt", tgt_fmt)
    source, out = Path(src), Path(output_dir)
    if not source.exists():
        raise UserError(Problem(src, None, "does not exist"))
    _check_output(out, output_dir)
    cfg_path = Path(config) if config else None
    trained = None
    if src_kind == "mdl" and find_mdl(source) is None and (source.suffix == ".safetensors" or source.is_dir()):
        src_kind = "native"                     # what cs-X.Y named before it meant the real .mdl
        compat = (f"{src}: mmgraph's safetensors, read as --src-fmt native ({src_fmt} now names the Model Zoo's "
                  ".mdl)")
    else:
        compat = None
    if src_kind == "mdl":
        ck = read_modelzoo(source, cfg_path)
        if tgt_kind != "native" or tokenizer or template:
            trained = trained_with(ck.params, str(cfg_path or find_mdl(source)), source, tokenizer, template,
                                   ck.tokenizer)
    elif src_kind == "native":
        where = locate(source, cfg_path)
        ck = read_native(where.weights, where.params)
        ck.notes[:0] = where.notes
        if tgt_kind != "native" or tokenizer or template:
            trained = trained_with(ck.params, ck.config_file, where.weights, tokenizer, template, ck.tokenizer)
    elif src_kind == "hf":
        ck = read_hf(source, cfg_path)
    else:
        ck = read_two_folder(source)
    if compat:
        ck.notes.insert(0, compat)
    if trained is None and (tokenizer or template):
        trained = trained_with(None, None, source, tokenizer, template, ck.tokenizer)
    if trained is not None:
        ck.tokenizer = trained.tokenizer
        ck.notes += trained.notes
    if model is not None:
        _as_model(ck, "llava" if model == "llava" else "multimodal_simple")
    check(ck)
    remembered = ck.source.get("layout")
    model_zoo_default = "two_folder" if _CS.fullmatch(src_fmt) and remembered is None else "llava"
    layout = hf_layout or ("two_folder" if remembered == "two_folder" else model_zoo_default)
    if tgt_kind not in ("native", "mdl"):
        blockers(ck, tgt_fmt, tgt_kind == "hf" and layout == "llava")
    shard_bytes = parse_size(shard_size)
    for note in ck.notes:
        print(f"mmgraph: note: {note}", file=sys.stderr)
    shown = len(ck.notes)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if tgt_kind == "native":
            write_native(ck, tmp, shard_bytes)
        elif tgt_kind == "mdl":
            write_modelzoo(ck, tmp, parse_release(tgt_fmt, "--tgt-fmt"), default_params)
        elif tgt_kind == "llava":
            write_two_folder(ck, tmp, shard_bytes, "text_model_llava", out)
        elif layout == "two_folder":
            write_two_folder(ck, tmp, shard_bytes, ck.source.get("text_folder", "text_model"), out)
        else:
            write_transformers(ck, tmp, shard_bytes, image_token_id, trained)
        _check_output(out, output_dir)                  # nothing appeared there meanwhile
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        for note in ck.notes[shown:]:                   # what writing found (transforms not carried over)
            print(f"mmgraph: note: {note}", file=sys.stderr)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_output(out: Path, given: str) -> None:
    """``--output-dir`` must be new or an empty folder, and not a symlink (nothing is written
    through one)."""
    if out.is_symlink():
        raise UserError(Problem(given, None, "is a symlink (give a new folder: nothing is written through a link)"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(Problem(given, None, "exists and is not empty (choose a new --output-dir)"))


def describe_formats() -> str:
    return "\n".join(f"  {k:7s} {v}" for k, v in FORMATS.items())


def describe() -> str:
    """``mmgraph convert list``: the models and formats."""
    return (f"models (--model): {', '.join(MODELS)} (the same converter: CLIP vision + projector + LLaMA)\n"
            f"formats (--src-fmt / --tgt-fmt):\n{describe_formats()}")

