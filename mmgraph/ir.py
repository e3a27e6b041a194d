"""The Program: one static graph of a training (or eval) step plus typed metadata.

Nodes are ATen ops in an ``fx.Graph``; every parameter and batch field is a placeholder
(weights are never constants). Each pass returns a new Program and appends a PassRecord.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

import torch
import torch.fx as fx


class InputKind(str, Enum):
    PARAM = "param"
    BATCH = "batch"


class Phase(str, Enum):
    FORWARD = "forward"   # everything the loss depends on
    BACKWARD = "backward"


@dataclass(frozen=True)
class InputSpec:
    """One placeholder, in placeholder order."""

    name: str                 # parameter name (Model Zoo names) or batch field
    kind: InputKind
    trainable: bool           # False for batch fields, frozen and unused parameters
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class OutputSpec:
    """``loss``, or ``grad`` of the parameter ``target``."""

    kind: str
    target: Optional[str] = None


@dataclass(frozen=True)
class NodeInfo:
    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]
    module: str               # module path it came from ('' when none)
    layer: str                # e.g. 'text_model.layers.3', 'image_model.encoder0.layers.1', 'head'
    phase: Phase
    flops: int
    bytes: int


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Kernel:
    """Ops the fusion pass grouped into one kernel (names of graph nodes, in order)."""

    id: int
    kind: str        # elementwise | reduction | matmul | attention | opaque
    layer: str
    phase: str
    nodes: tuple[str, ...]
    flops: int
    internal_bytes: int   # bytes of intermediates that never leave the kernel


@dataclass(frozen=True)
class Program:
    gm: fx.GraphModule
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    info: dict[str, NodeInfo]
    mode: str
    history: tuple[PassRecord, ...] = ()
    kernels: Optional[tuple[Kernel, ...]] = None
    refusals: tuple[tuple[str, str, str], ...] = ()   # (node, producer, reason) fusion refused

    def ops(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def flops(self, phase: Optional[Phase] = None) -> int:
        return sum(i.flops for n, i in self.info.items() if phase is None or i.phase == phase)

    def with_pass_result(self, gm: fx.GraphModule, info: dict[str, NodeInfo],
                         outputs: Optional[tuple[OutputSpec, ...]] = None) -> "Program":
        """A new Program with a pass's graph (history is appended by the pipeline)."""
        return replace(self, gm=gm, info=info, outputs=self.outputs if outputs is None else outputs)

    def recorded(self, record: PassRecord) -> "Program":
        return replace(self, history=self.history + (record,))


_LAYER = re.compile(r"layers\.(\d+)")


def layer_of(module: str) -> str:
    """Coarse location for reports and weight-streaming segments."""
    if module.startswith("image_model.image_model_list."):
        idx = module.split(".")[2]
        m = _LAYER.search(module)
        return f"image_model.encoder{idx}." + (f"layers.{m.group(1)}" if m else "embeddings")
    if module.startswith("image_model"):
        return "image_model.projection"
    if module.startswith("text_model"):
        m = _LAYER.search(module)
        if m:
            return f"text_model.layers.{m.group(1)}"
        if "lm_head" in module or "transformer_decoder.norm" in module:
            return "text_model.head"
        return "text_model.embeddings" if "embedding_layer" in module else "text_model"
    return "top" if module == "" else module   # the model's own forward: image scatter, loss
