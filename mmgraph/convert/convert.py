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

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from mmgraph.convert.hf_params import llava_model_params
from mmgraph.convert.io import Entry, ShardWriter, find_weights, parse_size, read_entries
from mmgraph.convert.keys import CLIP_VISION, LLAMA, LLAVA_PROJECTOR
from mmgraph.errors import Problem, UserError

FORMATS = {
    "native": "mmgraph weights (safetensors, Model Zoo names) + params.yaml",
    "hf": "Hugging Face: LlavaForConditionalGeneration folder, or image_model/ + text_model/ (read both)",
    "llava": "LLaVA repository layout: image_model/ + text_model_llava/ (mm_projector inside)",
}
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
    generated: dict[str, Callable[[], torch.Tensor]] = field(default_factory=dict)   # initialized here


def _json(path: Path) -> dict:
    if not path.is_file():
        raise UserError(Problem(str(path), None, "does not exist"))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(Problem(str(path), None, f"not valid JSON ({err})")) from err


def _rename(entries: dict[str, Entry], fn: Callable[[str], Optional[str]], into: dict[str, Entry],
            skip_buffers: bool = True) -> None:
    for key, e in entries.items():
        if skip_buffers and key.endswith(_BUFFERS):
            continue
        new = fn(key)
        if new is None:
            raise UserError(Problem(str(e.file), key, "no mmgraph parameter corresponds to this key"))
        into[new] = e


# ---------------------------------------------------------------------------- reading
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


def _maybe_json(path: Path) -> Optional[dict]:
    return _json(path) if path.is_file() else None


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


# ---------------------------------------------------------------------------- checking
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


# ---------------------------------------------------------------------------- writing
def _items(keys: list[tuple[str, str]], ck: Checkpoint):
    """(out key, native key) pairs as ShardWriter items."""
    out = []
    for out_key, native in keys:
        e = ck.entries[native]
        out.append((out_key, e.shape, e.dtype, e.load))
    return out


def write_native(ck: Checkpoint, out: Path, shard_bytes: int) -> None:
    ShardWriter(out, shard_bytes).write(_items([(k, k) for k in ck.entries], ck))
    params = ck.params or default_params(ck)
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (out / "convert.json").write_text(json.dumps({"source": ck.source, "preprocessor": ck.preprocessor}, indent=2) + "\n")
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, out / "tokenizer")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)


def default_params(ck: Checkpoint) -> dict:
    """A whole params file around the converted model: phase-2 settings to edit."""
    vit = ck.model["image_model_list"]["image_models"][0]["image_model"][0]
    size = vit["image_size"][0]
    pre = ck.preprocessor or {}
    mean = pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    seq = min(int(ck.model["text_model"].get("max_position_embeddings") or 2048), 2048)
    data = {
        "data_processor": "MultimodalSimpleHDF5MapDataProcessor", "data_dir": "./data/phase2",
        "img_data_dir": "./data/images", "image_data_size": [3, size, size], "max_num_img": 1,
        "max_sequence_length": seq,
        "transforms": [{"name": "expand_to_square", "background_color": [int(255 * m) for m in mean]},
                       {"name": "resize", "size": size, "interpolation": "bicubic"},
                       {"name": "center_crop", "size": size}, {"name": "to_tensor"},
                       {"name": "normalize", "mean": mean, "std": std}],
        "batch_size": 8, "micro_batch_size": 8, "shuffle": True, "shuffle_seed": 1, "num_workers": 0,
    }
    model = dict(ck.model, freeze=["^image_model.image_model_list"])
    return {"train_input": data, "eval_input": {**data, "shuffle": False},
            "model": model,
            "optimizer": {"optimizer_type": "AdamW", "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0,
                          "max_gradient_norm": 1.0, "learning_rate": 2.0e-5},
            "runconfig": {"max_steps": 1000, "log_steps": 10, "checkpoint_steps": 500, "seed": 1}}


