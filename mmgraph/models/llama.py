"""LLaMA-family decoder (RMSNorm, rotary positions, SwiGLU, grouped-query attention).

Names follow the Model Zoo's LlamaModel::

    embedding_layer.word_embeddings
    transformer_decoder.layers[i]   norm1 -> self_attn, norm3 -> ffn (pre-norm, residual)
    transformer_decoder.norm
    lm_head                          (tied to word_embeddings with share_embedding_weights)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmgraph.core.config.model import LlamaModelConfig
from mmgraph.models.attention import Attention, causal_padding_mask, rotary_cos_sin, segment_causal_mask
from mmgraph.models.layers import FeedForwardNetwork, make_norm
from mmgraph.models.rng import Dropout, Rng


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: LlamaModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = Dropout(max(cfg.embd_pdrop, cfg.embedding_dropout_rate))   # text tokens only


class VisualExpert(nn.Module):
    """CogVLM's visual expert of one decoder layer: weights used at image positions, beside the
    layer's own (text) weights. ``proj_*_dense_layer`` (attention form) and/or ``ffn``."""

    def __init__(self, cfg: LlamaModelConfig):
        super().__init__()
        h, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
        if cfg.extra_attention_params.static_dual_expert:
            bias, out_bias = cfg.use_projection_bias_in_attention, cfg.use_ffn_bias_in_attention
            self.proj_q_dense_layer = nn.Linear(h, h, bias=bias)
            self.proj_k_dense_layer = nn.Linear(h, kv, bias=bias)
            self.proj_v_dense_layer = nn.Linear(h, kv, bias=bias)
            self.proj_output_dense_layer = nn.Linear(h, h, bias=out_bias)
        if cfg.extra_ffn_params.static_dual_expert:
            self.ffn = FeedForwardNetwork(h, [cfg.filter_size, h], [cfg.nonlinearity, None], cfg.use_ffn_bias)


