"""FLOPs and bytes moved by one ATen op, from the shapes in ``node.meta['val']``.

Matmul-class ops count 2 FLOPs per multiply-add; other compute ops one FLOP per output
element (reductions: per input element); views, metadata ops and allocations count zero.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch
import torch.fx as fx

aten = torch.ops.aten

# Ops that only reinterpret or re-label memory: no FLOPs, no bytes.
VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.t.default,
    aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.slice.Tensor, aten.select.int,
    aten.detach.default, aten.alias.default, aten.as_strided.default, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.lift_fresh_copy.default,
    aten._assert_tensor_metadata.default,
}


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


def node_flops(node: fx.Node) -> int:
    t = node.target
    if node.op != "call_function" or t in VIEW_OPS or t is operator.getitem:
        return 0
    args = [node_val(a) for a in node.args]
    out = node_val(node)
    shape = lambda i: args[i][0].shape if i < len(args) and args[i] else None  # noqa: E731
    if t == aten.mm.default:
        (m, k), (_, n) = shape(0), shape(1)
        return 2 * m * k * n
    if t == aten.addmm.default:
        (m, k), (_, n) = shape(1), shape(2)
        return 2 * m * k * n + m * n
    if t == aten.bmm.default:
        (b, m, k), (_, _, n) = shape(0), shape(1)
        return 2 * b * m * k * n
    if t == aten.convolution.default:
        w = shape(1)  # (out_c, in_c/groups, kh, kw)
        return 2 * _numel(out[0].shape) * _numel(w[1:])
    if t == aten.convolution_backward.default:
        w = shape(2)
        grad_out = shape(0)
        mask = node.args[-1]
        per = 2 * _numel(grad_out) * _numel(w[1:])
        return per * sum(1 for m in mask[:2] if m)
    if "scaled_dot_product" in str(t):
        q, k = shape(0), shape(1)
        if "backward" in str(t):
            q, k = shape(1), shape(2)
            return 2 * (4 * _numel(q[:-1]) * k[-2] * q[-1])
        return 4 * _numel(q[:-1]) * k[-2] * q[-1]
    if t in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten._log_softmax.default,
             aten._softmax.default, aten.sum.default, aten.native_layer_norm.default):
        return _numel(args[0][0].shape) if args and args[0] else 0
    if t in (aten.embedding.default, aten.scatter.src, aten.cat.default, aten.clone.default,
             aten._to_copy.default, aten.zeros.default, aten.full.default, aten.empty.memory_format,
             aten.new_zeros.default, aten.ones_like.default, aten.zeros_like.default,
             aten.full_like.default, aten.empty_like.default, aten.arange.default,
             aten.arange.start_step, aten.scalar_tensor.default, aten.slice_backward.default,
             aten.select_backward.default, aten.copy.default, aten.fill.Scalar):
        return 0
    return sum(_numel(o.shape) for o in out)


def node_bytes(node: fx.Node, float_bytes: Optional[int] = None) -> int:
    """Bytes read and written by the op if it ran alone (views: zero)."""
    if node.op != "call_function" or node.target in VIEW_OPS or node.target is operator.getitem:
        return 0
    read = sum(_nbytes(v, float_bytes) for a in node.args for v in node_val(a))
    return read + sum(_nbytes(o, float_bytes) for o in node_val(node))


def value_bytes(node: fx.Node, float_bytes: Optional[int] = None) -> int:
    """Bytes of the values ``node`` produces."""
    return sum(_nbytes(v, float_bytes) for v in node_val(node))
