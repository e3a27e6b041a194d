"""The op registry: every ATen op the passes and executors know, one entry each.

An entry says what an op is to every reader: its class (fusion's legality rules, weight
streaming's and remat's view of values, the cost model's roofline), how its FLOPs are counted
(``mmgraph.core.opcost``), whether it is transcendental (the cost model's special-function
rate), whether it moves bytes at all, and what cleanup may do with it. Entries are keyed by the
op packet's name, so every overload of an op shares its entry. Adding an op is one ``Op(...)``
line in ``_TABLE`` (or a ``register`` call).

Classes (TVM's op patterns, plus what a training step needs):
  view         reinterprets or relabels memory (no kernel of its own)
  elementwise  one output element from the same-position input elements (broadcast, injective)
  reduction    reduces along axes (softmax and norms included)
  matmul       mm, bmm, addmm, convolution
  attention    fused scaled-dot-product attention
  opaque       data-dependent indexing (gather, scatter, embedding): a kernel of its own
  source       makes a tensor from shapes and constants (computed where used)
  collective   communication between ranks (data_parallel's nodes)
Anything else is ``unsupported`` (fusion puts it in a kernel of its own and says why).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.fx as fx

import mmgraph.configs as shipped

CLASSES = ("view", "elementwise", "reduction", "matmul", "attention", "opaque", "source", "collective")


@dataclass(frozen=True)
class Op:
    name: str                 # the ATen op packet's name: "mm", "_softmax", "all_reduce"
    cls: str
    flops: str = "out"        # out: one per output element; in: one per input element; zero; or a
                              # formula name in mmgraph.core.opcost.FORMULAS (mm, bmm, conv, ...)
    moves_bytes: bool = True  # False: metadata only (no bytes, no FLOPs, no kernel time)
    transcendental: bool = False
    cleanup: str = ""         # identity | reshape | assert: what cleanup may drop; fresh: never CSE'd
    random: bool = False      # draws from a generator's state (the target's own random numbers):
                              # never recomputed, and its values are no function of the inputs

    def __post_init__(self):
        if self.cls not in CLASSES:
            raise ValueError(f"op {self.name}: unknown class {self.cls!r}")


def _views(*names: str, moves_bytes: bool = False, cleanup: str = "") -> list[Op]:
    return [Op(n, "view", "zero", moves_bytes, cleanup=cleanup) for n in names]


def _each(cls: str, names: str, **kw) -> list[Op]:
    return [Op(n, cls, **kw) for n in names.split()]


_TABLE: list[Op] = [
    *_views("t", "transpose", "permute", "unsqueeze", "squeeze", "slice", "select", "split",
            "split_with_sizes", "unbind", "as_strided"),
    *_views("view", "_unsafe_view", "reshape", "expand", cleanup="reshape"),
    *_views("detach", "alias", "lift_fresh_copy", cleanup="identity"),
    # the functional forms legalize writes for targets that lower no aliasing views (CIRH)
    *_views("t_copy", "transpose_copy", "permute_copy", "unsqueeze_copy", "squeeze_copy", "slice_copy",
            "select_copy", "split_copy", "split_with_sizes_copy", "as_strided_copy", "expand_copy",
            "alias_copy", "detach_copy", "diagonal_copy"),
    *_views("view_copy", cleanup="reshape"),
    *_views("_assert_tensor_metadata", cleanup="assert"),
    Op("clone", "view", "zero"),                               # fused away, but a copy when alone
    # reductions counted per input element
    *_each("reduction", "sum mean amax native_layer_norm", flops="in"),
    *_each("reduction", "all any", flops="in"),                # the float16 update's finite check
    *_each("reduction", "_softmax _log_softmax", flops="in", transcendental=True),
    *_each("reduction", "_softmax_backward_data _log_softmax_backward_data", transcendental=True),
    *_each("reduction", "amin max native_layer_norm_backward nll_loss_forward nll_loss_backward var_mean var "
                        "native_group_norm native_group_norm_backward _adaptive_avg_pool2d "
                        "_adaptive_avg_pool2d_backward avg_pool2d avg_pool2d_backward"),
    Op("mm", "matmul", "mm"), Op("addmm", "matmul", "addmm"), Op("bmm", "matmul", "bmm"),
    Op("baddbmm", "matmul"), Op("convolution", "matmul", "convolution"),
    Op("convolution_backward", "matmul", "convolution_backward"),
    *_each("attention", "_scaled_dot_product_flash_attention _scaled_dot_product_flash_attention_for_cpu "
                        "_scaled_dot_product_efficient_attention _scaled_dot_product_cudnn_attention",
           flops="attention"),
    *_each("attention", "_scaled_dot_product_flash_attention_backward "
                        "_scaled_dot_product_flash_attention_for_cpu_backward "
                        "_scaled_dot_product_efficient_attention_backward "
                        "_scaled_dot_product_cudnn_attention_backward", flops="attention_backward"),
    *_each("opaque", "embedding scatter", flops="zero"),
    *_each("opaque", "gather embedding_dense_backward index index_put cumsum"),
    *_each("source", "new_zeros zeros full arange scalar_tensor ones_like zeros_like full_like", flops="zero"),
    *_each("source", "empty empty_like", flops="zero", cleanup="fresh"),
    Op("ones", "source"),
    # elementwise, broadcast and injective
    *_each("elementwise", "add sub rsub mul div neg sqrt reciprocal abs sign clamp clamp_min clamp_max "
                          "minimum maximum where eq ne lt le gt ge logical_and logical_or logical_not "
                          "bitwise_and bitwise_or bitwise_not relu masked_fill constant_pad_nd tril triu "
                          "threshold_backward lerp addcmul addcdiv floor ceil round trunc remainder fmod isnan "
                          "isinf isfinite nan_to_num hardtanh leaky_relu elu mish softplus exp2 log1p expm1"),
    *_each("elementwise", "bitwise_xor __rshift__ __lshift__ bitwise_right_shift bitwise_left_shift"),
    # dropout's keep mask (mmgraph/core/rng.py): counter-based, pure; made from the step's
    # random inputs, so it fuses with its consumer and remat may make it again
    Op("dropout_keep", "elementwise"),
    *_each("elementwise", "exp log sigmoid silu gelu tanh erf sin cos pow rsqrt sigmoid_backward silu_backward "
                          "gelu_backward tanh_backward", transcendental=True),
    *_each("elementwise", "_to_copy cat stack slice_backward select_backward slice_scatter select_scatter copy fill",
           flops="zero"),
    *_each("elementwise", "native_dropout bernoulli rand randn randint", cleanup="fresh", random=True),
    Op("native_dropout_backward", "elementwise"),
    *_each("collective", "all_reduce reduce_scatter_tensor all_gather_into_tensor wait_tensor", flops="zero"),
]

REGISTRY: dict[str, Op] = {}


def register(op: Op) -> None:
    """Add (or replace) one op's entry."""
    REGISTRY[op.name] = op


