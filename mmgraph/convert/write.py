"""Writing checkpoints: native, a transformers LlavaForConditionalGeneration folder, and the
two-folder (Hugging Face / LLaVA repository) layout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

import yaml

from mmgraph.convert.checkpoint import PROJ, TEXT, TOKENIZER_FILES, VIT, Checkpoint
from mmgraph.convert.hf_extras import image_processor_config, transforms_of, write_processor_files
from mmgraph.core.tensorio import ShardWriter, inside
from mmgraph.convert.keys import CLIP_VISION, LLAMA, LLAVA_PROJECTOR
from mmgraph.convert.llava_cfg import llava_config_for_hf, preprocessor_defaults
from mmgraph.core.errors import Problem, UserError


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
    """The tokenizer's files, copied verbatim: none may be a link to a file outside ``src`` (an
    export must not carry other files of the machine), except the Hugging Face cache's own links
    from a snapshot into its ``blobs/``."""
    dst.mkdir(parents=True, exist_ok=True)
    root = src.parent.parent if src.parent.name == "snapshots" else src
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            if (src / f).is_symlink():
                inside(root, os.path.relpath((src / f).resolve(), root), str(src / f), None)
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
    model = dict(ck.model)
    return {"train_input": data, "eval_input": {**data, "shuffle": False},
            "model": model,
            "optimizer": {"optimizer_type": "AdamW", "betas": [0.9, 0.999], "eps": 1.0e-8, "weight_decay": 0.0,
                          "max_gradient_norm": 1.0, "learning_rate": 2.0e-5},
            "runconfig": {"max_steps": 1000, "log_steps": 10, "checkpoint_steps": 500, "seed": 1}}


def _vision_config(ck: Checkpoint) -> dict:
    """The CLIP vision config: the source's keys, with the validated model's values."""
    vit = ck.cfg.image_model_list.image_models[0].encoder
    base = dict(ck.source.get("vision_config") or (ck.source.get("config") or {}).get("vision_config") or {})
    base.update(model_type="clip_vision_model", hidden_size=vit.hidden_size, intermediate_size=vit.filter_size,
                num_hidden_layers=vit.num_hidden_layers, num_attention_heads=vit.num_heads,
                image_size=vit.image_size[0], patch_size=vit.patch_size[0], num_channels=vit.num_channels,
                hidden_act=vit.nonlinearity, layer_norm_eps=vit.layer_norm_epsilon,
                attention_dropout=vit.attention_dropout_rate)
    return base


def _text_config(ck: Checkpoint) -> dict:
    """The LLaMA config: the source's keys, with the validated model's values."""
    t = ck.cfg.text_model
    base = dict(ck.source.get("text_config") or (ck.source.get("config") or {}).get("text_config") or {})
    base.update(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                intermediate_size=t.filter_size, num_hidden_layers=t.num_hidden_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                rms_norm_eps=t.layer_norm_epsilon, max_position_embeddings=t.max_position_embeddings,
                tie_word_embeddings=t.share_embedding_weights, attention_bias=t.use_projection_bias_in_attention,
                mlp_bias=t.use_ffn_bias, attention_dropout=t.attention_dropout_rate)
    base.setdefault("rope_theta", t.rope_theta)
    if isinstance(base.get("rope_parameters"), dict):
        base["rope_parameters"]["rope_theta"] = t.rope_theta
    return base


def _preprocessor(ck: Checkpoint, pad: Optional[bool] = False) -> dict:
    """The source's preprocessor_config.json (carried by ``convert.json``), else one from the
    params' eval transforms (``pad`` False: a CLIP image processor, as the LLaVA repository pads by
    ``image_aspect_ratio``; None: transformers' LLaVA one where the transforms pad), else the
    Model Zoo's (CLIP's, at this image size)."""
    size = ck.cfg.image_model_list.image_models[0].encoder.image_size[0]
    if ck.preprocessor:
        return ck.preprocessor
    if ck.params and transforms_of(ck.params):
        cfg, notes = image_processor_config(ck.params, size, pad=pad, where=ck.config_file or "params.yaml")
        ck.notes += [n for n in notes if n not in ck.notes]
        if pad is False:                        # the Model Zoo's form: its keys, size as an int
            cfg = {**preprocessor_defaults(size), **cfg}
            if list(cfg["size"]) == ["shortest_edge"]:
                cfg["size"] = cfg["size"]["shortest_edge"]
        return cfg
    return preprocessor_defaults(size)


def _hf_layer(ck: Checkpoint) -> int:
    idx = ck.cfg.image_model_list.image_models[0].encoder.image_layer_idx
    return idx if idx < 0 else idx + 1


def _projector_type(ck: Checkpoint) -> str:
    units = ck.cfg.image_model_list.global_image_projection.layers_units
    return "linear" if len(units) == 1 else f"mlp{len(units)}x_gelu"


def _split_keys(ck: Checkpoint):
    vit = [k for k in ck.entries if k.startswith(VIT)]
    proj = [k for k in ck.entries if k.startswith(PROJ)]
    text = [k for k in ck.entries if k.startswith(TEXT)]
    other = [k for k in ck.entries if not k.startswith((VIT, PROJ, TEXT))]
    if other:                       # never drop a weight silently
        raise UserError(Problem(str(ck.entries[other[0]].file), other[0], "a weight with no place in the Hugging "
                                f"Face layout ({len(other)} such)"))
    if ck.cfg.text_model.share_embedding_weights:
        text = [k for k in text if k != TEXT + "lm_head.weight"]
    return vit, proj, text


def write_transformers(ck: Checkpoint, out: Path, shard_bytes: int, image_token_id: Optional[int],
                       trained=None) -> None:
    """The weights, ``config.json`` and, with the tokenizer known, everything transformers' processor,
    ``pipeline`` and lmms-eval load (``hf_extras``)."""
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
    vocab = ck.cfg.text_model.vocab_size
    token = image_token_id if image_token_id is not None else old.get("image_token_index", old.get("image_token_id"))
    if token is None:
        token = _image_token_from_tokenizer(ck.tokenizer, trained.image_token if trained else "<image>")
    if token is None:
        raise UserError(Problem(None, "--image-token-id", "the image token id is not known from the source; "
                                "pass --image-token-id"))
    if not 0 <= token < vocab:
        raise UserError(Problem(None, "--image-token-id", f"{token} is outside the vocabulary (0..{vocab - 1})"))
    grid = ck.cfg.image_model_list.image_models[0].encoder.grid
    n = grid[0] * grid[1]
    select = ck.cfg.image_model_list.image_feature_select_mode
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**_clean(_vision_config(ck))),
                      text_config=LlamaConfig(**_clean(_text_config(ck))),
                      image_token_index=token, vision_feature_layer=_hf_layer(ck), projector_hidden_act="gelu",
                      vision_feature_select_strategy="default" if select == "patch" else "full",
                      image_seq_length=n + (select != "patch"),
                      tie_word_embeddings=ck.cfg.text_model.share_embedding_weights)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.save_pretrained(out)
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, out)
    pre = _preprocessor(ck, pad=None)
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    if ck.tokenizer is not None and trained is not None:
        enc = ck.cfg.image_model_list.image_models[0].encoder
        write_processor_files(out, ck.tokenizer, trained.template, pre, enc.patch_size[0], select,
                              trained.image_token, trained.end_of_turn)
    elif ck.tokenizer is None:
        ck.notes.append("no tokenizer known (pass --tokenizer DIR): written without tokenizer, processor, chat "
                        "template and generation config")


def _clean(cfg: dict) -> dict:
    drop = ("transformers_version", "architectures", "_name_or_path", "model_type", "torch_dtype", "dtype")
    return {k: v for k, v in cfg.items() if k not in drop}


def _image_token_from_tokenizer(folder: Optional[Path], image_token: str = "<image>") -> Optional[int]:
    if folder is None or not (folder / "tokenizer.json").is_file():
        return None
    vocab = json.loads((folder / "tokenizer.json").read_text())
    for tok in vocab.get("added_tokens", []):
        if tok.get("content") == image_token:
            return tok["id"]
    words = vocab.get("model", {}).get("vocab")
    return words.get(image_token) if isinstance(words, dict) else None


def write_two_folder(ck: Checkpoint, out: Path, shard_bytes: int, text_name: str, final: Path) -> None:
    """``image_model/`` + ``text_name/`` in ``out`` (a temporary folder renamed to ``final`` later:
    the LLaVA config's ``mm_vision_tower`` names ``final/image_model``, as the Model Zoo writes it)."""
    vit, proj, text = _split_keys(ck)
    image_dir, text_dir = out / "image_model", out / text_name
    image_dir.mkdir()
    text_dir.mkdir()
    # The source's key prefix when known, else the Model Zoo's (CLIPVisionModel's "vision_model.").
    vprefix = ck.source.get("vision_prefix", "vision_model.")
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
    (image_dir / "preprocessor_config.json").write_text(json.dumps(_preprocessor(ck), indent=2) + "\n")
    text_cfg = _text_config(ck)
    (text_dir / "config_lmsys.json").write_text(json.dumps({**text_cfg, "architectures": ["LlamaForCausalLM"]},
                                                           indent=2) + "\n")
    tower = str(final.resolve() / "image_model")
    (text_dir / "config.json").write_text(json.dumps(_llava_config(ck, text_cfg, tower, kind), indent=2) + "\n")
    if ck.tokenizer is not None:
        _copy_tokenizer(ck.tokenizer, text_dir)


def _llava_config(ck: Checkpoint, text_cfg: dict, tower: str, kind: str) -> dict:
    """The LLaVA config.json: the source's (when known) with the model's values over it and the
    Model Zoo's defaults where neither says (``model_type: llava``, ``image_aspect_ratio: pad``);
    ``mm_vision_tower`` is always the written ``image_model`` (the tower may have trained)."""
    source = dict(ck.source.get("llava_config") or {})
    base = {**source, **{k: v for k, v in text_cfg.items() if k not in ("model_type", "architectures")}}
    select = ck.cfg.image_model_list.image_feature_select_mode
    base.update(mm_hidden_size=ck.cfg.image_model_list.image_models[0].encoder.hidden_size,
                mm_projector_type=kind, mm_vision_select_layer=_hf_layer(ck),
                mm_vision_select_feature="patch" if select == "patch" else "cls_patch", mm_vision_tower=tower)
    return llava_config_for_hf(base, ck.cfg.freeze)
