"""Vision Transformer image encoder, CLIP-compatible when configured like CLIP.

Layout and names follow the Model Zoo's ViTModel::

    embedding_layer   conv patchify (linear_proj), CLS token, learned positions, post_embed_ln
    encoder.transformer_encoder.layers[i]   pre-norm blocks: norm1 -> self_attn, norm2 -> ffn
    encoder.transformer_encoder.norm        final norm (not used for LLaVA features)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmgraph.core.config.model import ViTModelConfig
from mmgraph.models.attention import Attention
from mmgraph.models.layers import FeedForwardNetwork
from mmgraph.models.rng import Dropout, Rng


class ViTEmbeddings(nn.Module):
    def __init__(self, cfg: ViTModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.conv = cfg.use_conv_patchified_embedding
        self.patch_size = cfg.patch_size
        if self.conv:   # weight (hidden, C, ph, pw)
            self.linear_proj = nn.Conv2d(cfg.num_channels, h, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size, bias=cfg.use_embed_proj_bias)
        else:           # the Model Zoo's default: weight (hidden, ph * pw * C), patch-major, channels last
            patch = cfg.patch_size[0] * cfg.patch_size[1] * cfg.num_channels
            self.linear_proj = nn.Linear(patch, h, bias=cfg.use_embed_proj_bias)
        self.cls_embedding = nn.Parameter(torch.zeros(h)) if cfg.prepend_cls_token else None
        self.position_embeddings = nn.Embedding(cfg.num_positions, h)
        self.post_embed_ln = (nn.LayerNorm(h, eps=cfg.layer_norm_epsilon)
                              if cfg.use_post_embed_layer_norm else None)
        self.dropout = Dropout(cfg.embedding_dropout_rate)

    def forward(self, images: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        """images: (N, C, H, W) -> (N, P, hidden) with P = patches (+1 CLS)."""
        if self.conv:
            x = self.linear_proj(images)                    # (N, hidden, gh, gw)
            x = x.flatten(2).transpose(1, 2)                # (N, gh*gw, hidden)
        else:
            x = self.linear_proj(patchify(images, self.patch_size))  # (N, gh*gw, hidden)
        if self.cls_embedding is not None:
            cls = self.cls_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = torch.cat((cls, x), dim=1)                  # (N, P, hidden)
        x = x + self.position_embeddings.weight.to(x.dtype)[None]
        if self.post_embed_ln is not None:
            x = self.post_embed_ln(x)
        return self.dropout(x, rng)


def patchify(images: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N, gh*gw, ph*pw*C): patches in row-major order, each (ph, pw, C) flattened."""
    n, c, height, width = images.shape
    ph, pw = patch_size
    gh, gw = height // ph, width // pw
    x = images.reshape(n, c, gh, ph, gw, pw)                # (N, C, gh, ph, gw, pw)
    x = x.permute(0, 2, 4, 3, 5, 1)                         # (N, gh, gw, ph, pw, C)
    return x.reshape(n, gh * gw, ph * pw * c)


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
        # The Model Zoo's ViT: dropout after the attention block and after the FFN's second
        # layer (not its first).
        self.ffn = FeedForwardNetwork(h, [cfg.filter_size, h], [cfg.nonlinearity, None],
                                      cfg.use_ffn_bias, [None, cfg.dropout_rate])
        self.attn_dropout = Dropout(cfg.dropout_rate)

    def forward(self, x: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        a = self.self_attn(self.norm1(x), rng=rng)
        x = x + self.attn_dropout(a, rng)
        return x + self.ffn(self.norm2(x), rng)


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

    def extract_features(self, images: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        """Hidden states after block ``image_layer_idx`` (no final norm), as LLaVA takes them;
        with ``image_layer_idx`` unset, every block then the final norm (the Model Zoo's rule).

        images: (N, C, H, W) -> (N, P, hidden). Blocks after the selected one never run.
        """
        x = self.embedding_layer(images, rng)
        for block in self.encoder.transformer_encoder.layers[: self.config.num_layers_used]:
            x = block(x, rng)
        norm = self.encoder.transformer_encoder.norm
        if self.config.uses_final_norm and norm is not None:
            x = norm(x)
        return x
