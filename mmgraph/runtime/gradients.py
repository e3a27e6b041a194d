"""A step's gradients summed over its micro-batches, in memory the step owns alone.

A program's gradient outputs may share memory: views of one buffer (a transposed matmul, a
reshaped sum, the parts of a split), one tensor for two outputs, or an input (a weight) or a
view of one. The sum is weighed, accumulated and clipped in place, so a gradient is kept as it
is only where nothing else holds its memory (``Claims``); any other is copied.
"""

from __future__ import annotations

import math

import torch


def dense(t: torch.Tensor) -> bool:
    """Every element at its own place, no gaps: some order of its dimensions is contiguous."""
    size = 1
    for stride, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n != 1):
        if stride != size:
            return False
        size *= n
    return True


class Claims:
    """Memory the step's gradients own. A gradient is claimed when it is dense and its elements
    overlap no claimed gradient's and no tensor of ``kept`` (the program's inputs)."""

    def __init__(self, kept):
        self.spans: dict[tuple, list[tuple[int, int]]] = {}
        for t in kept:
            self.spans[t.device, t.untyped_storage().data_ptr()] = [(0, math.inf)]

    def claim(self, t: torch.Tensor) -> bool:
        if not dense(t):
            return False
        lo = t.storage_offset() * t.element_size()
        hi = lo + t.numel() * t.element_size()
        taken = self.spans.setdefault((t.device, t.untyped_storage().data_ptr()), [])
        if any(lo < h and a < hi for a, h in taken):
            return False
        taken.append((lo, hi))
        return True


def accumulate(total: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], share: float,
               owned: Claims) -> None:
    """Adds one micro-batch's ``grads`` weighed by ``share`` to ``total``, in place: into the sums
    already there, else as the gradient itself where ``owned`` claims its memory, else a copy."""
    claimed = []
    for k, g in grads.items():
        if k in total:
            total[k].add_(g, alpha=share)
        elif owned.claim(g):
            total[k] = g
            claimed.append(g)
        else:
            total[k] = g * share
    if share != 1.0:
        for g in claimed:                       # weighed once the copies above have read them
            g.mul_(share)