for _op in _TABLE:
    if _op.name in REGISTRY:
        raise ValueError(f"op {_op.name} registered twice")
    register(_op)


def op_name(node: fx.Node) -> str:
    """The op packet's name of a call (``aten.mm.default`` -> ``mm``)."""
    return getattr(node.target, "__name__", str(node.target)).split(".")[0]


def info(node: fx.Node) -> Optional[Op]:
    """The registry's entry for ``node`` (None for inputs, outputs and unknown ops)."""
    if node.op != "call_function" or node.target is operator.getitem:
        return None
    return REGISTRY.get(op_name(node))


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws from a generator's state (``Op.random``)."""
    entry = info(node)
    return entry is not None and entry.random


def addresses_group(node: fx.Node) -> bool:
    """A collective call whose last argument names its process group (all but ``wait_tensor``)."""
    return node.op == "call_function" and op_class(node) == "collective" and op_name(node) != "wait_tensor"


def op_class(node: fx.Node) -> str:
    """``input`` for non-calls, the entry's class, ``view`` for tuple indexing, else ``unsupported``."""
    if node.op != "call_function":
        return "input"
    if node.target is operator.getitem:
        return "view"
    op = REGISTRY.get(op_name(node))
    return op.cls if op is not None else "unsupported"


def moves_bytes(node: fx.Node) -> bool:
    """False for metadata-only calls (views, tuple indexing) and non-calls."""
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    op = REGISTRY.get(op_name(node))
    return op.moves_bytes if op is not None else True


def is_transcendental(node: fx.Node) -> bool:
    op = info(node)
    return op is not None and op.transcendental


def cleanup_role(node: fx.Node) -> str:
    op = info(node)
    return op.cleanup if op is not None else ""


# Legality per target. A host or GPU target runs every registered op (its executors run ATen);
# a wafer target lowers only what its vendor's front end converts: an op set, kept as data
# (``configs/targets/NAME.ops``, a header saying where the list came from, then one MLIR op
# name a line). The ``legalize`` pass rewrites a program into its target's set.
OP_SET_SUFFIX = ".ops"


@dataclass(frozen=True)
class OpSet:
    name: str                 # cirh-2.10.0
    ops: frozenset[str]       # MLIR op names: torch.aten.view_copy, torch.aten.mul.Tensor
    source: tuple[str, ...]   # the file's header: where the list came from


def op_set_path(name: str):
    return Path(shipped.__file__).resolve().parent / "targets" / f"{name}{OP_SET_SUFFIX}"


_OP_SETS: dict[str, OpSet] = {}


def load_op_set(name: str) -> OpSet:
    """The op set ``name`` (read once); FileNotFoundError when there is none."""
    if name not in _OP_SETS:
        lines = op_set_path(name).read_text().splitlines()
        header = tuple(line[1:].strip() for line in lines if line.startswith("#"))
        names = frozenset(line.strip() for line in lines if line.strip() and not line.startswith("#"))
        _OP_SETS[name] = OpSet(name, names, header)
    return _OP_SETS[name]


def mlir_name(target) -> str:
    """The Torch-dialect name of an ATen overload, as torch-mlir imports it: ``aten.mul.Tensor``
    -> ``torch.aten.mul.Tensor``, ``aten.mm.default`` -> ``torch.aten.mm``."""
    schema = getattr(target, "_schema", None)
    if schema is None:
        return str(target)
    namespace, _, base = schema.name.rpartition("::")
    name = f"torch.{namespace or 'aten'}.{base}"
    return name if schema.overload_name in ("", "default") else f"{name}.{schema.overload_name}"


def is_legal(node: fx.Node, op_set: Optional[OpSet]) -> bool:
    """Whether ``node`` lowers on a target with ``op_set`` (None: every registered op).
    Inputs, outputs and tuple indexing are always legal; an op outside the registry never is."""
    if node.op != "call_function" or node.target is operator.getitem:
        return True
    if REGISTRY.get(op_name(node)) is None:
        return False
    return op_set is None or mlir_name(node.target) in op_set.ops
