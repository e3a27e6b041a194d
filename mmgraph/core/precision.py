"""The precision a step computes and moves in, derived once from the params' model section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    """What the step computes and moves in: ``fp32``, or ``bf16``/``fp16`` with mixed precision."""

    name: str

    @property
    def bytes(self) -> int:
        return 4 if self.name == "fp32" else 2

    @property
    def autocast_dtype(self):
        """The dtype the step is traced under autocast in (None: fp32, no autocast)."""
        import torch

        return {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[self.name]


def precision_of(model_cfg) -> Precision:
    """From the Model Zoo keys: ``mixed_precision`` with ``fp16_type`` float16 is fp16, any other
    16-bit type (bfloat16, cbfloat16: a Cerebras format computed as bfloat16) bf16."""
    if not model_cfg.mixed_precision:
        return Precision("fp32")
    return Precision("fp16" if model_cfg.fp16_type == "float16" else "bf16")
