"""Tiny random Hugging Face CLIP + LLaMA + LLaVA models, saved locally (no hub access)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file


def make_hf_llava(root: Path, seed: int = 0, vision_feature_layer: int = -2,
                  num_kv_heads: int = 2, tie: bool = False):
    """Save a CLIPVisionModel and a LlamaForCausalLM under ``root/image_model`` and
    ``root/text_model``; return (llava, vision_state, text_state, projector_state) where
    ``llava`` is transformers' LlavaForConditionalGeneration loaded from those same weights."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM,
                              LlavaConfig, LlavaForConditionalGeneration)

    torch.manual_seed(seed)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16,
                            hidden_act="quick_gelu", initializer_factor=4.0)
    tcfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=num_kv_heads,
                       max_position_embeddings=128, initializer_range=0.1, tie_word_embeddings=tie)
    CLIPVisionModel(vcfg).save_pretrained(root / "image_model")
    LlamaForCausalLM(tcfg).save_pretrained(root / "text_model")
    vision_state = load_file(root / "image_model" / "model.safetensors")
    text_state = load_file(root / "text_model" / "model.safetensors")

    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tcfg.vocab_size - 1,
                      vision_feature_layer=vision_feature_layer, projector_hidden_act="gelu",
                      image_seq_length=16, tie_word_embeddings=tie)
    llava = LlavaForConditionalGeneration(cfg).eval()
    llava.model.vision_tower.load_state_dict(vision_state)
    llava.model.language_model.load_state_dict(
        {k.removeprefix("model."): v for k, v in text_state.items() if k.startswith("model.")})
    if not tie:
        llava.lm_head.load_state_dict({"weight": text_state["lm_head.weight"]})
    with torch.no_grad():
        for p in llava.model.multi_modal_projector.parameters():
            p.normal_(0.0, 0.2)
    projector_state = {k: v.clone() for k, v in llava.model.multi_modal_projector.state_dict().items()}
    return llava, vision_state, text_state, projector_state


def make_llava_two_folder(root: Path, llava, projector_state, bin_projector: bool = False) -> Path:
    """The LLaVA repository's layout of ``llava``'s weights: ``image_model/`` (CLIP vision with
    preprocessor_config.json) and ``text_model/`` (LLaMA keys + ``model.mm_projector.{0,2}``,
    the LLaVA ``config.json`` and the LLM's ``config_lmsys.json``). With ``bin_projector`` the
    projector is a phase-1 ``mm_projector.bin`` instead."""
    import json

    from safetensors.torch import save_file

    cfg = llava.config
    image_dir, text_dir = root / "image_model", root / "text_model"
    image_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    vision = {k: v.contiguous() for k, v in llava.model.vision_tower.state_dict().items()}
    save_file(vision, str(image_dir / "model.safetensors"), {"format": "pt"})
    (image_dir / "config.json").write_text(cfg.vision_config.to_json_string())
    (image_dir / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
         "crop_size": {"height": 32, "width": 32}, "image_processor_type": "CLIPImageProcessor"}))
    text = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    if not cfg.tie_word_embeddings:
        text["lm_head.weight"] = llava.lm_head.weight.detach()
    proj = {f"model.mm_projector.{0 if k.startswith('linear_1') else 2}.{k.split('.')[-1]}": v
            for k, v in projector_state.items()}
    if bin_projector:
        torch.save(proj, text_dir / "mm_projector.bin")
    else:
        text.update(proj)
    save_file({k: v.contiguous() for k, v in text.items()}, str(text_dir / "model.safetensors"), {"format": "pt"})
    lmsys = json.loads(cfg.text_config.to_json_string())
    (text_dir / "config_lmsys.json").write_text(json.dumps(lmsys))
    (text_dir / "config.json").write_text(json.dumps({
        **lmsys, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": cfg.vision_config.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer, "mm_vision_select_feature": "patch",
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "image_aspect_ratio": "pad"}))
    return root


def next_llava_config(lmsys: dict, mm_hidden_size: int) -> dict:
    """A LLaVA-NeXT ``config.json`` with the keys of lmms-lab/llama3-llava-next-8b's (the seed's
    step d; written here from its documented keys, tiny sizes from ``lmsys``)."""
    return {**lmsys, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
            "image_aspect_ratio": "anyres", "image_crop_resolution": 224, "image_split_resolution": 224,
            "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64]], "mm_patch_merge_type": "spatial_unpad",
            "mm_hidden_size": mm_hidden_size, "mm_projector_type": "mlp2x_gelu", "mm_resampler_type": None,
            "mm_spatial_pool_mode": "bilinear", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
            "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
            "mm_vision_tower": "openai/clip-vit-large-patch14-336", "tune_mm_mlp_adapter": False,
            "use_mm_proj": True, "tokenizer_model_max_length": 128}


def make_model_zoo_layout(root: Path, llava, llava_config: dict | None = None) -> Path:
    """The seed README's pretrained-checkpoint folder: ``image_model/`` (a full CLIP checkpoint as
    ``pytorch_model.bin``, its ``config.json`` and ``preprocessor_config.json``) and ``text_model/``
    (the LLM alone, as two ``.bin`` shards with an index, its config renamed ``config_lmsys.json``,
    and a LLaVA ``config.json`` beside it: LLaVA-NeXT's unless ``llava_config`` is given)."""
    import json

    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig

    cfg = llava.config
    image_dir, text_dir = root / "image_model", root / "text_model"
    image_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    clip_cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2).to_dict(),
                          vision_config=cfg.vision_config.to_dict(), projection_dim=16)
    clip = CLIPModel(clip_cfg)
    clip.vision_model.load_state_dict({k.removeprefix("vision_model."): v
                                       for k, v in llava.model.vision_tower.state_dict().items()})
    torch.save({k: v.contiguous() for k, v in clip.state_dict().items()}, image_dir / "pytorch_model.bin")
    (image_dir / "config.json").write_text(clip_cfg.to_json_string())
    (image_dir / "preprocessor_config.json").write_text(json.dumps(
        {"crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
         "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
         "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32}))
    text = {"model." + k: v.contiguous() for k, v in llava.model.language_model.state_dict().items()}
    if not cfg.tie_word_embeddings:
        text["lm_head.weight"] = llava.lm_head.weight.detach().contiguous()
    keys = sorted(text)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    for name, ks in shards.items():
        torch.save({k: text[k] for k in ks}, text_dir / name)
    (text_dir / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    lmsys = json.loads(cfg.text_config.to_json_string())
    (text_dir / "config_lmsys.json").write_text(json.dumps(lmsys))
    llava_config = llava_config or next_llava_config(lmsys, cfg.vision_config.hidden_size)
    (text_dir / "config.json").write_text(json.dumps(llava_config))
    return root
