"""legalize's rewrite rules (mmgraph/passes/legalize.py runs them): each ATen overload a wafer
target does not lower, rewritten into the forms cstorch itself emits, and the legal ops in a form
the lowering refuses. ``Rewriter`` inserts the new ops with the replaced op's metadata, layer,
module and phase, and a value of the trace's fake mode."""

from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.fx as fx

from mmgraph.core import rng as _rng  # noqa: F401 - registers mmgraph::dropout_keep, which a rule rewrites
from mmgraph.core.ir import NodeInfo
from mmgraph.core.opcost import node_bytes, node_flops, node_val

aten = torch.ops.aten
_KEEP_META = ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr", "from_node")


class Rewriter:
    """Inserts new ops before the op being replaced, with its metadata and a fake value."""

    def __init__(self, gm: fx.GraphModule, info: dict[str, NodeInfo]):
        self.gm, self.info = gm, info
        self.node: Optional[fx.Node] = None
        # The trace's fake mode: new values are made in it too (torch-mlir's importer reads fake
        # tensors); None for a program whose values are meta tensors (a loaded artifact).
        fake = next((v for n in gm.graph.nodes for v in node_val(n) if hasattr(v, "fake_mode")), None)
        self.fake_mode = fake.fake_mode if fake is not None else None
        self.device = _device(fake) if fake is not None else torch.device("cpu")
        self.attention: dict[fx.Node, dict] = {}      # forward attention node -> its decomposition
        self.emitted = 0

    def emit(self, target, args: tuple, kwargs: Optional[dict] = None, like=None) -> fx.Node:
        """A new op before the one being replaced. ``like``: a value with the new op's shape and
        dtype (the replaced op's own, for a one-for-one rewrite), so none is computed."""
        kwargs = kwargs or {}
        with self.gm.graph.inserting_before(self.node):
            new = self.gm.graph.call_function(target, tuple(args), kwargs)
        new.meta.update({k: v for k, v in self.node.meta.items() if k in _KEEP_META})
        new.meta["val"] = like if like is not None else self._value(target, args, kwargs)
        vals = node_val(new)
        self.info[new.name] = replace(self.info[self.node.name], shape=tuple(vals[0].shape) if vals else (),
                                      dtype=vals[0].dtype if vals else None, flops=node_flops(new),
                                      bytes=node_bytes(new))
        self.emitted += 1
        return new

    def _value(self, target, args, kwargs):
        """The new op's value: its shape and dtype found on the meta device (several times faster
        than dispatching the op to fake tensors), then made a fake tensor of the trace."""
        def val(a):
            if isinstance(a, fx.Node):
                return _meta(a.meta["val"])
            if isinstance(a, (list, tuple)):
                return type(a)(val(x) for x in a)
            if isinstance(a, torch.device):
                return torch.device("meta")
            return a
        if target is operator.getitem:
            return args[0].meta["val"][args[1]]
        out = target(*val(list(args)), **{k: val(v) for k, v in kwargs.items()})
        return self._fake(out)

    def _fake(self, v):
        """A meta value as a fake tensor of the trace (no dispatch: the converter wraps it)."""
        if self.fake_mode is None:
            return v
        if isinstance(v, (list, tuple)):
            return type(v)(self._fake(x) for x in v)
        if not isinstance(v, torch.Tensor):
            return v
        return self.fake_mode.fake_tensor_converter.from_meta_and_device(self.fake_mode, v, self.device)

    def const(self, value, dtype: torch.dtype) -> fx.Node:
        """A 0-d tensor holding ``value`` (what cstorch passes Tensor overloads)."""
        if dtype.is_floating_point:
            value = float(value)
        return self.emit(aten.full.default, ([], value), _source_kwargs(dtype, self.device),
                         like=self._fake(torch.empty((), dtype=dtype, device="meta")))


def _device(v: torch.Tensor) -> torch.device:
    """Where a source op makes its tensor: the program's device (the CPU a program is traced
    on; values computed here live on the meta device)."""
    return torch.device("cpu") if v.device.type == "meta" else v.device


