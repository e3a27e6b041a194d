"""Reading checkpoints: Hugging Face (two-folder and transformers layouts), LLaVA, native."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from mmgraph.convert.checkpoint import _BUFFERS, PROJ, TEXT, TOKENIZER_FILES, VIT, Checkpoint, _json, _maybe_json
from mmgraph.convert.hf_params import llava_model_params
from mmgraph.convert.keys import CLIP_VISION, LLAMA, LLAVA_PROJECTOR
from mmgraph.convert.llava_cfg import FREEZE_VISION, anyres_note, read_llava_config
from mmgraph.core.config import ModelConfig
from mmgraph.core.config.release import sections_of
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.mdl import is_mdl
from mmgraph.core.tensorio import Entry, find_weights, read_entries
from mmgraph.models.build import init_projector


def _rename(entries: dict[str, Entry], fn: Callable[[str], Optional[str]], into: dict[str, Entry]) -> None:
    for key, e in entries.items():
        if key.endswith(_BUFFERS):
            continue
        new = fn(key)
        if new is None:
            raise UserError(Problem(str(e.file), key, "no mmgraph parameter corresponds to this key"))
        into[new] = e



def read_hf(src: Path, config: Optional[Path] = None) -> Checkpoint:
    """``config`` (``--config``): where the configs are when not beside the weights: a folder of
    the same layout, or a transformers ``config.json``."""
    if config is not None and not config.exists():
        raise UserError(Problem(str(config), None, "does not exist (--config)"))
    if (src / "image_model").is_dir() and _text_folder(src) is not None:
        if config is not None and not config.is_dir():
            raise UserError(Problem(str(config), None, "--config for an image_model/ + text_model/ source is the "
                                    "folder holding their configs (usually the source itself)"))
        return read_two_folder(src, config)
    cfg_path = config if config is not None and config.is_file() else (config or src) / "config.json"
    if cfg_path.is_file() and _json(cfg_path).get("model_type") in ("llava", "llava_next"):
        return read_transformers(src, cfg_path)
    raise UserError(Problem(str(src), None, "neither a LlavaForConditionalGeneration folder (config.json with "
                            "model_type llava) nor image_model/ + text_model/"))


def _section(cfg: dict, key: str, path: Path) -> dict:
    """A nested config (``text_config``, ``vision_config``): an object, or empty when absent."""
    value = cfg.get(key) or {}
    if not isinstance(value, dict):
        raise UserError(Problem(str(path), key, f"a JSON {type(value).__name__}, not an object"))
    return value


def _text_folder(src: Path) -> Optional[Path]:
    for name in ("text_model", "text_model_llava"):
        if (src / name).is_dir():
            return src / name
    cands = [p for p in sorted(src.iterdir()) if p.is_dir() and p.name.startswith("text_model")] if src.is_dir() else []
    return cands[0] if cands else None


def read_two_folder(src: Path, config_root: Optional[Path] = None) -> Checkpoint:
    """``image_model/`` + ``text_model*/``; configs from ``config_root`` (same layout) if given."""
    image_dir, text_dir = src / "image_model", _text_folder(src)
    cfg_root = config_root or src
    cfg_image, cfg_text = cfg_root / "image_model", cfg_root / text_dir.name
    vision_cfg = _json(cfg_image / "config.json")
    if "vision_config" in vision_cfg:                                  # a full CLIPConfig also works
        vision_cfg = _section(vision_cfg, "vision_config", cfg_image / "config.json")
    llava_path = cfg_text / "config.json"
    llava_cfg = _json(llava_path)
    lmsys = cfg_text / "config_lmsys.json"
    text_cfg = _json(lmsys) if lmsys.is_file() else llava_cfg
    settings = read_llava_config(llava_cfg, vision_cfg.get("hidden_size"), str(llava_path))
    projector_type = settings.projector_type
    model = _model_params(vision_cfg, text_cfg, projector_type, settings.select_layer, settings.select_feature,
                          llava_path)
    model["freeze"] = settings.freeze

    entries: dict[str, Entry] = {}
    vision = read_entries(find_weights(image_dir))
    prefixed = any(k.startswith("vision_model.") for k in vision)
    vision = {k: e for k, e in vision.items() if not k.startswith(("text_model.", "visual_projection.",
                                                                     "text_projection.", "logit_scale"))}
    _rename(vision, lambda k: _prefixed(VIT, CLIP_VISION.to_native(k)), entries)
    text = read_entries(find_weights(text_dir))
    phase1 = text_dir / "mm_projector.bin"
    if phase1.is_file():
        text.update(read_entries([phase1]))
    projector = {k: e for k, e in text.items() if ".mm_projector." in f".{k}"}
    dropped = [k for k in text if k.startswith("model.vision_tower.") or k in _NEWLINE_KEYS]
    note = anyres_note(llava_cfg, str(llava_path), newline_weight=any(k in _NEWLINE_KEYS for k in text))
    text = {k: e for k, e in text.items() if k not in projector and k not in dropped}
    _rename(text, lambda k: _prefixed(TEXT, LLAMA.to_native(k)), entries)
    _rename(projector, lambda k: _prefixed(PROJ, _llava_projector_to_native(k, projector_type)), entries)
    source = {"layout": "two_folder", "vision_prefix": "vision_model." if prefixed else "",
              "text_folder": text_dir.name, "projector_in_text": bool(projector) and not phase1.is_file(),
              "llava_config": llava_cfg, "vision_config": vision_cfg, "text_config": text_cfg}
    _set_precision(model, entries)
    ck = Checkpoint(entries, model, source, tokenizer=_tokenizer_dir(text_dir),
                    preprocessor=_maybe_json(cfg_image / "preprocessor_config.json"),
                    config_file=str(llava_path), notes=[note] if note else [])
    if not projector:
        _init_projector(ck)
    return ck


def read_transformers(src: Path, cfg_path: Optional[Path] = None) -> Checkpoint:
    cfg_path = cfg_path or src / "config.json"
    cfg = _json(cfg_path)
    vision_cfg, text_cfg = _section(cfg, "vision_config", cfg_path), _section(cfg, "text_config", cfg_path)
    if vision_cfg.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise UserError(Problem(str(cfg_path), "vision_config.model_type",
                                f"{vision_cfg.get('model_type')!r}: only CLIP vision towers convert"))
    if text_cfg.get("model_type", "llama") != "llama":
        raise UserError(Problem(str(cfg_path), "text_config.model_type",
                                f"{text_cfg.get('model_type')!r}: only LLaMA language models convert"))
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UserError(Problem(str(cfg_path), "projector_hidden_act", f"{act!r}: only gelu converts"))
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UserError(Problem(str(cfg_path), "vision_feature_layer",
                                "several feature layers have no mmgraph equivalent"))
    select = "patch" if cfg.get("vision_feature_select_strategy", "default") == "default" else "cls_patch"
    if "tie_word_embeddings" in cfg:
        text_cfg = {**text_cfg, "tie_word_embeddings": cfg["tie_word_embeddings"]}
    model = _model_params(vision_cfg, text_cfg, "mlp2x_gelu", layer, select, cfg_path)
    model["freeze"] = [FREEZE_VISION]                 # the Model Zoo's default (tune_mm_mlp_adapter false)
    raw = read_entries(find_weights(src))
    notes = []
    if cfg.get("model_type") == "llava_next" or any(k in _NEWLINE_KEYS for k in raw):
        notes.append(anyres_note({"image_aspect_ratio": "anyres", **cfg}, str(cfg_path),
                                 newline_weight=any(k in _NEWLINE_KEYS for k in raw)))
    current = any(k.startswith("model.language_model.") for k in raw)
    vision_prefix = ""
    entries: dict[str, Entry] = {}
    for key, e in raw.items():
        if key.endswith(_BUFFERS) or key in _NEWLINE_KEYS:
            continue
        new = None
        for head in ("model.vision_tower.", "vision_tower."):
            if key.startswith(head):
                rest = key[len(head):]
                if rest.startswith("vision_model."):
                    vision_prefix = "vision_model."
                new = _prefixed(VIT, CLIP_VISION.to_native(rest))
        for head in ("model.multi_modal_projector.", "multi_modal_projector."):
            if key.startswith(head):
                new = _prefixed(PROJ, LLAVA_PROJECTOR.to_native(key[len(head):]))
        if key.startswith("model.language_model."):
            new = _prefixed(TEXT, LLAMA.to_native("model." + key[len("model.language_model."):]))
        elif key.startswith("language_model."):
            new = _prefixed(TEXT, LLAMA.to_native(key[len("language_model."):]))
        elif key.startswith("lm_head."):
            new = _prefixed(TEXT, LLAMA.to_native(key))
        if new is None:
            raise UserError(Problem(str(e.file), key, "no mmgraph parameter corresponds to this key"))
        entries[new] = e
    source = {"layout": "transformers", "style": "current" if current else "legacy", "vision_prefix": vision_prefix,
              "config": cfg}
    _set_precision(model, entries)
    return Checkpoint(entries, model, source, tokenizer=_tokenizer_dir(src),
                      preprocessor=_maybe_json(cfg_path.parent / "preprocessor_config.json"),
                      config_file=str(cfg_path), notes=notes)


def read_native(src: Path, config: Optional[Path]) -> Checkpoint:
    """A native folder (params.yaml + weights), a training checkpoint folder or a .safetensors
    file; ``config`` (``--config``) is the params file, else the folder's ``params.yaml``.
    Errors about the model name that file."""
    folder = src if src.is_dir() else src.parent
    params_path = config or folder / "params.yaml"
    if not params_path.is_file():
        raise UserError(Problem(str(params_path), None, "does not exist (pass --config PARAMS)"))
    params, model = _read_params(params_path)
    if src.is_file() and (src.suffix == ".mdl" or is_mdl(src)):
        raise UserError(Problem(str(src), None, "a Cerebras .mdl checkpoint: convert it with --src-fmt cs-X.Y "
                                "(e.g. cs-2.10)"))
    files = [src] if src.is_file() else find_weights(src)
    entries = read_entries(files)
    meta = _maybe_json(folder / "convert.json") or {}
    notes = _complete_from_weights(model, entries, str(params_path))
    if isinstance(params.get("model"), dict) and params["model"] is not model:
        _complete_from_weights(params["model"], entries, str(params_path))     # the params.yaml written out
    tok = folder / "tokenizer"
    return Checkpoint(entries, model, meta.get("source", {}), tokenizer=tok if tok.is_dir() else None,
                      preprocessor=meta.get("preprocessor"), params=params, config_file=str(params_path),
                      notes=notes)


def _read_params(path: Path) -> tuple[dict, dict]:
    """The params file and its model section, through the translation ``check`` and ``run``
    apply: the 2.3 layout's ``model``, the ``trainer:`` layout's ``trainer.init.model``
    (``image_encoder`` / ``projection_layer``), the llava model's keys."""
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path), None, f"not a valid YAML file ({str(err).splitlines()[0]})")) from None
    if not isinstance(params, dict):
        raise UserError(Problem(str(path), "model", "missing (a params file with a model section)"))
    model = sections_of(params, str(path)).get("model")
    if not isinstance(model, dict):
        raise UserError(Problem(str(path), "model", "missing (a params file with a model section)"))
    if model == params.get("model"):
        model = params["model"]                 # the same mapping: what the weights fill in is written back
    return params, model


