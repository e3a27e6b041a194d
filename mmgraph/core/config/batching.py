"""How a batch splits: into micro-batches, and across data-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass


def split_batch(batch_size: int, micro_batch_size) -> list[int]:
    """``batch_size`` in pieces of ``micro_batch_size``; the remainder is a last, smaller piece."""
    if not isinstance(micro_batch_size, int) or micro_batch_size >= batch_size:
        return [batch_size]
    full, rest = divmod(batch_size, micro_batch_size)
    return [micro_batch_size] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class RankBatch:
    """One data-parallel rank's part of a global batch (``batch_size`` is global, as the Model
    Zoo's with ``num_csx``; ``micro_batch_size`` is per rank, capped at the rank's batch)."""

    batch: int                    # samples this rank reads per step
    micro_batch: int              # the compiled program's batch
    micro_batches: int            # micro-steps per step (the last may be padded)


def rank_batch(batch_size: int, micro_batch_size, world_size: int) -> RankBatch:
    local = batch_size // world_size
    mbs = micro_batch_size if isinstance(micro_batch_size, int) else local
    mbs = min(mbs, local)
    return RankBatch(local, mbs, len(split_batch(local, mbs)))


@dataclass(frozen=True)
class Search:
    """``micro_batch_size`` left to the compiler: ``auto`` (the divisors of the batch) or
    ``explore`` (every micro-batch from ``low`` to ``high``)."""

    kind: str                     # auto | explore
    low: int
    high: int

    def sizes(self, batch_size: int) -> list[int]:
        if self.kind == "auto":
            return [m for m in range(1, batch_size + 1) if batch_size % m == 0]
        return list(range(self.low, self.high + 1))


def micro_batch_search(micro_batch_size, batch_size: int) -> "Search | None":
    """What the compiler is asked to choose among, or None for a given micro-batch."""
    if micro_batch_size == "auto":
        return Search("auto", 1, batch_size)
    if micro_batch_size == "explore":
        return Search("explore", 1, batch_size)
    bounds = getattr(micro_batch_size, "explore", None)
    if bounds is not None:
        return Search("explore", bounds.min, bounds.max or batch_size)
    return None