def _meta(v):
    """``v`` as a contiguous meta tensor (strides are the executor's business: shapes and dtypes
    are what the passes read, and ``view_copy`` of a strided meta tensor would be refused)."""
    if isinstance(v, torch.Tensor):
        return torch.empty(v.shape, dtype=v.dtype, device="meta")
    if isinstance(v, (list, tuple)):
        return type(v)(_meta(x) for x in v)
    return v


def _source_kwargs(dtype: torch.dtype, device) -> dict:
    return {"dtype": dtype, "layout": torch.strided, "device": device, "pin_memory": False}


def _val(node) -> torch.Tensor:
    return node.meta["val"]


def _shape(node) -> list[int]:
    return [int(d) for d in _val(node).shape]


# --- views: their functional forms -------------------------------------------------------------

def _view(rw: Rewriter, node: fx.Node):
    return rw.emit(aten.view_copy.default, (node.args[0], _shape(node)), like=_val(node))


def _expand(rw: Rewriter, node: fx.Node):
    return rw.emit(aten.expand_copy.default, (node.args[0], _shape(node)), like=_val(node))


def _as_copy(copy) -> Callable:
    """The same arguments, the ``*_copy`` overload (the same value: tuples for split)."""
    return lambda rw, node: rw.emit(copy, node.args, dict(node.kwargs), like=node.meta["val"])


def _unbind(rw: Rewriter, node: fx.Node):
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return [rw.emit(aten.select_copy.int, (x, dim, i)) for i in range(_val(x).shape[dim])]


# --- Scalar overloads: Tensor overloads on a 0-d value -----------------------------------------

def _scalar_dtype(tensor: fx.Node, scalar) -> torch.dtype:
    """The 0-d value's dtype: float32 for a floating result (a 0-d tensor does not promote a
    16-bit one, and the value keeps the precision the scalar had), else the promoted type."""
    promoted = torch.result_type(_val(tensor), scalar)
    return torch.float32 if promoted in (torch.float16, torch.bfloat16) else promoted


def _tensor_overload(tensor_op, position: int = 1) -> Callable:
    def rule(rw: Rewriter, node: fx.Node):
        args = list(node.args)
        anchor = args[0] if isinstance(args[0], fx.Node) else next(a for a in args if isinstance(a, fx.Node))
        args[position] = rw.const(args[position], _scalar_dtype(anchor, args[position]))
        return rw.emit(tensor_op, tuple(args), dict(node.kwargs), like=_val(node))
    return rule


def _rsub(rw: Rewriter, node: fx.Node):
    x, c = node.args[0], node.args[1]
    alpha = node.args[2] if len(node.args) > 2 else node.kwargs.get("alpha", 1)
    other = rw.const(c, _scalar_dtype(x, c))
    return rw.emit(aten.sub.Tensor, (other, x), {"alpha": alpha} if alpha != 1 else {}, like=_val(node))


def _clamp_min(rw: Rewriter, node: fx.Node):
    return rw.emit(aten.clamp.default, (node.args[0], node.args[1], None), like=_val(node))


def _clamp_max(rw: Rewriter, node: fx.Node):
    return rw.emit(aten.clamp.default, (node.args[0], None, node.args[1]), like=_val(node))


def _where_scalar(rw: Rewriter, node: fx.Node):
    cond, a, b = node.args
    dtype = _val(node).dtype
    a = a if isinstance(a, fx.Node) else rw.const(a, dtype)
    b = b if isinstance(b, fx.Node) else rw.const(b, dtype)
    return rw.emit(aten.where.self, (cond, a, b), like=_val(node))


# --- sources: shape and dtype spelled out ------------------------------------------------------

def _source(make, value_at: Optional[int] = None) -> Callable:
    """``make(shape, [value,] dtype=...)`` with the node's own shape, dtype and device."""
    def rule(rw: Rewriter, node: fx.Node):
        out = _val(node)
        value = node.args[value_at] if value_at is not None else None
        args = (_shape(node),) if value is None else (_shape(node), float(value) if out.dtype.is_floating_point
                                                      and not isinstance(value, bool) else value)
        return rw.emit(make, args, _source_kwargs(out.dtype, _device(out)), like=out)
    return rule


