"""Vision Transformer image encoder, CLIP-compatible when configured like CLIP.

Layout and names follow the Model Zoo's ViTModel::

    embedding_layer   conv patchify (linear_proj), CLS token, learned positions, post_embed_ln
    encoder.transformer_encoder.layers[i]   pre-norm blocks: norm1 -> self_attn, norm2 -> ffn
    encoder.transformer_encoder.norm        final norm (not used for LLaVA features)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmgraph.config.model import ViTModelConfig
from mmgraph.models.attention import Attention
from mmgraph.models.layers import FeedForwardNetwork


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.linear_proj = nn.Conv2d(cfg.num_channels, h, kernel_size=cfg.patch_size,
                                     stride=cfg.patch_size, bias=cfg.use_embed_proj_bias)
        self.cls_embedding = nn.Parameter(torch.zeros(h)) if cfg.prepend_cls_token else None
        self.position_embeddings = nn.Embedding(cfg.num_positions, h)
        self.post_embed_ln = (nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
                              if cfg.use_post_embed_layer_norm else None)
        self.dropout = cfg.embedding_dropout_rate

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (N, C, H, W) -> (N, P, hidden) with P = patches (+1 CLS)."""
        x = self.linear_proj(images)                        # (N, hidden, gh, gw)
        x = x.flatten(2).transpose(1, 2)                    # (N, gh*gw, hidden)
        if self.cls_embedding is not None:
            cls = self.cls_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat((cls, x), dim=1)                  # (N, P, hidden)
        x = x + self.position_embeddings.weight.to(x.dtype)[None]
        if self.post_embed_ln is not None:
            x = self.post_embed_ln(x)
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, self.training)
        return x


class ViTBlock(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, cfg: ViTModelConfig, attention_impl: str):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.norm1 = nn.LayerNorm(h, eps=eps)
        self.self_attn = Attention(h, cfg.num_heads, use_bias=cfg.use_projection_bias_in_attention,
                                   use_output_bias=cfg.use_ffn_bias_in_attention,
                                   dropout=cfg.attention_dropout_rate, impl=attention_impl,
                                   scaled=cfg.attention_type == "scaled_dot_product")
        self.norm2 = nn.LayerNorm(h, eps=eps)
        self.ffn = FeedForwardNetwork(h, [cfg.filter_size, h], [cfg.nonlinearity, None],
                                      cfg.use_ffn_bias, [cfg.dropout_rate, cfg.dropout_rate])
        self.dropout = cfg.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn(self.norm1(x))
        if self.dropout > 0.0:
            a = F.dropout(a, self.dropout, self.training)
        x = x + a
        return x + self.ffn(self.norm2(x))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ViTModelConfig, attention_impl: str):
        super().__init__()
        self.layers = nn.ModuleList(ViTBlock(cfg, attention_impl) for _ in range(cfg.num_hidden_layers))
        self.norm = (nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
                     if cfg.use_final_layer_norm else None)


class ViTEncoder(nn.Module):
    def __init__(self, cfg: ViTModelConfig, attention_impl: str):
        super().__init__()
        self.transformer_encoder = TransformerEncoder(cfg, attention_impl)


class ViTModel(nn.Module):
    def __init__(self, cfg: ViTModelConfig, attention_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.embedding_layer = ViTEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg, attention_impl)

    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Hidden states after block ``image_layer_idx`` (no final norm), as LLaVA takes them.

        images: (N, C, H, W) -> (N, P, hidden). Blocks after the selected one never run.
        """
        x = self.embedding_layer(images)
        for block in self.encoder.transformer_encoder.layers[: self.config.num_layers_used]:
            x = block(x)
        return x
