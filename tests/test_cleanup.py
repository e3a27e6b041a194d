"""cleanup's common subexpressions: calls merge only when they are the same call (numbers with
their type) of an op the registry knows to be a function of its arguments."""

from __future__ import annotations

import torch
import torch.fx as fx

from mmgraph.core.ir import InputKind, InputSpec, NodeInfo, OutputSpec, Phase, Program
from mmgraph.passes.cleanup import cleanup

aten = torch.ops.aten


def _program(build) -> Program:
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.zeros(4, dtype=torch.int64)
    outs = build(graph, x)
    graph.output(tuple(outs))
    info = {n.name: NodeInfo((4,), torch.int64, "", "", Phase.FORWARD, 0, 0) for n in graph.nodes if n.op != "output"}
    specs = (OutputSpec("loss"),) + tuple(OutputSpec("logits") for _ in outs[1:])
    return Program(fx.GraphModule(torch.nn.Module(), graph), (InputSpec("x", InputKind.BATCH, False, (4,), torch.int64),),
                   specs, info, "eval")


def _calls(program: Program) -> list[str]:
    return [n.name for n in program.gm.graph.nodes if n.op == "call_function"]


def test_numbers_of_other_types_are_other_calls():
    def build(g, x):
        return [g.call_function(aten.add.Tensor, (x, 1)), g.call_function(aten.add.Tensor, (x, 1.0)),
                g.call_function(aten.add.Tensor, (x, True)), g.call_function(aten.mul.Tensor, (x, 0.0)),
                g.call_function(aten.mul.Tensor, (x, -0.0))]
    program, counts = cleanup(_program(build))
    assert counts["common_subexpressions"] == 0 and len(_calls(program)) == 5
    x = torch.arange(4)
    outs = program.gm(x)
    assert outs[0].dtype == torch.int64 and outs[1].dtype == torch.float32


def test_same_calls_merge_and_unregistered_ops_do_not():
    def build(g, x):
        return [g.call_function(aten.add.Tensor, (x, 2)), g.call_function(aten.add.Tensor, (x, 2)),
                g.call_function(aten.poisson.default, (x,)), g.call_function(aten.poisson.default, (x,))]
    program, counts = cleanup(_program(build))
    assert counts["common_subexpressions"] == 1
    assert sum(1 for n in program.gm.graph.nodes if n.target is aten.poisson.default) == 2
