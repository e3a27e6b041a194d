"""Parameter-name rules between Hugging Face models and mmgraph (Model Zoo names).

Each rule pairs a Hugging Face key pattern with an mmgraph key pattern; ``{i}`` stands for a
layer index and ``{p}`` for ``weight`` or ``bias``. The same table maps both directions.
Prefixes (``model.vision_tower.``, ``image_model.image_model_list.0.0.``, ...) are the
caller's: the tables describe one CLIP vision tower, one LLaMA, one LLaVA projector.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable

CLIP_VISION_RULES = (
    ("embeddings.class_embedding", "embedding_layer.cls_embedding"),
    ("embeddings.patch_embedding.{p}", "embedding_layer.linear_proj.{p}"),
    ("embeddings.position_embedding.weight", "embedding_layer.position_embeddings.weight"),
    ("pre_layrnorm.{p}", "embedding_layer.post_embed_ln.{p}"),
    ("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.transformer_encoder.layers.{i}.self_attn.proj_q_dense_layer.{p}"),
    ("encoder.layers.{i}.self_attn.k_proj.{p}", "encoder.transformer_encoder.layers.{i}.self_attn.proj_k_dense_layer.{p}"),
    ("encoder.layers.{i}.self_attn.v_proj.{p}", "encoder.transformer_encoder.layers.{i}.self_attn.proj_v_dense_layer.{p}"),
    ("encoder.layers.{i}.self_attn.out_proj.{p}", "encoder.transformer_encoder.layers.{i}.self_attn.proj_output_dense_layer.{p}"),
    ("encoder.layers.{i}.layer_norm1.{p}", "encoder.transformer_encoder.layers.{i}.norm1.{p}"),
    ("encoder.layers.{i}.layer_norm2.{p}", "encoder.transformer_encoder.layers.{i}.norm2.{p}"),
    ("encoder.layers.{i}.mlp.fc1.{p}", "encoder.transformer_encoder.layers.{i}.ffn.ffn.0.linear_layer.{p}"),
    ("encoder.layers.{i}.mlp.fc2.{p}", "encoder.transformer_encoder.layers.{i}.ffn.ffn.1.linear_layer.{p}"),
    ("post_layernorm.{p}", "encoder.transformer_encoder.norm.{p}"),
)

LLAMA_RULES = (
    ("model.embed_tokens.weight", "embedding_layer.word_embeddings.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "transformer_decoder.layers.{i}.self_attn.proj_q_dense_layer.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "transformer_decoder.layers.{i}.self_attn.proj_k_dense_layer.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "transformer_decoder.layers.{i}.self_attn.proj_v_dense_layer.{p}"),
    ("model.layers.{i}.self_attn.o_proj.{p}", "transformer_decoder.layers.{i}.self_attn.proj_output_dense_layer.{p}"),
    ("model.layers.{i}.input_layernorm.weight", "transformer_decoder.layers.{i}.norm1.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "transformer_decoder.layers.{i}.norm3.weight"),
    ("model.layers.{i}.mlp.gate_proj.{p}", "transformer_decoder.layers.{i}.ffn.ffn.0.linear_layer_for_glu.{p}"),
    ("model.layers.{i}.mlp.up_proj.{p}", "transformer_decoder.layers.{i}.ffn.ffn.0.linear_layer.{p}"),
    ("model.layers.{i}.mlp.down_proj.{p}", "transformer_decoder.layers.{i}.ffn.ffn.1.linear_layer.{p}"),
    ("model.norm.weight", "transformer_decoder.norm.weight"),
    ("lm_head.{p}", "lm_head.{p}"),
)

# transformers' LlavaMultiModalProjector (linear_1, act, linear_2) and the LLaVA repository's
# mm_projector (a Sequential: 0 = linear, 1 = GELU, 2 = linear, ...).
LLAVA_PROJECTOR_RULES = (
    ("linear_1.{p}", "ffn.0.linear_layer.{p}"),
    ("linear_2.{p}", "ffn.1.linear_layer.{p}"),
)


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


@dataclass(frozen=True)
class KeyMap:
    """Bidirectional renaming with one table of (hf, native) patterns."""

    rules: tuple[tuple[str, str], ...]
    # Prefixes some Hugging Face layouts put before the keys (read, never written).
    hf_prefixes: tuple[str, ...] = ()

    def to_native(self, key: str) -> str | None:
        for prefix in self.hf_prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        return self._apply(key, 0, 1)

    def to_hf(self, key: str) -> str | None:
        return self._apply(key, 1, 0)

    def _apply(self, key: str, src: int, dst: int) -> str | None:
        for rule in self.rules:
            m = _compile(rule[src]).match(key)
            if m:
                return rule[dst].format(**m.groupdict())
        return None

    def rename(self, keys: Iterable[str], to: str) -> dict[str, str]:
        """``{old: new}`` for every key; raises KeyError naming the first key no rule covers."""
        fn = self.to_native if to == "native" else self.to_hf
        out = {}
        for key in keys:
            new = fn(key)
            if new is None:
                raise KeyError(key)
            out[key] = new
        return out


# transformers >= 5 saves CLIPVisionModel keys bare; older checkpoints prefix them.
CLIP_VISION = KeyMap(CLIP_VISION_RULES, hf_prefixes=("vision_model.",))
LLAMA = KeyMap(LLAMA_RULES)
LLAVA_PROJECTOR = KeyMap(LLAVA_PROJECTOR_RULES)
