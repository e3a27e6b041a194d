"""Which values of a traced step grow with the micro-batch, and which do not.

A training step of the LLaVA family handles its samples independently, so every value of the
traced graph is one of two kinds:

- **per-sample**: activations, masks, per-token losses: one sample's worth times the micro-batch;
- **fixed**: weights and their views and casts, the gradients of weights (reductions over the
  batch) and the values that become them unchanged (casts, accumulation), tables that depend on
  no input (rotary cos/sin, position ranges), and scalars (the loss, token counts).

So a figure of the program traced at micro-batch ``m0`` (bytes of a value, FLOPs of an op) is
``fixed + per_sample x m`` at any micro-batch ``m``: the memory model evaluates other micro-batches
and pieces of a micro-batch from one trace (passes/memory.py). tests/test_memory.py checks the
figures against programs traced at other micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch.fx as fx

from mmgraph.core.ir import InputKind, Program
from mmgraph.core.opcost import node_val, value_bytes
from mmgraph.core.ops import info as op_info
from mmgraph.core.ops import op_class

_PASS_THROUGH = ("view", "elementwise")      # ops a gradient passes through unchanged in size


@dataclass(frozen=True)
class Affine:
    """``fixed + per_sample x m``: a figure at micro-batch (or piece) ``m``."""

    fixed: float = 0.0
    per_sample: float = 0.0

    def at(self, m: float) -> float:
        return self.fixed + self.per_sample * m

    def __add__(self, other: "Affine") -> "Affine":
        return Affine(self.fixed + other.fixed, self.per_sample + other.per_sample)

    def __sub__(self, other: "Affine") -> "Affine":
        return Affine(self.fixed - other.fixed, self.per_sample - other.per_sample)


ZERO = Affine()


def _numel(node: fx.Node) -> int:
    return sum(v.numel() for v in node_val(node))


def fixed_values(program: Program) -> set[str]:
    """Names of the nodes (placeholders included) whose values do not grow with the micro-batch."""
    m0 = program.batch_size
    nodes = list(program.gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    fixed: set[str] = set()
    for node, spec in zip(placeholders, program.inputs):
        if spec.kind in (InputKind.PARAM, InputKind.GRAD) or not spec.shape:
            fixed.add(node.name)
    # Gradients of weights and what becomes them unchanged: walk back from each gradient output
    # through ops that keep its size; stop at the op that reduced over the batch (its inputs are
    # per-sample).
    out = nodes[-1]
    todo = [o for o, spec in zip(out.args[0], program.outputs) if isinstance(o, fx.Node) and spec.kind in ("grad", "loss")]
    marked: set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if node in marked:
            continue
        marked.add(node)
        fixed.add(node.name)
        if node.op != "call_function" or op_class(node) not in _PASS_THROUGH:
            continue
        size = _numel(node)
        for a in node.all_input_nodes:
            users = [u for u in a.users if u.op != "output"]
            if a.op == "call_function" and _numel(a) == size and all(u in marked for u in users):
                todo.append(a)
    # Values made only from fixed values, tables that read no input, and scalars.
    for node in nodes:
        if node.op != "call_function" or node.name in fixed:
            continue
        ins = node.all_input_nodes
        if ins and all(a.name in fixed for a in ins):
            # ... unless it broadcasts them to the batch (an expand of a rotary table)
            if not (_batch_shaped(node, m0) and _numel(node) > max(_numel(a) for a in ins)):
                fixed.add(node.name)
        elif not ins and not _batch_shaped(node, m0):
            fixed.add(node.name)
        elif _numel(node) <= 1:
            fixed.add(node.name)
    return fixed


def _batch_shaped(node: fx.Node, m0: int) -> bool:
    """A value made from no input that still has the micro-batch as its leading size."""
    return any(len(v.shape) >= 2 and v.shape[0] == m0 for v in node_val(node))


class BatchScaling:
    """Figures of ``program`` as functions of the micro-batch (see the module's docstring)."""

    def __init__(self, program: Program, fixed: Optional[set[str]] = None):
        self.m0 = program.batch_size
        self.fixed = fixed_values(program) if fixed is None else fixed
        self.program = program

    def _split(self, name: str, amount: float) -> Affine:
        return Affine(amount, 0.0) if name in self.fixed else Affine(0.0, amount / self.m0)

    def value(self, node: fx.Node, float_bytes: Optional[int] = None) -> Affine:
        """Bytes of the values ``node`` produces."""
        return self._split(node.name, value_bytes(node, float_bytes))

    def values(self, nodes: Iterable[fx.Node], float_bytes: Optional[int] = None) -> Affine:
        total = ZERO
        for n in nodes:
            total = total + self.value(n, float_bytes)
        return total

    def flops(self, node: fx.Node) -> Affine:
        """An op's FLOPs: fixed when it reads and makes only fixed values."""
        f = self.program.info[node.name].flops
        if node.name in self.fixed and all(a.name in self.fixed for a in node.all_input_nodes):
            return Affine(f, 0.0)
        op = op_info(node)
        if node.name in self.fixed and op is not None and op.flops == "out":
            return Affine(f, 0.0)             # one per element of a fixed output (a gradient)
        return Affine(0.0, f / self.m0)

    def kernel_io(self, kernel, nodes: dict, float_bytes: Optional[int] = None) -> Affine:
        """Bytes a kernel reads and writes (as ``opcost.kernel_io_bytes``), split."""
        members = set(kernel.nodes)
        total = ZERO
        seen: set[str] = set()
        for name in kernel.nodes:
            node = nodes[name]
            for a in node.all_input_nodes:
                if a.name not in members and a.name not in seen:
                    seen.add(a.name)
                    total = total + self.value(a, float_bytes)
            if any(u.name not in members for u in node.users if u.op == "call_function") and op_class(node) != "view":
                total = total + self.value(node, float_bytes)
        return total

    def kernel_flops(self, kernel, nodes: dict) -> Affine:
        total = ZERO
        for name in kernel.nodes:
            total = total + self.flops(nodes[name])
        return total