def _vision_config(ck: Checkpoint) -> dict:
    vit = ck.model["image_model_list"]["image_models"][0]["image_model"][0]
    base = dict(ck.source.get("vision_config") or (ck.source.get("config") or {}).get("vision_config") or {})
    base.update(model_type="clip_vision_model", hidden_size=vit["hidden_size"], intermediate_size=vit["filter_size"],
                num_hidden_layers=vit["num_hidden_layers"], num_attention_heads=vit["num_heads"],
                image_size=vit["image_size"][0], patch_size=vit["patch_size"][0],
                num_channels=vit.get("num_channels", 3), hidden_act=vit.get("nonlinearity", "quick_gelu"),
                layer_norm_eps=vit.get("layer_norm_epsilon", 1e-5))
    return base


def _text_config(ck: Checkpoint) -> dict:
    t = ck.model["text_model"]
    base = dict(ck.source.get("text_config") or (ck.source.get("config") or {}).get("text_config") or {})
    kv = (t.get("extra_attention_params") or {}).get("num_kv_groups") or t["num_heads"]
    base.update(model_type="llama", vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
                intermediate_size=t["filter_size"], num_hidden_layers=t["num_hidden_layers"],
                num_attention_heads=t["num_heads"], num_key_value_heads=kv,
                rms_norm_eps=t.get("layer_norm_epsilon", 1e-6),
                max_position_embeddings=t.get("max_position_embeddings", 2048),
                tie_word_embeddings=bool(t.get("share_embedding_weights", False)),
                attention_bias=bool(t.get("use_projection_bias_in_attention", False)),
                mlp_bias=bool(t.get("use_ffn_bias", False)))
    base.setdefault("rope_theta", t.get("rope_theta", 10000.0))
    if isinstance(base.get("rope_parameters"), dict):
        base["rope_parameters"]["rope_theta"] = t.get("rope_theta", 10000.0)
    return base


def _hf_layer(ck: Checkpoint) -> int:
    idx = ck.model["image_model_list"]["image_models"][0]["image_model"][0].get("image_layer_idx", -1)
    return idx if idx < 0 else idx + 1


def _projector_type(ck: Checkpoint) -> str:
    units = ck.model["image_model_list"]["global_image_projection"]["layers_units"]
    return "linear" if len(units) == 1 else f"mlp{len(units)}x_gelu"


def _split_keys(ck: Checkpoint):
    vit = [k for k in ck.entries if k.startswith(VIT)]
    proj = [k for k in ck.entries if k.startswith(PROJ)]
    text = [k for k in ck.entries if k.startswith(TEXT)]
    tied = ck.model["text_model"].get("share_embedding_weights", False)
    if tied:
        text = [k for k in text if k != TEXT + "lm_head.weight"]
    return vit, proj, text


def write_transformers(ck: Checkpoint, out: Path, shard_bytes: int, image_token_id: Optional[int]) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vit, proj, text = _split_keys(ck)
    style = ck.source.get("style", "legacy") if ck.source.get("layout") == "transformers" else "legacy"
    vprefix = ck.source.get("vision_prefix", "")
    if style == "current":
        vhead, phead = "model.vision_tower." + vprefix, "model.multi_modal_projector."

        def text_key(k):
            hf = LLAMA.to_hf(k[len(TEXT):])
            return hf if hf.startswith("lm_head.") else "model.language_model." + hf[len("model."):]
    else:
        vhead, phead = "vision_tower." + vprefix, "multi_modal_projector."

        def text_key(k):
            return "language_model." + LLAMA.to_hf(k[len(TEXT):])
    keys = [(vhead + CLIP_VISION.to_hf(k[len(VIT):]), k) for k in vit]
    keys += [(phead + LLAVA_PROJECTOR.to_hf(k[len(PROJ):]), k) for k in proj]
    keys += [(text_key(k), k) for k in text]
    ShardWriter(out, shard_bytes).write(_items(keys, ck), {"format": "pt"})

    old = ck.source.get("config") or {}
    vocab = ck.model["text_model"]["vocab_size"]
    token = image_token_id if image_token_id is not None else old.get("image_token_index", old.get("image_token_id"))
    if token is None:
        token = _image_token_from_tokenizer(ck.tokenizer)
    if token is None:
        raise UserError(Problem(None, "--image-token-id", "the image token id is not known from the source; "
                                "pass --image-token-id"))
    if not 0 <= token < vocab:
        raise UserError(Problem(None, "--image-token-id", f"{token} is outside the vocabulary (0..{vocab - 1})"))
    patches = ck.model["image_model_list"]["image_models"][0]["image_model"][0]
    n = (patches["image_size"][0] // patches["patch_size"][0]) ** 2
    select = ck.model["image_model_list"].get("image_feature_select_mode", "patch")
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_clean(_vision_config(ck))),
                      text_config=LlamaConfig(**_clean(_text_config(ck))),
                      image_token_index=token, vision_feature_layer=_hf_layer(ck), projector_hidden_act="gelu",
                      vision_feature_select_strategy="default" if select == "patch" else "full",
                      image_seq_length=n + (select != "patch"),
                      tie_word_embeddings=bool(ck.model["text_model"].get("share_embedding_weights", False)))
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(out)
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, out)
    if ck.preprocessor is not None:
        (out / "preprocessor_config.json").write_text(json.dumps(ck.preprocessor, indent=2) + "\n")


