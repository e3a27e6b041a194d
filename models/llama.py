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

from mmgraph.config.model import LlamaModelConfig
from mmgraph.models.attention import Attention, causal_padding_mask, rotary_cos_sin
from mmgraph.models.layers import FeedForwardNetwork, make_norm


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: LlamaModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


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
        self.dropout = cfg.dropout_rate

    def forward(self, x: torch.Tensor, mask: torch.Tensor,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a = self.self_attn(self.norm1(x), mask, rotary)
        if self.dropout > 0.0:
            a = F.dropout(a, self.dropout, self.training)
        x = x + a
        f = self.ffn(self.norm3(x))
        if self.dropout > 0.0:
            f = F.dropout(f, self.dropout, self.training)
        return x + f


    def forward_cached(self, x: torch.Tensor, rotary, cache_k: torch.Tensor, cache_v: torch.Tensor,
                       start: int) -> torch.Tensor:
        x = x + self.self_attn.forward_cached(self.norm1(x), rotary, cache_k, cache_v, start)
        return x + self.ffn(self.norm3(x))


class KVCache:
    """Keys and values of every layer for up to ``max_len`` positions, allocated once."""

    def __init__(self, cfg: LlamaModelConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.hidden_size // cfg.num_heads)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0


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

    def compute_input_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, S) token ids -> (B, S, H)."""
        x = self.embedding_layer.word_embeddings(input_ids)
        p = max(self.config.embd_pdrop, self.config.embedding_dropout_rate)
        return F.dropout(x, p, self.training) if p > 0.0 else x

    def forward(self, embeddings: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """embeddings (B, S, H) -> logits (B, S, V); causal, padding keys masked."""
        b, s, _ = embeddings.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=embeddings.device)[None].expand(b, s)
        cfg = self.config
        rotary = rotary_cos_sin(position_ids, cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, embeddings.dtype)
        mask = causal_padding_mask(key_padding_mask, s, embeddings.dtype, embeddings.device)
        x = embeddings
        for layer in self.transformer_decoder.layers:
            x = layer(x, mask, rotary)
        x = self.transformer_decoder.norm(x)
        return self.lm_head(x)

    def forward_cached(self, embeddings: torch.Tensor, cache: KVCache, last_only: bool = True) -> torch.Tensor:
        """The next positions of a cached sequence: embeddings (B, s, H) at positions
        ``cache.length ..``; returns logits (B, 1 or s, V) and advances the cache."""
        b, s, _ = embeddings.shape
        start = cache.length
        if start + s > cache.max_len:
            raise ValueError(f"sequence of {start + s} positions exceeds the cache ({cache.max_len})")
        cfg = self.config
        positions = torch.arange(start, start + s, device=embeddings.device)[None].expand(b, s)
        rotary = rotary_cos_sin(positions, cfg.rotary_dim or cfg.head_dim, cfg.rope_theta, embeddings.dtype)
        x = embeddings
        for layer, k, v in zip(self.transformer_decoder.layers, cache.k, cache.v):
            x = layer.forward_cached(x, rotary, k, v, start)
        cache.length = start + s
        x = self.transformer_decoder.norm(x[:, -1:] if last_only else x)
        return self.lm_head(x)
