"""An eval Program as ONNX: the program's own ATen graph exported (TorchScript exporter, opset
20), its inputs named as the program's (weights are graph inputs, never constants).

The exporter has no symbolic for a few ATen ops that lowered programs hold; they get one here,
written with plain ONNX ops:
- ``_scaled_dot_product_flash_attention_for_cpu`` (scores = q kᵀ x scale, a causal -inf mask
  when asked, an additive mask when given, softmax, x v; its log-sum-exp output from the scores),
- ``_unsafe_view`` (a view), ``_adaptive_avg_pool2d`` (the exporter's own
  ``adaptive_avg_pool2d``), ``_to_copy`` (a cast), ``nll_loss_forward`` (opset 12's
  ``nll_loss``; its ``total_weight`` output, unused by the programs' losses, is a constant),
  ``native_group_norm`` (MM1's C-Abstractor: mean and variance over each group of channels).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mmgraph.core.ir import Program

OPSET = 20
# torch ScalarType numbers -> ONNX TensorProto element types
_ONNX_TYPE = {0: 2, 1: 3, 2: 5, 3: 6, 4: 7, 5: 10, 6: 1, 7: 11, 11: 9, 15: 16}
_registered = False


def _const(g, value) -> object:
    return g.op("Constant", value_t=torch.tensor(value))


def _sdpa_cpu(g, q, k, v, dropout_p=None, is_causal=None, attn_mask=None, scale=None):
    from torch.onnx import symbolic_helper as sh

    scores = g.op("MatMul", q, g.op("Transpose", k, perm_i=[0, 1, 3, 2]))       # (B, H, L, S)
    if scale is not None and not sh._is_none(scale):
        factor = _const(g, float(sh._get_const(scale, "f", "scale")))
    else:
        width = g.op("Gather", g.op("Shape", q), _const(g, -1), axis_i=0)
        factor = g.op("Div", _const(g, 1.0), g.op("Sqrt", g.op("Cast", width, to_i=1)))
    scores = g.op("Mul", scores, factor)
    if is_causal is not None and not sh._is_none(is_causal) and sh._get_const(is_causal, "b", "is_causal"):
        last2 = g.op("Slice", g.op("Shape", scores), _const(g, [-2]), _const(g, [1 << 62]))
        ones = g.op("ConstantOfShape", last2, value_t=torch.tensor([1.0]))
        below = g.op("Trilu", ones, upper_i=0)
        mask = g.op("Where", g.op("Equal", below, _const(g, 0.0)), _const(g, float("-inf")), _const(g, 0.0))
        scores = g.op("Add", scores, mask)
    if attn_mask is not None and not sh._is_none(attn_mask):
        scores = g.op("Add", scores, attn_mask)
    out = g.op("MatMul", g.op("Softmax", scores, axis_i=-1), v)
    lse = g.op("ReduceLogSumExp", scores, _const(g, [-1]), keepdims_i=0)
    return out, lse


def _to_copy(g, self, dtype=None, *_rest):
    from torch.onnx import symbolic_helper as sh

    if dtype is None or sh._is_none(dtype):
        return g.op("Identity", self)
    return g.op("Cast", self, to_i=_ONNX_TYPE[sh._get_const(dtype, "i", "dtype")])


def _nll_loss_forward(g, self, target, weight, reduction, ignore_index):
    from torch.onnx import symbolic_opset12

    return symbolic_opset12.nll_loss(g, self, target, weight, reduction, ignore_index), _const(g, 0.0)


def _native_group_norm(g, x, weight, bias, _n, _c, _hxw, group, eps):
    """(out, mean, rstd) over ``group`` groups of channels: x (N, C, *) seen as (N, G, rest)."""
    from torch.onnx import symbolic_helper as sh

    groups, epsilon = sh._get_const(group, "i", "group"), sh._get_const(eps, "f", "eps")
    grouped = g.op("Reshape", x, _const(g, [0, groups, -1]))
    mean = g.op("ReduceMean", grouped, _const(g, [2]), keepdims_i=1)
    centered = g.op("Sub", grouped, mean)
    var = g.op("ReduceMean", g.op("Mul", centered, centered), _const(g, [2]), keepdims_i=1)
    rstd = g.op("Reciprocal", g.op("Sqrt", g.op("Add", var, _const(g, epsilon))))
    out = g.op("Reshape", g.op("Mul", centered, rstd), g.op("Shape", x))
    per_channel = _const(g, list(range(1, sh._get_tensor_rank(x) - 1)))     # (C,) -> (C, 1, ...)
    if weight is not None and not sh._is_none(weight):
        out = g.op("Mul", out, g.op("Unsqueeze", weight, per_channel))
    if bias is not None and not sh._is_none(bias):
        out = g.op("Add", out, g.op("Unsqueeze", bias, per_channel))
    return out, g.op("Squeeze", mean, _const(g, [2])), g.op("Squeeze", rstd, _const(g, [2]))


def _register() -> None:
    global _registered
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic, symbolic_opset9

    register_custom_op_symbolic("aten::_scaled_dot_product_flash_attention_for_cpu", _sdpa_cpu, OPSET)
    register_custom_op_symbolic("aten::_unsafe_view", symbolic_opset9.view, OPSET)
    register_custom_op_symbolic("aten::_to_copy", _to_copy, OPSET)
    register_custom_op_symbolic("aten::nll_loss_forward", _nll_loss_forward, OPSET)
    register_custom_op_symbolic("aten::native_group_norm", _native_group_norm, OPSET)
    register_custom_op_symbolic("aten::_adaptive_avg_pool2d", symbolic_opset9.adaptive_avg_pool2d, OPSET)
    _registered = True


def export_program(program: Program, path: str | Path) -> list[str]:
    """Write ``program`` (an eval program) as ONNX; returns the ONNX graph's input names (the
    program's, less those the graph does not read)."""
    import onnx

    _register()
    example = tuple(torch.zeros(s.shape, dtype=s.dtype) for s in program.inputs)   # static shapes: values unused
    names = [s.name for s in program.inputs]
    kinds = [o.kind for o in program.outputs]
    outputs = [k if kinds.count(k) == 1 else f"{k}{i}" for i, k in enumerate(kinds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program.gm, example, str(path), dynamo=False, export_params=False, opset_version=OPSET,
                          input_names=names, output_names=outputs, do_constant_folding=False)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return [i.name for i in proto.graph.input]
