"""Helpers shared by passes: copying a Program's graph, dead-code removal."""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

from mmgraph.core.ir import NodeInfo, Program

# Ops with effects that dead-code elimination must keep even when unused.
_IMPURE = {torch.ops.aten._assert_tensor_metadata.default}


def copy_program(program: Program) -> tuple[fx.GraphModule, dict[str, NodeInfo]]:
    """A deep copy of the graph (passes never mutate their input) and of the info table."""
    graph = copy.deepcopy(program.gm.graph)
    return fx.GraphModule(torch.nn.Module(), graph), dict(program.info)


def drop_dead(gm: fx.GraphModule, info: dict[str, NodeInfo], keep_impure: bool = False) -> int:
    """Remove call_function nodes no output needs; returns how many went."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or node.users:
            continue
        if keep_impure and node.target in _IMPURE:
            continue
        gm.graph.erase_node(node)
        info.pop(node.name, None)
        removed += 1
    gm.recompile()
    return removed
