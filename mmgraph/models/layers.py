"""Building blocks shared by the encoders, the projector and the language model.

Parameter names follow the Cerebras Model Zoo (``ffn.ffn.0.linear_layer``,
``linear_layer_for_glu``, ...) so its freeze regexes and checkpoints line up.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmgraph.models.rng import Dropout, Rng

GLU_ACTIVATIONS = {"swiglu": F.silu, "geglu": F.gelu, "reglu": F.relu}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {
    "gelu": F.gelu,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


class RMSNorm(nn.Module):
    """LLaMA's RMSNorm: normalized in fp32, scaled in the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


class SingleFeedForwardLayer(nn.Module):
    """``act(linear_layer(x))``, or for GLU activations ``act(linear_layer_for_glu(x)) * linear_layer(x)``."""

    def __init__(self, in_features: int, out_features: int, activation: Optional[str],
                 use_bias: bool, dropout: float = 0.0):
        super().__init__()
        self.linear_layer = nn.Linear(in_features, out_features, bias=use_bias)
        self.glu_act = GLU_ACTIVATIONS.get(activation or "")
        if self.glu_act is not None:
            self.linear_layer_for_glu = nn.Linear(in_features, out_features, bias=use_bias)
        self.act = None if self.glu_act or not activation else ACTIVATIONS[activation]
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        if self.glu_act is not None:
            x = self.glu_act(self.linear_layer_for_glu(x)) * self.linear_layer(x)
        else:
            x = self.linear_layer(x)
            if self.act is not None:
                x = self.act(x)
        return self.dropout(x, rng)


class FeedForwardNetwork(nn.Module):
    """Model Zoo ``FeedForwardNetwork``: used for transformer FFNs and for projectors."""

    def __init__(self, input_unit: int, layers_units: Sequence[int],
                 layers_activation: Optional[Sequence[Optional[str]]] = None, use_bias: bool = True,
                 layers_dropout_rates: Optional[Sequence[Optional[float]]] = None):
        super().__init__()
        n = len(layers_units)
        acts = list(layers_activation) if layers_activation is not None else [None] * n
        drops = [d or 0.0 for d in layers_dropout_rates] if layers_dropout_rates else [0.0] * n
        ins = [input_unit, *layers_units[:-1]]
        self.ffn = nn.ModuleList(
            SingleFeedForwardLayer(i, o, a, use_bias, d)
            for i, o, a, d in zip(ins, layers_units, acts, drops)
        )

    def forward(self, x: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        for layer in self.ffn:
            x = layer(x, rng)
        return x


def init_weights(module: nn.Module, std: float) -> None:
    """Model Zoo initialization: normal(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def apply_initializer(tensor: torch.Tensor, spec) -> None:
    """A Model Zoo initializer (a name or an ``Initializer``) applied in place."""
    name = spec if isinstance(spec, str) else spec.name
    get = (lambda k, d: d) if isinstance(spec, str) else (lambda k, d: getattr(spec, k))
    if name == "normal":
        nn.init.normal_(tensor, get("mean", 0.0), get("std", 0.02))
    elif name == "truncated_normal":
        std, mean = get("std", 0.02), get("mean", 0.0)
        lo = get("a", None) if get("a", None) is not None else mean - 2 * std
        hi = get("b", None) if get("b", None) is not None else mean + 2 * std
        nn.init.trunc_normal_(tensor, mean, std, lo, hi)
    elif name == "xavier_uniform":
        nn.init.xavier_uniform_(tensor, get("gain", 1.0))
    elif name == "xavier_normal":
        nn.init.xavier_normal_(tensor, get("gain", 1.0))
    elif name == "kaiming_uniform":
        nn.init.kaiming_uniform_(tensor, a=get("a", None) or 0.0)
    elif name == "zeros":
        nn.init.zeros_(tensor)
    elif name == "constant":
        nn.init.constant_(tensor, get("value", 0.0))
    else:
        raise ValueError(f"unknown initializer {name!r}")