def _empty(rw: Rewriter, node: fx.Node):
    out = _val(node)
    return rw.emit(aten.empty.memory_format, (_shape(node),), _source_kwargs(out.dtype, _device(out)), like=out)


# --- legal ops in forms the lowering refuses ----------------------------------------------------

def _pad_bool(rw: Rewriter, node: fx.Node):
    """A bool mask padded as int32, then compared back (strict-soundness mode: "constant_pad_nd
    ... unsupported on bool. Please use one of ... bfloat16, float16, float32, int16, int32")."""
    x, pad = node.args[0], node.args[1]
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    wide = rw.emit(aten._to_copy.default, (x,), {"dtype": torch.int32})
    padded = rw.emit(aten.constant_pad_nd.default, (wide, pad, int(bool(value))))
    return rw.emit(aten.ne.Tensor, (padded, rw.const(0, torch.int32)))


def _all_grads(rw: Rewriter, node: fx.Node):
    """convolution_backward with every output asked for: the lowering types each result as a
    tensor ("op result #0 must be Any Torch tensor type, but got '!torch.none'"); the input
    gradient nobody reads (the image's) is then dead work the target may drop."""
    args = list(node.args)
    args[-1] = [True, True, True]
    return rw.emit(aten.convolution_backward.default, tuple(args), dict(node.kwargs))


# Legal ops in a form the lowering refuses: (the test, the rewrite).
FORM_RULES: dict = {
    aten.constant_pad_nd.default: (lambda node: _val(node).dtype == torch.bool, _pad_bool),
    aten.convolution_backward.default: (lambda node: not all(node.args[-1]), _all_grads),
}


# --- backward-only and CPU-only ops: decompositions --------------------------------------------

def _zeros_like_sizes(rw: Rewriter, grad: fx.Node, sizes) -> fx.Node:
    val, shape = _val(grad), [int(s) for s in sizes]
    return rw.emit(aten.zeros.default, (shape,), _source_kwargs(val.dtype, _device(val)),
                   like=rw._fake(torch.empty(shape, dtype=val.dtype, device="meta")))


def _slice_backward(rw: Rewriter, node: fx.Node):
    grad, sizes, dim, start, end, step = node.args
    size = int(sizes[dim])
    start, end = _clip(start, size), _clip(end, size)
    return rw.emit(aten.slice_scatter.default, (_zeros_like_sizes(rw, grad, sizes), grad, dim, start, end, step),
                   like=_val(node))


def _clip(i: int, size: int) -> int:
    """A slice bound as a non-negative index within the dimension (INT64_MAX and -1 spelled out)."""
    if i < 0:
        i += size
    return max(0, min(i, size))


def _select_backward(rw: Rewriter, node: fx.Node):
    grad, sizes, dim, index = node.args
    return rw.emit(aten.select_scatter.default, (_zeros_like_sizes(rw, grad, sizes), grad, dim, index),
                   like=_val(node))


def _silu_backward(rw: Rewriter, node: fx.Node):
    """grad * s * (1 + x * (1 - s)), s = sigmoid(x) (torch's decomposition)."""
    grad, x = node.args
    s = rw.emit(aten.sigmoid.default, (x,))
    one_minus = rw.emit(aten.add.Scalar, (rw.emit(aten.neg.default, (s,)), 1.0))
    inner = rw.emit(aten.add.Scalar, (rw.emit(aten.mul.Tensor, (x, one_minus)), 1.0))
    return rw.emit(aten.mul.Tensor, (rw.emit(aten.mul.Tensor, (grad, s)), inner), like=_val(node))


def _attention_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    schema = node.target._schema
    out = {a.name: a.default_value if a.has_default_value() else None for a in schema.arguments}
    out.update({a.name: v for a, v in zip(schema.arguments, node.args)})
    out.update(node.kwargs)
    return {n: out.get(n) for n in names}


