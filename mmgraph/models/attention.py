"""Multi-head attention with optional rotary positions and grouped key/value heads.

Two implementations of the same math: ``sdpa`` (PyTorch's fused scaled_dot_product_attention,
the fast path) and ``math`` (explicit matmul + softmax, the reference path). Masks are
additive float tensors, so both paths see the same numbers and no row is ever all -inf.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mmgraph.models.rng import Dropout, Rng

ATTENTION_IMPLS = ("sdpa", "math")


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of rotary angles for positions ``(B, S)``: two ``(B, 1, S, rotary_dim)`` tensors.

    Computed in fp32 from the positions (no buffers), then cast, as LLaMA does.
    """
    exponent = torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (exponent / rotary_dim))                    # (rd/2,)
    angles = position_ids.float()[:, :, None] * inv_freq[None, None, :]    # (B, S, rd/2)
    angles = torch.cat((angles, angles), dim=-1)[:, None]                  # (B, 1, S, rd)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of ``x (B, heads, S, head_dim)``; pass the rest."""
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    rot, rest = x[..., :rd], x[..., rd:]
    return torch.cat((rot * cos + _rotate_half(rot) * sin, rest), dim=-1)


class Attention(nn.Module):
    """``proj_{q,k,v,output}_dense_layer`` as in the Model Zoo; ``num_kv_heads < num_heads`` is GQA."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 use_bias: bool = True, use_output_bias: Optional[bool] = None,
                 dropout: float = 0.0, impl: str = "sdpa", scaled: bool = True):
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = hidden_size // num_heads
        kv_size = self.num_kv_heads * self.head_dim
        out_bias = use_bias if use_output_bias is None else use_output_bias
        self.proj_q_dense_layer = nn.Linear(hidden_size, hidden_size, bias=use_bias)
        self.proj_k_dense_layer = nn.Linear(hidden_size, kv_size, bias=use_bias)
        self.proj_v_dense_layer = nn.Linear(hidden_size, kv_size, bias=use_bias)
        self.proj_output_dense_layer = nn.Linear(hidden_size, hidden_size, bias=out_bias)
        self.dropout = Dropout(dropout)               # on the attention probabilities
        self.impl = impl
        self.scale = self.head_dim ** -0.5 if scaled else 1.0

    def _proj(self, name: str, x: torch.Tensor, expert: Optional[nn.Module], image: Optional[torch.Tensor]):
        """The projection ``name``; with a visual expert, its own weights at image positions."""
        out = getattr(self, name)(x)
        if expert is not None and image is not None and hasattr(expert, name):
            out = torch.where(image, getattr(expert, name)(x), out)
        return out

    def _qkv(self, x: torch.Tensor, rotary, expert, image):
        """q (B, nh, S, hd) and k, v (B, nkv, S, hd), rotated."""
        b, s, _ = x.shape
        q = self._proj("proj_q_dense_layer", x, expert, image).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self._proj("proj_k_dense_layer", x, expert, image).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self._proj("proj_v_dense_layer", x, expert, image).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def _attend(self, q, k, v, mask: Optional[torch.Tensor], rng: Optional[Rng], expert, image) -> torch.Tensor:
        """Attention of q over k, v (grouped key/value heads repeated), then the output projection.
        With dropout on the probabilities (training), the probabilities are made explicitly
        (the fused kernel draws its own random numbers, which no program could reproduce)."""
        b, _, s, _ = q.shape
        if self.num_kv_heads != self.num_heads:
            group, n = self.num_heads // self.num_kv_heads, k.shape[2]
            k = k[:, :, None].expand(b, self.num_kv_heads, group, n, self.head_dim).reshape(b, self.num_heads, n, self.head_dim)
            v = v[:, :, None].expand(b, self.num_kv_heads, group, n, self.head_dim).reshape(b, self.num_heads, n, self.head_dim)
        if self.impl == "sdpa" and not self.dropout.active:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale     # (B, nh, S, S_k)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            probs = self.dropout(probs, rng)
            out = torch.matmul(probs, v)                                   # (B, nh, S, hd)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self._proj("proj_output_dense_layer", out, expert, image)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                rotary: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                expert: Optional[nn.Module] = None, image: Optional[torch.Tensor] = None,
                rng: Optional[Rng] = None) -> torch.Tensor:
        """x: (B, S, H); mask: additive, broadcastable to (B, heads, S, S); ``expert`` (a module
        with its own ``proj_*`` layers) replaces the projections where ``image`` (B, S, 1) is set."""
        q, k, v = self._qkv(x, rotary, expert, image)
        return self._attend(q, k, v, mask, rng, expert, image)

    def forward_cached(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                       cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
                       expert: Optional[nn.Module] = None, image: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of ``x`` (B, s, H), the tokens at positions ``start .. start+s-1``, over every
        earlier position: their keys and values are written into the caches (B, kv_heads, L, hd)
        and the attention reads positions ``0 .. start+s-1`` from there."""
        s = x.shape[1]
        q, k, v = self._qkv(x, rotary, expert, image)
        end = start + s
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        mask = None
        if s > 1:                         # query i sits at start + i: keys up to there
            idx = torch.arange(end, device=x.device)
            allowed = idx[None, :] <= (start + torch.arange(s, device=x.device))[:, None]
            mask = torch.where(allowed, torch.zeros((), dtype=q.dtype, device=x.device), torch.finfo(q.dtype).min)
        return self._attend(q, cache_k[:, :, :end], cache_v[:, :, :end], mask, None, expert, image)


def causal_padding_mask(key_padding_mask: Optional[torch.Tensor], seq_len: int,
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask (B or 1, 1, S, S): 0 where a query may attend, dtype-min elsewhere.

    key_padding_mask: (B, S), 1 (or True) marks padding keys.
    """
    idx = torch.arange(seq_len, device=device)
    allowed = (idx[None, :] <= idx[:, None])[None, None]                  # (1, 1, S, S)
    if key_padding_mask is not None:
        allowed = allowed & (key_padding_mask == 0)[:, None, None, :]      # (B, 1, S, S)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def segment_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (B, 1, S, S) of a packed row: a query attends to earlier keys of its own
    sample only (block-diagonal and causal). ``segment_ids`` (B, S): 1, 2, ... per sample,
    0 at padding; padding queries see earlier padding keys only, so no query row is empty and
    no real token ever sees padding or another sample."""
    s = segment_ids.shape[1]
    idx = torch.arange(s, device=segment_ids.device)
    causal = (idx[None, :] <= idx[:, None])[None, None]                   # (1, 1, S, S)
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (B, 1, S, S)
    zero = torch.zeros((), dtype=dtype, device=segment_ids.device)
    return torch.where(causal & same, zero, torch.finfo(dtype).min)
