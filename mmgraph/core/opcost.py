"""FLOPs and bytes moved by one ATen op, from the shapes in ``node.meta['val']``.

How an op's FLOPs are counted is its op registry entry's (``mmgraph.core.ops``): matmul-class
ops 2 per multiply-add; other compute ops one per output element (some reductions: per input
element); views, metadata ops and allocations zero.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx

from mmgraph.core.ops import info, moves_bytes, op_class, op_name


def _vals(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _vals(item)]
    return []


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def _nbytes(t: torch.Tensor, float_bytes: Optional[int] = None) -> int:
    """Bytes of ``t``; with ``float_bytes``, floating-point values counted at that size (the
    target's precision, whatever dtype the trace holds)."""
    size = float_bytes if float_bytes and t.dtype.is_floating_point else t.element_size()
    return _numel(t.shape) * size


def node_val(node: Any) -> list[torch.Tensor]:
    return _vals(node.meta.get("val")) if isinstance(node, fx.Node) else []


def _matmul_flops(args, out, node) -> int:
    shape = lambda i: args[i][0].shape if i < len(args) and args[i] else None  # noqa: E731
    name = op_name(node)
    if name == "mm":
        (m, k), (_, n) = shape(0), shape(1)
        return 2 * m * k * n
    if name == "addmm":
        (m, k), (_, n) = shape(1), shape(2)
        return 2 * m * k * n + m * n
    if name == "bmm":
        (b, m, k), (_, _, n) = shape(0), shape(1)
        return 2 * b * m * k * n
    if name == "convolution":
        w = shape(1)  # (out_c, in_c/groups, kh, kw)
        return 2 * _numel(out[0].shape) * _numel(w[1:])
    w, grad_out, mask = shape(2), shape(0), node.args[-1]       # convolution_backward
    return 2 * _numel(grad_out) * _numel(w[1:]) * sum(1 for m in mask[:2] if m)


def _attention_flops(args, out, node) -> int:
    backward = "backward" in op_name(node)
    q, k = (args[1][0].shape, args[2][0].shape) if backward else (args[0][0].shape, args[1][0].shape)
    once = 4 * _numel(q[:-1]) * k[-2] * q[-1]
    return 2 * once if backward else once


# FLOPs formulas an op registry entry names (mmgraph.core.ops.Op.flops)
FORMULAS = {
    "zero": lambda args, out, node: 0,
    "out": lambda args, out, node: sum(_numel(o.shape) for o in out),
    "in": lambda args, out, node: _numel(args[0][0].shape) if args and args[0] else 0,
    "mm": _matmul_flops, "addmm": _matmul_flops, "bmm": _matmul_flops, "convolution": _matmul_flops,
    "convolution_backward": _matmul_flops,
    "attention": _attention_flops, "attention_backward": _attention_flops,
}


def node_flops(node: fx.Node) -> int:
    """FLOPs of one call, by its registry entry's formula (one per output element when the op
    is not registered); views and metadata ops count zero."""
    if not moves_bytes(node):
        return 0
    op = info(node)
    formula = FORMULAS[op.flops if op is not None else "out"]
    return formula([node_val(a) for a in node.args], node_val(node), node)


def node_bytes(node: fx.Node, float_bytes: Optional[int] = None) -> int:
    """Bytes read and written by the op if it ran alone (views: zero)."""
    if not moves_bytes(node):
        return 0
    read = sum(_nbytes(v, float_bytes) for a in node.args for v in node_val(a))
    return read + sum(_nbytes(o, float_bytes) for o in node_val(node))


def value_bytes(node: fx.Node, float_bytes: Optional[int] = None) -> int:
    """Bytes of the values ``node`` produces."""
    return sum(_nbytes(v, float_bytes) for v in node_val(node))


def kernel_io_bytes(kernel, nodes, float_bytes: Optional[int] = None) -> int:
    """Bytes a kernel reads from and writes to memory (values crossing its boundary)."""
    members = set(kernel.nodes)
    total = 0
    seen = set()
    for name in kernel.nodes:
        node = nodes[name]
        for a in node.all_input_nodes:
            if a.name not in members and a.name not in seen:
                seen.add(a.name)
                total += value_bytes(a, float_bytes)
        if any(u.name not in members for u in node.users if u.op == "call_function") and op_class(node) != "view":
            total += value_bytes(node, float_bytes)
    return total