def _attention(rw: Rewriter, node: fx.Node):
    """softmax(q kᵀ x scale + mask) v as cstorch emits it: bmm, add, _softmax, bmm. Returns
    (out, logsumexp); logsumexp is None (only the backward read it, and it is rewritten too)."""
    a = _attention_args(node, ("query", "key", "value", "dropout_p", "is_causal", "attn_mask", "scale"))
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    (b, h, L, e), (s, ev) = _shape(q), (_shape(k)[-2], _shape(v)[-1])
    if _shape(k)[:2] != [b, h] or _shape(v)[:2] != [b, h]:
        return None                                      # grouped keys: not decomposed (refused)
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(e)
    dtype = _val(q).dtype
    q3 = rw.emit(aten.view_copy.default, (q, [b * h, L, e]))
    qs = rw.emit(aten.mul.Tensor, (q3, rw.const(scale, torch.float32)))
    k3 = rw.emit(aten.view_copy.default, (k, [b * h, s, e]))
    v3 = rw.emit(aten.view_copy.default, (v, [b * h, s, ev]))
    scores = rw.emit(aten.bmm.default, (qs, rw.emit(aten.transpose_copy.int, (k3, 1, 2))))   # (BH, L, S)
    if mask is not None or a["is_causal"]:
        s4 = rw.emit(aten.view_copy.default, (scores, [b, h, L, s]))
        if a["is_causal"]:
            upper = rw.emit(aten.full.default, ([L, s], float("-inf")), _source_kwargs(dtype, _device(_val(q))))
            s4 = rw.emit(aten.add.Tensor, (s4, rw.emit(aten.triu.default, (upper, 1))))
        if mask is not None and _val(mask).dtype == torch.bool:
            s4 = rw.emit(aten.masked_fill.Tensor, (s4, rw.emit(aten.logical_not.default, (mask,)),
                                                    rw.const(float("-inf"), torch.float32)))
        elif mask is not None:
            s4 = rw.emit(aten.add.Tensor, (s4, mask))
        scores = rw.emit(aten.view_copy.default, (s4, [b * h, L, s]))
    p = rw.emit(aten._softmax.default, (scores, -1, False))
    kept, drop_mask = p, None
    if a["dropout_p"]:
        dropped = rw.emit(aten.native_dropout.default, (p, float(a["dropout_p"]), True))
        kept, drop_mask = rw.emit(operator.getitem, (dropped, 0)), rw.emit(operator.getitem, (dropped, 1))
    out = rw.emit(aten.view_copy.default, (rw.emit(aten.bmm.default, (kept, v3)), [b, h, L, ev]))
    rw.attention[node] = {"shapes": (b, h, L, s, e, ev), "qs": qs, "k3": k3, "v3": v3, "p": p, "kept": kept,
                          "drop_mask": drop_mask, "dropout_p": a["dropout_p"], "scale": scale,
                          "dtype": _val(scores).dtype}
    return [out, None]


def _attention_backward(rw: Rewriter, node: fx.Node):
    """dV = Pᵀ dO, dP = dO Vᵀ, dS = softmax'(dP), dQ = dS K x scale, dK = dSᵀ (Q x scale)."""
    a = _attention_args(node, ("grad_out", "logsumexp"))
    lse = a["logsumexp"]               # the forward's second output, read by nothing else
    f = rw.attention.get(lse.args[0]) if lse.target is operator.getitem else None
    if f is None:
        return None
    b, h, L, s, e, ev = f["shapes"]
    d_out = rw.emit(aten.view_copy.default, (a["grad_out"], [b * h, L, ev]))
    dv = rw.emit(aten.bmm.default, (rw.emit(aten.transpose_copy.int, (f["kept"], 1, 2)), d_out))
    dp = rw.emit(aten.bmm.default, (d_out, rw.emit(aten.transpose_copy.int, (f["v3"], 1, 2))))
    if f["drop_mask"] is not None:
        dp = rw.emit(aten.native_dropout_backward.default, (dp, f["drop_mask"], 1.0 / (1.0 - f["dropout_p"])))
    ds = rw.emit(aten._softmax_backward_data.default, (dp, f["p"], -1, f["dtype"]))
    dq = rw.emit(aten.mul.Tensor, (rw.emit(aten.bmm.default, (ds, f["k3"])), rw.const(f["scale"], torch.float32)))
    dk = rw.emit(aten.bmm.default, (rw.emit(aten.transpose_copy.int, (ds, 1, 2)), f["qs"]))
    return [rw.emit(aten.view_copy.default, (dq, [b, h, L, e])),
            rw.emit(aten.view_copy.default, (dk, [b, h, s, e])),
            rw.emit(aten.view_copy.default, (dv, [b, h, s, ev]))]


