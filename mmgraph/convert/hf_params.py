"""The ``model`` section of a params file from Hugging Face configs (CLIP vision + LLaMA + LLaVA).

Every key whose value the Hugging Face model requires is written explicitly (never left to a
default), so the converted params build the same model whichever defaults mmgraph or the Model
Zoo apply: e.g. ``use_conv_patchified_embedding: true`` (CLIP patchifies with a convolution;
the Model Zoo's default is a Linear embedding), the projector's ``use_bias: true``,
``image_layer_idx`` (unset would mean every block plus the final LayerNorm).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from mmgraph.core.errors import UserError


def _get(cfg: Any, key: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def projector_params(projector_type: str, in_width: int, out_width: int) -> dict:
    """LLaVA's ``mm_projector_type`` (``linear`` or ``mlpNx_gelu``) as a FeedForwardNetwork."""
    if projector_type == "linear":
        depth = 1
    else:
        m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
        if not m:
            raise UserError(f"mm_projector_type {projector_type!r} is not supported "
                            "(expected 'linear' or 'mlpNx_gelu')")
        depth = int(m.group(1))
    return {
        "name": "FeedForwardNetwork", "input_unit": in_width, "layers_units": [out_width] * depth,
        "layers_activation": ["gelu"] * (depth - 1) + [None], "use_bias": True,
    }


def image_layer_idx_from_hf(vision_feature_layer: int) -> int:
    """HF indexes ``hidden_states`` (0 = embeddings); the Model Zoo indexes blocks."""
    if vision_feature_layer == 0:
        raise UserError("vision_feature_layer 0 (the embeddings) has no image_layer_idx equivalent")
    return vision_feature_layer if vision_feature_layer < 0 else vision_feature_layer - 1


def vit_params(vision: Any, vision_feature_layer: int = -2) -> dict:
    """A CLIP vision config as a Model Zoo ViTModel entry."""
    return {
        "name": "ViTModel",
        "hidden_size": _get(vision, "hidden_size"),
        "num_hidden_layers": _get(vision, "num_hidden_layers"),
        "num_heads": _get(vision, "num_attention_heads"),
        "filter_size": _get(vision, "intermediate_size"),
        "nonlinearity": _get(vision, "hidden_act", "quick_gelu"),
        "layer_norm_epsilon": _get(vision, "layer_norm_eps", 1e-5),
        "image_size": [_get(vision, "image_size")] * 2,
        "patch_size": [_get(vision, "patch_size")] * 2,
        "num_channels": _get(vision, "num_channels", 3),
        "prepend_cls_token": True,
        "use_conv_patchified_embedding": True,           # CLIP's patch embedding is a Conv2d
        "use_post_embed_layer_norm": True,               # CLIP's pre_layrnorm
        "use_embed_proj_bias": False,
        "position_embedding_type": "learned",
        "embedding_dropout_rate": 0.0,
        "dropout_rate": 0.0,
        "attention_dropout_rate": float(_get(vision, "attention_dropout", 0.0) or 0.0),
        "attention_type": "scaled_dot_product",
        "use_projection_bias_in_attention": True,
        "use_ffn_bias_in_attention": True,
        "use_ffn_bias": True,
        "use_final_layer_norm": True,                    # CLIP's post_layernorm (weights exist)
        "use_encoder_pooler_layer": False,
        "norm_first": True,
        "image_layer_idx": image_layer_idx_from_hf(vision_feature_layer),
    }


def llama_params(text: Any) -> dict:
    """A LLaMA config as a Model Zoo LlamaModel entry."""
    heads = _get(text, "num_attention_heads")
    kv = _get(text, "num_key_value_heads") or heads
    rope = _get(text, "rope_parameters") or {}
    theta = rope.get("rope_theta") if isinstance(rope, Mapping) else None
    scaling = _get(text, "rope_scaling") or (rope if isinstance(rope, Mapping) else {})
    kind = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, Mapping) else "default"
    if kind not in ("default", None):
        raise UserError(f"rope_scaling {kind!r} is not supported (mmgraph's LLaMA uses plain rotary positions)")
    hidden = _get(text, "hidden_size")
    bias = bool(_get(text, "attention_bias", False))
    out = {
        "name": "LlamaModel",
        "vocab_size": _get(text, "vocab_size"),
        "hidden_size": hidden,
        "num_hidden_layers": _get(text, "num_hidden_layers"),
        "num_heads": heads,
        "filter_size": _get(text, "intermediate_size"),
        "nonlinearity": "swiglu",
        "norm_type": "rmsnorm",
        "layer_norm_epsilon": _get(text, "rms_norm_eps", 1e-6),
        "position_embedding_type": "rotary",
        "rotary_dim": _get(text, "head_dim") or hidden // heads,
        "rope_theta": float(theta or _get(text, "rope_theta", 10000.0)),
        "max_position_embeddings": _get(text, "max_position_embeddings"),
        "share_embedding_weights": bool(_get(text, "tie_word_embeddings", False)),
        "use_projection_bias_in_attention": bias,
        "use_ffn_bias_in_attention": bias,
        "use_ffn_bias": bool(_get(text, "mlp_bias", False)),
        "use_bias_in_output": False,
        "attention_type": "scaled_dot_product",
        "attention_dropout_rate": float(_get(text, "attention_dropout", 0.0) or 0.0),
        "dropout_rate": 0.0,
        "embd_pdrop": 0.0,
        "embedding_layer_norm": False,
        "pos_scaling_factor": 1.0,
    }
    if kv != heads:
        out["attention_module"] = "multiquery_attention"
        out["extra_attention_params"] = {"num_kv_groups": kv}
    return out


def llava_model_params(vision: Any, text: Any, projector_type: str = "mlp2x_gelu",
                       vision_feature_layer: int = -2, select_feature: str = "patch") -> dict:
    """The ``model`` section for a LLaVA made of these configs (nothing frozen)."""
    vit = vit_params(vision, vision_feature_layer)
    mode = {"patch": "patch", "default": "patch", "cls_patch": "cls_patch", "full": "cls_patch"}[select_feature]
    return {
        "image_model_list": {
            "image_feature_select_mode": mode,
            "image_models": [{"image_model": [vit]}],
            "global_image_projection": projector_params(projector_type, vit["hidden_size"],
                                                        _get(text, "hidden_size")),
        },
        "text_model": llama_params(text),
        "freeze": [],
        "loss_scaling": "num_tokens",
        "loss_weight": 1.0,
        "label_smoothing": 0.0,
        "z_loss_eps": 0.0,
        "mixed_precision": False,
    }
