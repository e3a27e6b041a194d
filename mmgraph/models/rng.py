"""Dropout whose masks are the same in eager PyTorch and in the compiled program, on any device,
for any split of a batch over micro-batches and ranks: counter-based random numbers
(``mmgraph.core.rng``: the ``mmgraph::dropout_keep`` op) keyed by the run's seed, the row's
sample (its position in the training stream, not in the dataset), the dropout site and the
element. The program takes the seed and the rows' sample indices as inputs (``rng_seed``,
``sample_index``: ``InputKind.RNG``), so

- a resumed run makes the masks it would have made;
- a sample gets the same masks whether it is trained in one process or on rank 3 of 8, in the
  first micro-batch or the last: data-parallel runs equal one process with dropout on;
- recomputation (remat) makes the masks again from the same inputs: they are pure values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mmgraph.core.ir import RNG_FIELDS, RNG_SEED, SAMPLE_INDEX  # noqa: F401 - the program's inputs
from mmgraph.core.rng import hash32, hash32_int, image_rows, rng_inputs, uniform24  # noqa: F401


@dataclass(frozen=True)
class Rng:
    """The random inputs of one forward: ``seed`` () and ``rows`` (N,) int64 keys, one per row
    of the tensors dropout sees (samples in the language model; images in the encoders)."""

    seed: torch.Tensor
    rows: torch.Tensor            # (B,) the samples' indices in the training stream
    images: int = 0               # > 0: the tensors' rows are the samples' images (B * images)

    @classmethod
    def of(cls, seed: torch.Tensor, sample_index: torch.Tensor) -> "Rng":
        return cls(seed, sample_index)

    def per_image(self, images: int) -> "Rng":
        """For the image encoders, whose rows are sample b's image i (B, I flattened)."""
        return Rng(self.seed, self.rows, images)

    def row_keys(self) -> torch.Tensor:
        """One key per row of the tensors dropout sees."""
        return image_rows(self.rows, self.images) if self.images else self.rows

    def uniform24(self, shape: tuple[int, ...], site: int) -> torch.Tensor:
        """(rows, *rest) int64 values in [0, 2**24), a function of (seed, row key, site, index)."""
        return uniform24(list(shape), self.seed, self.rows, site, self.images)


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
        """True where an element is kept: its 24-bit draw at or above ``p * 2**24`` (one op)."""
        return torch.ops.mmgraph.dropout_keep(list(shape), rng.seed, rng.rows, rng.images, self.site,
                                               int(round(self.p * (1 << 24))))

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