def _complete_from_weights(model: dict, entries: dict[str, Entry], where: str) -> list[str]:
    """Keys the params leave to a default but the weights decide (the patch embedding's kind, the
    projector's biases): taken from the weights, so a params file written before the defaults
    changed still describes its checkpoint. Returns a note per key filled in."""
    notes = []
    encoders = ((model.get("image_model_list") or {}).get("image_models") or [])
    for i, entry in enumerate(encoders):
        vit = (entry.get("image_model") or [None])[0] if isinstance(entry, dict) else None
        w = entries.get(f"image_model.image_model_list.{i}.0.embedding_layer.linear_proj.weight")
        if isinstance(vit, dict) and w is not None and "use_conv_patchified_embedding" not in vit:
            vit["use_conv_patchified_embedding"] = len(w.shape) == 4
            notes.append(f"{where}: model.image_model_list.image_models[{i}].image_model[0]."
                         f"use_conv_patchified_embedding: not set; {vit['use_conv_patchified_embedding']} "
                         f"from the weights (patch embedding of shape {w.shape})")
    proj = (model.get("image_model_list") or {}).get("global_image_projection")
    first = "image_model.projection.ffn.0.linear_layer."
    if isinstance(proj, dict) and "use_bias" not in proj and first + "weight" in entries:
        proj["use_bias"] = first + "bias" in entries
        notes.append(f"{where}: model.image_model_list.global_image_projection.use_bias: not set; "
                     f"{proj['use_bias']} from the weights")
    return notes


