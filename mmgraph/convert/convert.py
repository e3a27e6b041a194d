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
  requires "llava" in the folder name; ``mm_vision_tower`` points at ``image_model``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from mmgraph.convert.checkpoint import TEXT, Checkpoint
from mmgraph.convert.io import parse_size
from mmgraph.convert.read import read_hf, read_native, read_two_folder
from mmgraph.convert.write import write_native, write_transformers, write_two_folder
from mmgraph.errors import Problem, UserError

FORMATS = {
    "native": "mmgraph weights (safetensors, Model Zoo names) + params.yaml",
    "hf": "Hugging Face: LlavaForConditionalGeneration folder, or image_model/ + text_model/ (read both)",
    "llava": "LLaVA repository layout: image_model/ + text_model_llava/ (mm_projector inside)",
}


def check(ck: Checkpoint) -> None:
    """Every parameter of the model present with the configured shape; nothing extra."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mmgraph.config import ModelConfig
    from mmgraph.models import build_model

    try:
        cfg = ModelConfig.model_validate(ck.model)
    except Exception as err:  # noqa: BLE001 - pydantic lists the problems
        raise UserError(Problem(None, "model", f"the derived params are not valid: {err}")) from None
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
    for k, e in ck.entries.items():
        if k not in expected:
            raise UserError(Problem(str(e.file), e.key, f"no such parameter in the configured model ({k})"))


def blockers(ck: Checkpoint, fmt: str, transformers_layout: bool) -> None:
    """Features with no Hugging Face / LLaVA equivalent stop conversion, naming the feature."""
    m = ck.model
    images = m.get("image_model_list", {})
    where = "params.yaml"
    if len(images.get("image_models", [])) != 1:
        raise UserError(Problem(where, "model.image_model_list.image_models", f"{len(images.get('image_models', []))} "
                                f"image encoders: {fmt} has one vision tower"))
    if images["image_models"][0].get("projection"):
        raise UserError(Problem(where, "model.image_model_list.image_models[0].projection",
                                f"a per-encoder projection has no {fmt} equivalent"))
    for section in ("train_input", "eval_input"):
        n = ((ck.params or {}).get(section) or {}).get("max_num_img", 1)
        if n and n > 1:
            raise UserError(Problem(where, f"{section}.max_num_img", f"{n} images per sample placed anywhere in "
                                    f"the text: {fmt} models take the LLaVA single-image layout"))
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
            model: str = "mm_simple") -> Path:
    if model != "mm_simple":
        raise UserError(Problem(None, "--model", f"{model!r}: mmgraph converts mm_simple (LLaVA-style) checkpoints"))
    for flag, fmt in (("--src-fmt", src_fmt), ("--tgt-fmt", tgt_fmt)):
        if fmt not in FORMATS:
            raise UserError(Problem(None, flag, f"unknown format {fmt!r}; one of {', '.join(FORMATS)}"))
    source, out = Path(src), Path(output_dir)
    if not source.exists():
        raise UserError(Problem(src, None, "does not exist"))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(Problem(output_dir, None, "exists and is not empty (choose a new --output-dir)"))
    if src_fmt == "native":
        ck = read_native(source, Path(config) if config else None)
    elif src_fmt == "hf":
        ck = read_hf(source)
    else:
        ck = read_two_folder(source)
    check(ck)
    layout = hf_layout or ("two_folder" if ck.source.get("layout") == "two_folder" else "llava")
    if tgt_fmt != "native":
        blockers(ck, tgt_fmt, tgt_fmt == "hf" and layout == "llava")
    shard_bytes = parse_size(shard_size)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if tgt_fmt == "native":
            write_native(ck, tmp, shard_bytes)
        elif tgt_fmt == "llava":
            write_two_folder(ck, tmp, shard_bytes, "text_model_llava")
        elif layout == "two_folder":
            write_two_folder(ck, tmp, shard_bytes, ck.source.get("text_folder", "text_model"))
        else:
            write_transformers(ck, tmp, shard_bytes, image_token_id)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def describe_formats() -> str:
    return "\n".join(f"  {k:7s} {v}" for k, v in FORMATS.items())

