"""cleanup: no-op views and detaches, assertion nodes, common subexpressions, dead code."""

from __future__ import annotations

import torch
import torch.fx as fx

from mmgraph.core.ir import GRAPH_CHANGE, Program
from mmgraph.core.ops import cleanup_role, info as op_info
from mmgraph.passes.util import copy_program, drop_dead

def _shape(node) -> tuple | None:
    """(shape, dtype) of a node's value: a reshape to the same of both is a no-op."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None

CONTRACT = GRAPH_CHANGE



def _key(node: fx.Node):
    """What makes two calls the same: target and arguments, Python numbers with their type
    (``1``, ``1.0`` and ``True`` hash alike but give other dtypes; ``0.0`` and ``-0.0`` other
    values)."""
    def freeze(x):
        if isinstance(x, (list, tuple)):
            return (type(x).__name__,) + tuple(freeze(i) for i in x)
        if isinstance(x, dict):
            return tuple(sorted((k, freeze(v)) for k, v in x.items()))
        if isinstance(x, float):
            return ("float", x.hex())
        if isinstance(x, (bool, int)):
            return (type(x).__name__, x)
        return x
    return (node.target, freeze(node.args), freeze(node.kwargs))


def cleanup(program: Program) -> tuple[Program, dict]:
    gm, info = copy_program(program)
    counts = {"asserts": 0, "identities": 0, "noop_reshapes": 0, "common_subexpressions": 0}
    seen: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        role = cleanup_role(node)            # the op registry says what cleanup may drop
        if role == "assert":
            gm.graph.erase_node(node)
            info.pop(node.name, None)
            counts["asserts"] += 1
            continue
        replacement = None
        if role == "identity":
            replacement, kind = node.args[0], "identities"
        elif role == "reshape" and _shape(node) is not None and _shape(node) == _shape(node.args[0]):
            replacement, kind = node.args[0], "noop_reshapes"
        # CSE only what the registry knows to be a function of its arguments (fresh: depends
        # on more; an unregistered op: unknown, so never merged)
        elif role != "fresh" and op_info(node) is not None and not str(node.target).endswith("_"):
            key = _key(node)
            try:
                hash(key)
            except TypeError:
                key = None
            if key is not None and key in seen:
                replacement, kind = seen[key], "common_subexpressions"
            elif key is not None:
                seen[key] = node
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            counts[kind] += 1
    counts["dead"] = drop_dead(gm, info)
    return program.with_pass_result(gm, info), counts
