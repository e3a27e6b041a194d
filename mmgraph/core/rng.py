"""The random inputs of a training program with dropout: the run's seed and each row's sample
index in the training stream (``models/rng.py`` makes the masks from them)."""

from __future__ import annotations

import torch

from mmgraph.core.ir import RNG_SEED, SAMPLE_INDEX


def rng_inputs(seed: int, first_sample: int, rows: int, device="cpu") -> dict[str, torch.Tensor]:
    """The random inputs of a batch whose rows are samples ``first_sample ..`` of the stream."""
    return {RNG_SEED: torch.tensor(seed, dtype=torch.int64, device=device),
            SAMPLE_INDEX: torch.arange(first_sample, first_sample + rows, dtype=torch.int64, device=device)}
