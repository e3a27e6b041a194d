"""MM1-style vision-language connectors: each image's features (N, P, C) -> (N, T, C).

Module names (under ``image_model.connector``)::

    attention_pool   queries (T, C); proj_{q,k,v,output}_dense_layer
    c_abstractor     before.{i}, after.{i}: ResNet blocks (norm -> conv3x3 -> act, twice, + residual)
    avg_pool         no weights
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mmgraph.core.config.model import ConnectorConfig


def _grid(x: torch.Tensor) -> torch.Tensor:
    """(N, P, C) with P a square -> (N, C, g, g)."""
    n, p, c = x.shape
    g = math.isqrt(p)
    return x.transpose(1, 2).reshape(n, c, g, g).contiguous()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h*w, C)."""
    return x.flatten(2).transpose(1, 2)


class AvgPool(nn.Module):
    def __init__(self, cfg: ConnectorConfig, width: int):
        super().__init__()
        self.side = math.isqrt(cfg.num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _tokens(F.adaptive_avg_pool2d(_grid(x), self.side))


class AttentionPool(nn.Module):
    """``num_tokens`` learned queries, multi-head cross-attention over the image's features."""

    def __init__(self, cfg: ConnectorConfig, width: int):
        super().__init__()
        self.heads = cfg.num_heads
        self.queries = nn.Parameter(torch.randn(cfg.num_tokens, width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.proj_q_dense_layer = nn.Linear(width, width)
        self.proj_k_dense_layer = nn.Linear(width, width)
        self.proj_v_dense_layer = nn.Linear(width, width)
        self.proj_output_dense_layer = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p, c = x.shape
        h, d = self.heads, c // self.heads
        x = self.norm(x)
        q = self.proj_q_dense_layer(self.queries).reshape(1, -1, h, d).transpose(1, 2).expand(n, h, -1, d)
        k = self.proj_k_dense_layer(x).reshape(n, p, h, d).transpose(1, 2)
        v = self.proj_v_dense_layer(x).reshape(n, p, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)                     # (N, h, T, d)
        return self.proj_output_dense_layer(out.transpose(1, 2).reshape(n, -1, c))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm2 = nn.GroupNorm(1, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(y)))


class CAbstractor(nn.Module):
    """Convolutions keep locality; adaptive pooling sets the token count."""

    def __init__(self, cfg: ConnectorConfig, width: int):
        super().__init__()
        self.side = math.isqrt(cfg.num_tokens)
        self.before = nn.Sequential(*(ResBlock(width) for _ in range(cfg.num_blocks)))
        self.after = nn.Sequential(*(ResBlock(width) for _ in range(cfg.num_blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.before(_grid(x))
        return _tokens(self.after(F.adaptive_avg_pool2d(g, self.side)))


CONNECTORS = {"avg_pool": AvgPool, "attention_pool": AttentionPool, "c_abstractor": CAbstractor}


def make_connector(cfg: ConnectorConfig | None, width: int) -> nn.Module:
    return nn.Identity() if cfg is None else CONNECTORS[cfg.name](cfg, width)