_NEWLINE_KEYS = ("model.image_newline", "image_newline")


def _set_precision(model: dict, entries: dict[str, Entry]) -> None:
    """``mixed_precision`` as the checkpoint was saved: 16-bit weights train in mixed precision
    (``fp16_type`` as saved), fp32 weights in fp32 (the numerics transformers computes them in)."""
    dtypes = {e.dtype for e in entries.values() if e.dtype.is_floating_point}
    if dtypes & {torch.float16, torch.bfloat16}:
        model["mixed_precision"] = True
        model["fp16_type"] = "float16" if dtypes & {torch.float16} and torch.bfloat16 not in dtypes else "bfloat16"
    else:
        model["mixed_precision"] = False


def _tokenizer_dir(folder: Path) -> Optional[Path]:
    return folder if any((folder / f).is_file() for f in TOKENIZER_FILES) else None


def _prefixed(prefix: str, key: Optional[str]) -> Optional[str]:
    return None if key is None else prefix + key


def _llava_projector_to_native(key: str, projector_type: str) -> Optional[str]:
    """``model.mm_projector.{2j}.{p}`` (Sequential with GELUs between) or ``model.mm_projector.{p}``
    (linear) -> ``ffn.{j}.linear_layer.{p}``."""
    rest = key.split("mm_projector.", 1)[1]
    parts = rest.split(".")
    if len(parts) == 1:
        return f"ffn.0.linear_layer.{parts[0]}"
    if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) % 2 == 0:
        return f"ffn.{int(parts[0]) // 2}.linear_layer.{parts[1]}"
    return None


def _model_params(vision_cfg: dict, text_cfg: dict, projector_type: str, layer: int, select: str,
                  where: Path) -> dict:
    for cfg, name in ((vision_cfg, "vision config"), (text_cfg, "text config")):
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if key not in cfg:
                raise UserError(Problem(str(where), key, f"missing from the {name}"))
    try:
        return llava_model_params(vision_cfg, text_cfg, projector_type, vision_feature_layer=layer, select_feature=select)
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as err:
        raise UserError(Problem(str(where), None, f"a config value of the wrong kind ({err})")) from None
    except UserError as err:
        text = str(err)
        key = ("mm_projector_type" if "projector" in text else "rope_scaling" if "rope" in text
               else "mm_vision_select_layer")
        raise UserError(Problem(str(where), key, text)) from None
    except KeyError as err:
        raise UserError(Problem(str(where), "mm_vision_select_feature", f"unknown value {err}")) from None


def _init_projector(ck: Checkpoint) -> None:
    weights = init_projector(ModelConfig.model_validate(ck.model))
    for k, v in weights.items():
        ck.entries[k] = Entry(k, Path("<initialized>"), tuple(v.shape), v.dtype, lambda v=v: v)
    ck.source["projector_initialized"] = True