def _dropout_keep(rw: Rewriter, node: fx.Node):
    """Dropout's counter-based keep mask (mmgraph/core/rng.py) hashes in 64-bit integers, which
    the wafer does not compute ("'cirh.And' op has unsupported dtype: 'i64'", no shifts): the
    target draws its own random numbers instead, as cstorch lowers dropout, keeping where
    ``rand >= p``. Masks then differ from eager PyTorch's, by design (the numeric verifier says
    so and checks the program before this pass)."""
    shape, threshold = [int(d) for d in node.args[0]], int(node.args[5])
    u = rw.emit(aten.rand.default, (shape,), _source_kwargs(torch.float32, _device(_val(node))),
                like=rw._fake(torch.empty(shape, dtype=torch.float32, device="meta")))
    return rw.emit(aten.ge.Tensor, (u, rw.const(threshold / float(1 << 24), torch.float32)))


# The rewrites, by ATen overload. A rule returns the replacement (a node, or one per output of a
# multi-output op: None where no reader remains), or None when it cannot rewrite this instance.
RULES: dict = {
    aten.view.default: _view, aten._unsafe_view.default: _view, aten.reshape.default: _view,
    aten.squeeze.dims: _view, aten.expand.default: _expand,
    aten.t.default: _as_copy(aten.t_copy.default),
    aten.transpose.int: _as_copy(aten.transpose_copy.int),
    aten.permute.default: _as_copy(aten.permute_copy.default),
    aten.slice.Tensor: _as_copy(aten.slice_copy.Tensor),
    aten.select.int: _as_copy(aten.select_copy.int),
    aten.unsqueeze.default: _as_copy(aten.unsqueeze_copy.default),
    aten.squeeze.dim: _as_copy(aten.squeeze_copy.dim),
    aten.squeeze.default: _as_copy(aten.squeeze_copy.default),
    aten.split.Tensor: _as_copy(aten.split_copy.Tensor),
    aten.split_with_sizes.default: _as_copy(aten.split_with_sizes_copy.default),
    aten.as_strided.default: _as_copy(aten.as_strided_copy.default),
    aten.diagonal.default: _as_copy(aten.diagonal_copy.default),
    aten.detach.default: _as_copy(aten.detach_copy.default),
    aten.unbind.int: _unbind,
    aten.mul.Scalar: _tensor_overload(aten.mul.Tensor),
    aten.div.Scalar: _tensor_overload(aten.div.Tensor),
    aten.div.Scalar_mode: _tensor_overload(aten.div.Tensor_mode),
    aten.pow.Tensor_Scalar: _tensor_overload(aten.pow.Tensor_Tensor),
    aten.eq.Scalar: _tensor_overload(aten.eq.Tensor), aten.ne.Scalar: _tensor_overload(aten.ne.Tensor),
    aten.lt.Scalar: _tensor_overload(aten.lt.Tensor), aten.le.Scalar: _tensor_overload(aten.le.Tensor),
    aten.gt.Scalar: _tensor_overload(aten.gt.Tensor), aten.ge.Scalar: _tensor_overload(aten.ge.Tensor),
    aten.bitwise_and.Scalar: _tensor_overload(aten.bitwise_and.Tensor),
    aten.bitwise_or.Scalar: _tensor_overload(aten.bitwise_or.Tensor),
    aten.masked_fill.Scalar: _tensor_overload(aten.masked_fill.Tensor, position=2),
    aten.fill.Scalar: _tensor_overload(aten.fill.Tensor),
    aten.rsub.Scalar: _rsub,
    aten.clamp_min.default: _clamp_min, aten.clamp_max.default: _clamp_max,
    aten.where.ScalarOther: _where_scalar, aten.where.ScalarSelf: _where_scalar, aten.where.Scalar: _where_scalar,
    aten.scalar_tensor.default: _source(aten.full.default, value_at=0),
    aten.full_like.default: _source(aten.full.default, value_at=1),
    aten.new_full.default: _source(aten.full.default, value_at=2),
    aten.ones_like.default: _source(aten.ones.default), aten.new_ones.default: _source(aten.ones.default),
    aten.zeros_like.default: _source(aten.zeros.default), aten.new_zeros.default: _source(aten.zeros.default),
    aten.empty_like.default: _empty, aten.new_empty.default: _empty,
    aten.slice_backward.default: _slice_backward,
    aten.select_backward.default: _select_backward,
    aten.silu_backward.default: _silu_backward,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _attention_backward,
    torch.ops.mmgraph.dropout_keep.default: _dropout_keep,
}


