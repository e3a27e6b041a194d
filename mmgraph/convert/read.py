"""Reading checkpoints: Hugging Face (two-folder and transformers layouts), LLaVA, native."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import yaml

from mmgraph.convert.checkpoint import (_BUFFERS, PROJ, TEXT, TOKENIZER_FILES, VIT, Checkpoint, _json,
                                        _maybe_json)
from mmgraph.convert.hf_params import llava_model_params
from mmgraph.convert.io import Entry, find_weights, read_entries
from mmgraph.convert.keys import CLIP_VISION, LLAMA, LLAVA_PROJECTOR
from mmgraph.errors import Problem, UserError


def _rename(entries: dict[str, Entry], fn: Callable[[str], Optional[str]], into: dict[str, Entry]) -> None:
    for key, e in entries.items():
        if key.endswith(_BUFFERS):
            continue
        new = fn(key)
        if new is None:
            raise UserError(Problem(str(e.file), key, "no mmgraph parameter corresponds to this key"))
        into[new] = e



def read_hf(src: Path) -> Checkpoint:
    if (src / "image_model").is_dir() and _text_folder(src) is not None:
        return read_two_folder(src)
    cfg_path = src / "config.json"
    if cfg_path.is_file() and _json(cfg_path).get("model_type") == "llava":
        return read_transformers(src)
    raise UserError(Problem(str(src), None, "neither a LlavaForConditionalGeneration folder (config.json with "
                            "model_type llava) nor image_model/ + text_model/"))


def _text_folder(src: Path) -> Optional[Path]:
    for name in ("text_model", "text_model_llava"):
        if (src / name).is_dir():
            return src / name
    cands = [p for p in sorted(src.iterdir()) if p.is_dir() and p.name.startswith("text_model")] if src.is_dir() else []
    return cands[0] if cands else None


def read_two_folder(src: Path) -> Checkpoint:
    image_dir, text_dir = src / "image_model", _text_folder(src)
    vision_cfg = _json(image_dir / "config.json")
    vision_cfg = vision_cfg.get("vision_config", vision_cfg)          # a full CLIPConfig also works
    llava_cfg = _json(text_dir / "config.json")
    lmsys = text_dir / "config_lmsys.json"
    text_cfg = _json(lmsys) if lmsys.is_file() else llava_cfg
    projector_type = llava_cfg.get("mm_projector_type", "linear")
    layer = llava_cfg.get("mm_vision_select_layer", -2)
    select = llava_cfg.get("mm_vision_select_feature", "patch")
    model = _model_params(vision_cfg, text_cfg, projector_type, layer, select, text_dir / "config.json")

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
    dropped = [k for k in text if k.startswith("model.vision_tower.")]
    text = {k: e for k, e in text.items() if k not in projector and k not in dropped}
    _rename(text, lambda k: _prefixed(TEXT, LLAMA.to_native(k)), entries)
    _rename(projector, lambda k: _prefixed(PROJ, _llava_projector_to_native(k, projector_type)), entries)
    source = {"layout": "two_folder", "vision_prefix": "vision_model." if prefixed else "",
              "text_folder": text_dir.name, "projector_in_text": bool(projector) and not phase1.is_file(),
              "llava_config": llava_cfg, "vision_config": vision_cfg, "text_config": text_cfg}
    ck = Checkpoint(entries, model, source, tokenizer=_tokenizer_dir(text_dir),
                    preprocessor=_maybe_json(image_dir / "preprocessor_config.json"))
    if not projector:
        _init_projector(ck)
    return ck


def read_transformers(src: Path) -> Checkpoint:
    cfg = _json(src / "config.json")
    vision_cfg, text_cfg = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    if vision_cfg.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise UserError(Problem(str(src / "config.json"), "vision_config.model_type",
                                f"{vision_cfg.get('model_type')!r}: only CLIP vision towers convert"))
    if text_cfg.get("model_type", "llama") != "llama":
        raise UserError(Problem(str(src / "config.json"), "text_config.model_type",
                                f"{text_cfg.get('model_type')!r}: only LLaMA language models convert"))
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise UserError(Problem(str(src / "config.json"), "projector_hidden_act", f"{act!r}: only gelu converts"))
    layer = cfg.get("vision_feature_layer", -2)
    if isinstance(layer, list):
        raise UserError(Problem(str(src / "config.json"), "vision_feature_layer",
                                "several feature layers have no mmgraph equivalent"))
    select = "patch" if cfg.get("vision_feature_select_strategy", "default") == "default" else "cls_patch"
    if "tie_word_embeddings" in cfg:
        text_cfg = {**text_cfg, "tie_word_embeddings": cfg["tie_word_embeddings"]}
    model = _model_params(vision_cfg, text_cfg, "mlp2x_gelu", layer, select, src / "config.json")
    raw = read_entries(find_weights(src))
    current = any(k.startswith("model.language_model.") for k in raw)
    vision_prefix = ""
    entries: dict[str, Entry] = {}
    for key, e in raw.items():
        if key.endswith(_BUFFERS):
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
    return Checkpoint(entries, model, source, tokenizer=_tokenizer_dir(src),
                      preprocessor=_maybe_json(src / "preprocessor_config.json"))


def read_native(src: Path, config: Optional[Path]) -> Checkpoint:
    """A native folder (params.yaml + weights), a training checkpoint folder or a .safetensors
    file; ``config`` is the params file when the source has none."""
    folder = src if src.is_dir() else src.parent
    params_path = config or folder / "params.yaml"
    if not params_path.is_file():
        raise UserError(Problem(str(params_path), None, "does not exist (pass --config PARAMS)"))
    params = yaml.safe_load(params_path.read_text())
    if not isinstance(params, dict) or "model" not in params:
        raise UserError(Problem(str(params_path), "model", "missing"))
    files = [src] if src.is_file() else find_weights(src)
    meta = _maybe_json(folder / "convert.json") or {}
    tok = folder / "tokenizer"
    return Checkpoint(read_entries(files), params["model"], meta.get("source", {}),
                      tokenizer=tok if tok.is_dir() else None, preprocessor=meta.get("preprocessor"), params=params)


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
    except UserError as err:
        key = "mm_projector_type" if "projector" in str(err) else "mm_vision_select_layer"
        raise UserError(Problem(str(where), key, str(err))) from None
    except KeyError as err:
        raise UserError(Problem(str(where), "mm_vision_select_feature", f"unknown value {err}")) from None


def _init_projector(ck: Checkpoint) -> None:
    from mmgraph.config import ModelConfig
    from mmgraph.models.build import init_projector

    weights = init_projector(ModelConfig.model_validate(ck.model))
    for k, v in weights.items():
        ck.entries[k] = Entry(k, Path("<initialized>"), tuple(v.shape), v.dtype, lambda v=v: v)
    ck.source["projector_initialized"] = True
