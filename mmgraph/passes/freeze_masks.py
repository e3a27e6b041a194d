"""freeze_masks: ``model.freeze`` decides what trains; work that serves only frozen weights goes.

The trace computes a gradient for every parameter the forward uses. This pass drops the
gradient outputs of frozen parameters and removes every node that no remaining output needs:
weight-gradient matmuls of frozen layers, and the whole backward of a frozen encoder that no
trainable parameter precedes.
"""

from __future__ import annotations

from mmgraph.core.ir import GRAPH_CHANGE, Phase, Program
from mmgraph.passes.util import copy_program, drop_dead

CONTRACT = GRAPH_CHANGE



def freeze_masks(program: Program) -> tuple[Program, dict]:
    gm, info = copy_program(program)
    trainable = {s.name for s in program.inputs if s.trainable}
    output = gm.graph.output_node() if hasattr(gm.graph, "output_node") else list(gm.graph.nodes)[-1]
    outs = list(output.args[0])
    keep = [i for i, s in enumerate(program.outputs) if s.kind != "grad" or s.target in trainable]
    output.args = (tuple(outs[i] for i in keep),)
    removed = drop_dead(gm, info, keep_impure=True)
    outputs = tuple(program.outputs[i] for i in keep)
    before = program.flops(Phase.BACKWARD)
    after = sum(i.flops for i in info.values() if i.phase == Phase.BACKWARD)
    notes = {
        "gradients_dropped": len(program.outputs) - len(outputs),
        "nodes_removed": removed,
        "backward_flops_before": before,
        "backward_flops_after": after,
    }
    return program.with_pass_result(gm, info, outputs), notes