def constant_image_positions(token_modality_idx: torch.Tensor,
                             segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Positions where every token of an image run shares the run's first position and text
    continues one after it (CogVLM): (B, S) -> (B, S). With ``segment_ids`` (a packed row)
    they restart at 0 for each sample."""
    image = token_modality_idx == 1
    before = F.pad(image[:, :-1], (1, 0), value=False)
    if segment_ids is None:
        step = (~image) | (image & ~before)
        return step.long().cumsum(1) - 1
    first = segment_ids != F.pad(segment_ids[:, :-1], (1, 0), value=-1)    # (B, S) sample starts
    step = ((~image) | (image & ~before) | first).long()
    count = step.cumsum(1)                                                # (B, S) inclusive
    base = torch.where(first, count - step, torch.zeros_like(count)).cummax(1).values
    return count - base - 1


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaModelConfig, attention_impl: str):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.norm1 = make_norm(cfg.norm_type, h, eps)
        self.self_attn = Attention(h, cfg.num_heads, cfg.num_kv_heads,
                                   use_bias=cfg.use_projection_bias_in_attention,
                                   use_output_bias=cfg.use_ffn_bias_in_attention,
                                   dropout=cfg.attention_dropout_rate, impl=attention_impl,
                                   scaled=cfg.attention_type == "scaled_dot_product")
        self.norm3 = make_norm(cfg.norm_type, h, eps)
        self.ffn = FeedForwardNetwork(h, [cfg.filter_size, h], [cfg.nonlinearity, None], cfg.use_ffn_bias)
        self.visual_expert = VisualExpert(cfg) if cfg.visual_experts else None
        self.attn_dropout = Dropout(cfg.dropout_rate)     # on the attention block's output
        self.ffn_dropout = Dropout(cfg.dropout_rate)      # on the FFN's output (its second layer)

    def _ffn(self, h: torch.Tensor, image: Optional[torch.Tensor]) -> torch.Tensor:
        out = self.ffn(h)
        if image is not None and self.visual_expert is not None and hasattr(self.visual_expert, "ffn"):
            out = torch.where(image, self.visual_expert.ffn(h), out)
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                image: Optional[torch.Tensor] = None, rng: Optional[Rng] = None) -> torch.Tensor:
        """``image`` (B, S, 1) bool: positions that use the visual expert, when there is one."""
        a = self.self_attn(self.norm1(x), mask, rotary, self.visual_expert, image, rng)
        x = x + self.attn_dropout(a, rng)
        f = self._ffn(self.norm3(x), image)
        return x + self.ffn_dropout(f, rng)

    def forward_cached(self, x: torch.Tensor, rotary, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       start: int, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.norm1(x), rotary, cache_k, cache_v, start, self.visual_expert, image)
        return x + self._ffn(self.norm3(x), image)


class KVCache:
    """Keys and values of every layer for up to ``max_len`` positions, allocated once."""

    def __init__(self, cfg: LlamaModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.hidden_size // cfg.num_heads)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0              # slots filled
        self.next_position = 0       # rotary position of the next token


class TransformerDecoder(nn.Module):
    def __init__(self, cfg: LlamaModelConfig, attention_impl: str):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg, attention_impl) for _ in range(cfg.num_hidden_layers))
        self.norm = make_norm(cfg.norm_type, cfg.hidden_size, cfg.layer_norm_epsilon)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaModelConfig, attention_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.embedding_layer = TextEmbeddings(cfg)
        self.transformer_decoder = TransformerDecoder(cfg, attention_impl)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=cfg.use_bias_in_output)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.share_embedding_weights:
            self.lm_head.weight = self.embedding_layer.word_embeddings.weight

    def compute_input_embeddings(self, input_ids: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        """(B, S) token ids -> (B, S, H)."""
        x = self.embedding_layer.word_embeddings(input_ids)
        return self.embedding_layer.dropout(x, rng)

    def positions(self, b: int, s: int, token_modality_idx: Optional[torch.Tensor], device,
                  segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.config.constant_image_position and token_modality_idx is not None:
            return constant_image_positions(token_modality_idx, segment_ids)
        return torch.arange(s, device=device)[None].expand(b, s)

    def _image(self, token_modality_idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not self.config.visual_experts or token_modality_idx is None:
            return None
        return (token_modality_idx == 1)[..., None]

    def forward(self, embeddings: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                token_modality_idx: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, rng: Optional[Rng] = None) -> torch.Tensor:
        """embeddings (B, S, H) -> logits (B, S, V); causal, padding keys masked. With visual
        experts, ``token_modality_idx`` (1 = image) selects the expert weights per position.
        A packed row (``segment_ids`` (B, S), 0 = padding) attends within each sample only;
        its ``position_ids`` restart at 0 per sample (constant image positions: derived here)."""
        b, s, _ = embeddings.shape
        cfg = self.config
        if position_ids is None or (segment_ids is not None and cfg.constant_image_position
                                    and token_modality_idx is not None):
            position_ids = self.positions(b, s, token_modality_idx, embeddings.device, segment_ids)
        rotary = rotary_cos_sin(position_ids, cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, embeddings.dtype)
        if segment_ids is None:
            mask = causal_padding_mask(key_padding_mask, s, embeddings.dtype, embeddings.device)
        else:
            mask = segment_causal_mask(segment_ids, embeddings.dtype)
        image = self._image(token_modality_idx)
        x = embeddings
        for layer in self.transformer_decoder.layers:
            x = layer(x, mask, rotary, image, rng)
        x = self.transformer_decoder.norm(x)
        return self.lm_head(x)

    def forward_cached(self, embeddings: torch.Tensor, cache: KVCache, last_only: bool = True,
                       token_modality_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The next tokens of a cached sequence: embeddings (B, s, H) in cache slots
        ``cache.length ..``; returns logits (B, 1 or s, V) and advances the cache. Rotary
        positions continue from the last one (image runs share one with constant_image_position)."""
        b, s, _ = embeddings.shape
        start = cache.length
        if start + s > cache.max_len:
            raise ValueError(f"sequence of {start + s} positions exceeds the cache ({cache.max_len})")
        cfg = self.config
        positions = self.positions(b, s, token_modality_idx, embeddings.device) + cache.next_position
        rotary = rotary_cos_sin(positions, cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, embeddings.dtype)
        image = self._image(token_modality_idx)
        x = embeddings
        for layer, k, v in zip(self.transformer_decoder.layers, cache.k, cache.v):
            x = layer.forward_cached(x, rotary, k, v, start, image)
        cache.length = start + s
        cache.next_position = int(positions[0, -1]) + 1
        x = self.transformer_decoder.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)