def typed_fills(node: fx.Node) -> bool:
    """A Scalar argument in the kind of the tensor the op makes: a float into a floating tensor
    (CIRH: "Not constant float" for an integer), an integer into an integer or bool tensor (a
    float there aborts the tool: "expected floating point type"; Torch-MLIR has no bool Scalar).
    Returns whether it changed anything."""
    schema = getattr(node.target, "_schema", None)
    vals = node_val(node)
    if schema is None or not vals:
        return False
    floating = vals[0].dtype.is_floating_point or vals[0].dtype.is_complex

    def typed(value):
        if floating and isinstance(value, int):                      # bool is an int
            return float(value)
        if not floating and (isinstance(value, bool) or (isinstance(value, float) and value.is_integer())):
            return int(value)
        return value

    scalars = {a.name for a in schema.arguments if str(a.type) in ("Scalar", "Optional[Scalar]", "number")}
    args = [typed(v) if a.name in scalars else v for a, v in zip(schema.arguments, node.args)]
    args += list(node.args[len(args):])
    kwargs = {k: typed(v) if k in scalars else v for k, v in node.kwargs.items()}
    changed = any(type(a) is not type(b) for a, b in zip(args, node.args)) or \
        any(type(kwargs[k]) is not type(v) for k, v in node.kwargs.items())
    if changed:
        node.args, node.kwargs = tuple(args), kwargs
    return changed


def numbers_as_tensors(rw: Rewriter, node: fx.Node) -> bool:
    """A Python number where the schema wants a Tensor (``mul.Tensor(x, 1.702)``: the trace allows
    it, torch-mlir imports it as the Scalar overload) becomes a 0-d value; returns whether any did."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    tensor_args = [i for i, a in enumerate(schema.arguments[:len(node.args)])
                   if str(a.type) == "Tensor" and isinstance(node.args[i], (int, float)) and not isinstance(node.args[i], bool)]
    if not tensor_args:
        return False
    rw.node = node
    args = list(node.args)
    anchor = next((a for a in args if isinstance(a, fx.Node)), None)
    for i in tensor_args:
        dtype = _scalar_dtype(anchor, args[i]) if anchor is not None else torch.get_default_dtype()
        args[i] = rw.const(args[i], dtype)
    node.args = tuple(args)
    return True


def replace_node(node: fx.Node, result) -> None:
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
        return
    for user in list(node.users):
        if user.target is operator.getitem:
            new = result[user.args[1]]
            if new is not None:        # None: only ops rewritten later read it (attention's logsumexp)
                user.replace_all_uses_with(new)
