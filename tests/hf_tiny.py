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