def _clean(cfg: dict) -> dict:
    drop = ("transformers_version", "architectures", "_name_or_path", "model_type", "torch_dtype", "dtype")
    return {k: v for k, v in cfg.items() if k not in drop}


def _image_token_from_tokenizer(folder: Optional[Path]) -> Optional[int]:
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    vocab = json.loads((folder / "tokenizer.json").read_text())
    for tok in vocab.get("added_tokens", []):
        if tok.get("content") == "<image>":
            return tok["id"]
    return vocab.get("model", {}).get("vocab", {}).get("<image>") if isinstance(vocab.get("model", {}).get("vocab"), dict) else None


def write_two_folder(ck: Checkpoint, out: Path, shard_bytes: int, text_name: str) -> None:
    vit, proj, text = _split_keys(ck)
    image_dir, text_dir = out / "image_model", out / text_name
    image_dir.mkdir()
    text_dir.mkdir()
    vprefix = ck.source.get("vision_prefix", "")
    ShardWriter(image_dir, shard_bytes).write(
        _items([(vprefix + CLIP_VISION.to_hf(k[len(VIT):]), k) for k in vit], ck), {"format": "pt"})
    kind = _projector_type(ck)
    pkeys = []
    for k in proj:
        j, _, p = k[len(PROJ):].removeprefix("ffn.").partition(".linear_layer.")
        pkeys.append((f"model.mm_projector.{p}" if kind == "linear" else f"model.mm_projector.{int(j) * 2}.{p}", k))
    keys = [(LLAMA.to_hf(k[len(TEXT):]), k) for k in text]
    if not ck.source.get("projector_initialized") or ck.source.get("layout") != "two_folder":
        keys += pkeys
    ShardWriter(text_dir, shard_bytes).write(_items(keys, ck), {"format": "pt"})

    vision_cfg = _vision_config(ck)
    (image_dir / "config.json").write_text(json.dumps(vision_cfg, indent=2) + "\n")
    if ck.preprocessor is not None:
        (image_dir / "preprocessor_config.json").write_text(json.dumps(ck.preprocessor, indent=2) + "\n")
    text_cfg = _text_config(ck)
    (text_dir / "config_lmsys.json").write_text(json.dumps({**text_cfg, "architectures": ["LlamaForCausalLM"]},
                                                           indent=2) + "\n")
    select = ck.model["image_model_list"].get("image_feature_select_mode", "patch")
    llava_cfg = dict(ck.source.get("llava_config") or {})
    llava_cfg.update(text_cfg)
    llava_cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama",
                     mm_hidden_size=vision_cfg["hidden_size"], mm_projector_type=kind,
                     mm_vision_select_layer=_hf_layer(ck),
                     mm_vision_select_feature="patch" if select == "patch" else "cls_patch",
                     mm_vision_tower=str(Path("..") / "image_model") if text_name != "text_model" else
                     llava_cfg.get("mm_vision_tower", str(Path("..") / "image_model")))
    llava_cfg.setdefault("mm_use_im_start_end", False)
    llava_cfg.setdefault("mm_use_im_patch_token", False)
    llava_cfg.setdefault("image_aspect_ratio", "pad")
    (text_dir / "config.json").write_text(json.dumps(llava_cfg, indent=2) + "\n")
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, text_dir)


# ---------------------------------------------------------------------------- driver
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

