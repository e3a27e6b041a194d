"""Dropout's random numbers as one op: ``mmgraph::dropout_keep``, and the random inputs of a
training program (the run's seed, each row's sample index in the training stream).

A keep mask is counter-based: each element is a hash of the seed, its row's key (a sample index,
or an image of a sample), the dropout site (its module's number) and the element's index within
the row. Nothing is drawn from a generator's state, so eager PyTorch and the compiled program
make the same masks from the same inputs, on any device and for any split of a batch; a resumed
run makes the masks it would have made; recomputation makes them again.

The hash is ``lowbias32`` (C. Wellons, "Prospecting for hash functions", 2018), applied twice
with keys mixed in, computed exactly in int64 arithmetic (32-bit products split in 16-bit
halves: no signed overflow on any backend). An element is kept when the top 24 bits of its
hash are at or above ``threshold`` (``round(p * 2**24)``).

The mask is one op in the program (a torch custom op, pure: its output depends only on its
inputs) so passes see dropout as dropout: the registry gives it a class and a cost, remat may
recompute it, and legalize gives a target without 64-bit integer arithmetic (the wafer) the
target's own random numbers instead.
"""

from __future__ import annotations

import torch

from mmgraph.core.ir import RNG_SEED, SAMPLE_INDEX

_M32 = 0xFFFFFFFF
_M16 = 0xFFFF
_SEED_SALT, _SITE_SALT, _ROW_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def rng_inputs(seed: int, first_sample: int, rows: int, device="cpu") -> dict[str, torch.Tensor]:
    """The random inputs of a batch whose rows are samples ``first_sample ..`` of the stream."""
    return {RNG_SEED: torch.tensor(seed, dtype=torch.int64, device=device),
            SAMPLE_INDEX: torch.arange(first_sample, first_sample + rows, dtype=torch.int64, device=device)}


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


def key32(x: torch.Tensor) -> torch.Tensor:
    """Any int64 (a sample index may exceed 2**32) folded into [0, 2**32)."""
    return (x & _M32) ^ hash32((x >> 32) & _M32)


def image_rows(rows: torch.Tensor, images: int) -> torch.Tensor:
    """Keys of the ``B * images`` image rows (B, I flattened) of samples with keys ``rows``."""
    slot = torch.arange(images, device=rows.device, dtype=torch.int64)
    return (hash32(key32(rows)[:, None] ^ _ROW_SALT) ^ slot[None, :]).reshape(-1)


def uniform24(shape: list[int], seed: torch.Tensor, rows: torch.Tensor, site: int, images: int = 0) -> torch.Tensor:
    """(rows, *rest) int64 values in [0, 2**24), a function of (seed, row key, site, index).
    ``images`` > 0: the tensor's rows are the images of the samples ``rows`` (B * images)."""
    if images:
        rows = image_rows(rows, images)
    n_rows, rest = shape[0], list(shape[1:])
    if rows.shape[0] != n_rows:
        raise ValueError(f"dropout: {rows.shape[0]} row keys for a tensor of {n_rows} rows")
    seed_key = hash32(key32(seed.to(torch.int64)) ^ _SEED_SALT)                      # ()
    site_key = hash32(seed_key ^ hash32_int((site * 2 + 1) ^ _SITE_SALT))           # ()
    row = hash32(key32(rows) ^ site_key).reshape(n_rows, *([1] * len(rest)))       # (rows, 1, ..)
    numel = 1
    for d in rest:
        numel *= d
    index = torch.arange(numel, device=rows.device, dtype=torch.int64).reshape(1, *rest)
    return hash32(hash32(index ^ row) ^ seed_key) >> 8


@torch.library.custom_op("mmgraph::dropout_keep", mutates_args=())
def dropout_keep(shape: list[int], seed: torch.Tensor, rows: torch.Tensor, images: int, site: int,
                 threshold: int) -> torch.Tensor:
    """The keep mask (bool, ``shape``) of dropout site ``site``: True where the element's 24-bit
    draw is at or above ``threshold``. ``rows``: the samples' indices; ``images`` > 0 when the
    tensor's rows are those samples' images."""
    return uniform24(shape, seed, rows, site, images) >= threshold


@dropout_keep.register_fake
def _dropout_keep_fake(shape, seed, rows, images, site, threshold):
    return torch.empty(shape, dtype=torch.bool, device=rows.device)
