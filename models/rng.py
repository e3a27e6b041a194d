"""Dropout with counter-based random numbers: the same masks in eager PyTorch and in the
compiled program, on any device, for any split of a batch over micro-batches and ranks.

A mask element is a hash of four integers: the run's seed, the global index of the sample its
row belongs to (the position of the sample in the training stream, not in the dataset), the
dropout site (every ``Dropout`` module of a model has its own number, given in build order),
and the element's index within the row. Nothing is drawn from a generator's state, so:

- the program takes the seed and the rows' sample indices as inputs (``rng_seed``,
  ``sample_index``: ``InputKind.RNG``), and a resumed run makes the masks it would have made;
- a sample gets the same masks whether it is trained in one process or on rank 3 of 8, in the
  first micro-batch or the last, so data-parallel runs equal one process with dropout on;
- recomputation (remat) makes the masks again from the same inputs: they are pure values.

The hash is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018), applied twice
with keys mixed in, computed exactly in int64 arithmetic (32-bit products split in 16-bit
halves: no signed overflow on any backend). The top 24 bits of the result compared with
``p * 2**24`` decide whether an element is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmgraph.core.ir import RNG_FIELDS, RNG_SEED, SAMPLE_INDEX  # noqa: F401 - the program's inputs
from mmgraph.core.rng import rng_inputs  # noqa: F401 - their values

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_SEED_SALT, _SITE_SALT, _ROW_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for ``x`` in [0, 2**32) and a constant ``c`` < 2**32, exactly:
    (hi * 2**16 + lo) * c = ((hi * c) mod 2**16) * 2**16 + lo * c (mod 2**32); every product
    stays below 2**49."""
    lo, hi = x & _M16, x >> 16
    return ((((hi * c) & _M16) << 16) + lo * c) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of int64 values in [0, 2**32): a well-mixed 32-bit hash."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    """``hash32`` of one Python int in [0, 2**32) (for constants: a site's number)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _key32(x: torch.Tensor) -> torch.Tensor:
    """Any int64 (a sample index may exceed 2**32) folded into [0, 2**32)."""
    return (x & _M32) ^ hash32((x >> 32) & _M32)


@dataclass(frozen=True)
class Rng:
    """The random inputs of one forward: ``seed`` () and ``rows`` (N,) int64 keys, one per row
    of the tensors dropout sees (samples in the language model; images in the encoders)."""

    seed: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(cls, seed: torch.Tensor, sample_index: torch.Tensor) -> "Rng":
        return cls(seed, sample_index)

    def per_image(self, images: int) -> "Rng":
        """Keys of the ``B * images`` image rows (B, I flattened): sample b's image i."""
        slot = torch.arange(images, device=self.rows.device, dtype=torch.int64)
        rows = hash32(_key32(self.rows)[:, None] ^ _ROW_SALT) ^ slot[None, :]       # (B, I)
        return Rng(self.seed, rows.reshape(-1))

    def uniform24(self, shape: tuple[int, ...], site: int) -> torch.Tensor:
        """(rows, *rest) int64 values in [0, 2**24), a function of (seed, row key, site, index)."""
        n_rows, rest = shape[0], shape[1:]
        if self.rows.shape[0] != n_rows:
            raise ValueError(f"dropout: {self.rows.shape[0]} row keys for a tensor of {n_rows} rows")
        seed = hash32(_key32(self.seed.to(torch.int64)) ^ _SEED_SALT)           # ()
        site_key = hash32(seed ^ hash32_int((site * 2 + 1) ^ _SITE_SALT))      # ()
        row = hash32(_key32(self.rows) ^ site_key)                              # (rows,)
        numel = 1
        for d in rest:
            numel *= d
        index = torch.arange(numel, device=self.rows.device, dtype=torch.int64).reshape(1, *rest)
        row = row.reshape(n_rows, *([1] * len(rest)))
        return hash32(hash32(index ^ row) ^ seed) >> 8


class Dropout(nn.Module):
    """Dropout of probability ``p`` whose masks come from ``Rng`` (see the module docstring);
    ``site`` is its number in the model (set by ``number_sites``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p or 0.0)
        self.site = 0

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def forward(self, x: torch.Tensor, rng: Optional[Rng]) -> torch.Tensor:
        if not self.active:
            return x
        if rng is None:
            raise ValueError("dropout in training needs the step's random inputs (rng_seed, sample_index)")
        keep = self.keep_mask(x.shape, rng)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def keep_mask(self, shape, rng: Rng) -> torch.Tensor:
        """True where an element is kept: its 24-bit draw at or above ``p * 2**24``."""
        return rng.uniform24(tuple(shape), self.site) >= int(round(self.p * (1 << 24)))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


def number_sites(model: nn.Module) -> int:
    """Give every ``Dropout`` of ``model`` its site number, in module order; returns how many
    are active at any rate."""
    count = 0
    for i, module in enumerate(m for m in model.modules() if isinstance(m, Dropout)):
        module.site = i
        count += module.p > 0.0
    return count


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, Dropout) and m.p > 0.0 for m in model.modules())
