"""legalize: the program in the ops its target lowers (``Target.ops``, the op registry's op sets).

A host or GPU target runs every registered op, so its program keeps fused kernels (the CPU's
flash attention) and passes through unchanged. A wafer target lowers only its vendor's op set:
for the CS-2/CS-3 the ops Cerebras's CIRH lowering converts (``configs/targets/cirh-2.10.0.ops``).
There the pass rewrites the program into that set, into the forms cstorch itself emits:

- aliasing views (``view``, ``t``, ``transpose``, ``slice``, ``expand``, ...) into their
  functional ``*_copy`` forms with constant shape lists: CIRH has no aliasing;
- Scalar overloads (``mul.Scalar``, ``div.Scalar``, ``pow.Tensor_Scalar``, ``eq.Scalar``, ...) into
  the Tensor overloads on a 0-d value (``full([], c)``);
- sources with shapes and dtypes left implicit (``scalar_tensor``, ``ones_like``, ``new_zeros``,
  ...) into ``full``, ``zeros``, ``ones`` with both spelled out;
- fills of the right dtype: an integer fill (``scatter.value``, ``full``, ...) into a floating tensor
  becomes a float (CIRH wants a constant float there), a float fill into a bool or integer tensor
  (``constant_pad_nd`` of a mask) an integer;
- forms the lowering refuses: a bool mask padded as int32 (strict-soundness mode), a
  ``convolution_backward`` asked for every gradient (its results must all be tensors);
- ops only the CPU trace of a joint graph makes, into their decompositions: ``slice_backward`` /
  ``select_backward`` into a scatter into zeros, ``silu_backward`` into sigmoid arithmetic,
  ``_scaled_dot_product_flash_attention_for_cpu`` and its backward into ``bmm``, ``_softmax`` and
  ``_softmax_backward_data`` (the backward reuses the forward's probabilities, as cstorch's
  attention does).

New ops take the layer, module and phase of the op they replace. An op still outside the set is
refused: one problem per op, naming it, a node, its layer and its module, exit 2 at compile.

The rules are in mmgraph/passes/legalize_rules.py; this module runs them and refuses the rest.
"""

from __future__ import annotations

from typing import Optional

import torch.fx as fx

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import GRAPH_CHANGE, Program
from mmgraph.core.ops import OpSet, is_legal, mlir_name, op_class
from mmgraph.core.target import Target
from mmgraph.passes.legalize_rules import FORM_RULES, RULES, Rewriter, numbers_as_tensors, replace_node, typed_fills
from mmgraph.passes.util import copy_program, drop_dead

CONTRACT = GRAPH_CHANGE


def make_legalize(target: Target):
    """The legalize pass for ``target`` (a pass-through where the target runs every registered op)."""
    op_set = target.op_set()

    def legalize(program: Program) -> tuple[Program, dict]:
        return legalize_for(program, op_set, target.name)
    return legalize


def legalize_for(program: Program, op_set: Optional[OpSet], target_name: str) -> tuple[Program, dict]:
    gm, info = copy_program(program)
    rw = Rewriter(gm, info)
    rewritten: dict[str, int] = {}
    fills = wrapped = 0
    for node in list(gm.graph.nodes):
        form = FORM_RULES.get(node.target) if op_set is not None else None
        if form is not None and form[0](node):
            rw.node = node
            replace_node(node, form[1](rw, node))
            key = f"{mlir_name(node.target)} (form)"
            rewritten[key] = rewritten.get(key, 0) + 1
            continue
        if node.op != "call_function" or is_legal(node, op_set):
            if op_set is not None and node.op == "call_function":
                fills += typed_fills(node)
                wrapped += numbers_as_tensors(rw, node)
            continue
        rule = RULES.get(node.target)
        if rule is None:
            continue
        rw.node = node
        result = rule(rw, node)
        if result is None:
            continue
        replace_node(node, result)
        key = mlir_name(node.target)
        rewritten[key] = rewritten.get(key, 0) + 1
    dead = drop_dead(gm, info)
    if op_set is not None:                  # the new ops' fills too
        fills += sum(typed_fills(n) for n in gm.graph.nodes if n.op == "call_function")
    new = program.with_pass_result(gm, info)
    refuse_illegal(new, op_set, target_name)
    notes = {"op_set": op_set.name if op_set else "registry", "rewritten": sum(rewritten.values()),
             "added": rw.emitted, "removed": dead, "typed_fills": fills,
             "numbers_as_tensors": wrapped}
    notes.update({f"rewrote {k}": v for k, v in sorted(rewritten.items())})
    return new, notes


def illegal_ops(program: Program, op_set: Optional[OpSet]) -> dict[str, list[fx.Node]]:
    """The ops of ``program`` its target does not lower, by MLIR op name, in program order."""
    out: dict[str, list[fx.Node]] = {}
    for node in program.ops():
        if not is_legal(node, op_set):
            out.setdefault(mlir_name(node.target), []).append(node)
    return out


def refuse_illegal(program: Program, op_set: Optional[OpSet], target_name: str) -> None:
    """Exit 2 naming every op the target cannot lower: op, one node, its layer and module."""
    bad = illegal_ops(program, op_set)
    if not bad:
        return
    problems = []
    for name, nodes in bad.items():
        first = program.info[nodes[0].name]
        if op_class(nodes[0]) == "unsupported":
            why = "not in the op registry (mmgraph/core/ops.py)"
        else:
            why = f"not in its op set {op_set.name} (configs/targets/{op_set.name}.ops), and legalize has no rewrite for it"
        more = f" and {len(nodes) - 1} more" if len(nodes) > 1 else ""
        problems.append(Problem(None, None, f"op {name} (node %{nodes[0].name}{more}) in layer {first.layer}, "
                                f"module {first.module or 'the model forward'} does not lower on {target_name}: {why}"))
    raise UserError(problems)
