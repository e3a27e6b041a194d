"""Masked language-model loss, as the Model Zoo's GPTLMHeadModelLoss computes it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
            loss_scaling: str = "num_tokens", loss_weight: float = 1.0,
            segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross entropy of ``logits (B, S, V)`` against ``labels (B, S)``, weighted by ``loss_mask``.

    ``num_tokens``: sum / number of supervised tokens. ``batch_size``: sum / B * loss_weight,
    where B counts samples: in a packed batch (``segment_ids`` 1..k per row, 0 = padding) the
    samples are the sum over rows of the highest segment id, so a packed batch is scaled like
    the same samples unpacked. Computed in fp32; no data-dependent branches (static shapes).
    """
    b, s, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * s, v), labels.reshape(b * s).long(),
                         reduction="none").view(b, s)
    mask = loss_mask.to(ce.dtype)
    total = (ce * mask).sum()
    if loss_scaling == "num_tokens":
        return total / mask.sum().clamp(min=1.0)
    if segment_ids is None:
        return total / b * loss_weight
    samples = segment_ids.amax(dim=1).sum().to(ce.dtype).clamp(min=1.0)
    return total / samples * loss_weight
