"""Weight streaming: the program run segment by segment (the target's partition), each segment
getting its weights from the parameter store when it runs.

The store may live in host memory while the program runs on a GPU (``--weight_streaming``):
each segment's weights are copied in just before it runs, the next segment's are prefetched on a
side stream, and the gradients go back to the store, where the optimizer updates them. With the
store on the run device (the CPU, or a GPU without streaming) nothing is copied.

The program is split once (``torch.fx`` ``split_module`` by segment: one generated function per
segment); only the segment calls are driven from Python.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx.passes.split_module import split_module

from mmgraph.config import Params
from mmgraph.errors import Problem, UserError
from mmgraph.ir import InputKind, Program
from mmgraph.runtime.executors import Executor, placed


class StreamingExecutor(Executor):
    name = "streaming"

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        if not program.segments:
            raise UserError(Problem(None, "--weight_streaming", "the program has no segments: compile it for a "
                                    "target (mmgraph run does)"))
        kernels = {k.id: k for k in program.kernels}
        segment_of = {n: s.id for s in program.segments for k in s.kernels for n in kernels[k].nodes}
        gm = placed(program.gm, device)
        self.split = split_module(gm, None, lambda n: segment_of[n.name], keep_original_order=True)
        self.device = device
        self.nodes = list(self.split.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        self.param_nodes = {n for n, s in zip(placeholders, program.inputs) if s.kind == InputKind.PARAM}
        self.calls = [n for n in self.nodes if n.op == "call_module"]
        last = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.last_use = last
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _weights(self, call, env) -> dict:
        """The segment's weights on the run device (copied from the store when it is elsewhere)."""
        out = {}
        for a in call.all_input_nodes:
            if a in self.param_nodes:
                t = env[a]
                out[a] = t if t.device == self.device else t.to(self.device, non_blocking=True)
        return out

    def __call__(self, inputs):
        env: dict = {}
        it = iter(inputs)
        with torch.no_grad():
            for node in self.nodes:
                if node.op == "placeholder":
                    t = next(it)
                    env[node] = t if node in self.param_nodes or t.device == self.device else t.to(self.device)
            prefetched: Optional[dict] = None
            k = 0
            for i, node in enumerate(self.nodes):
                if node.op == "call_module":
                    if prefetched is not None and self.side is not None:
                        torch.cuda.current_stream(self.device).wait_stream(self.side)
                    weights = prefetched if prefetched is not None else self._weights(node, env)
                    k += 1
                    prefetched = None
                    if k < len(self.calls):                     # start the next segment's copies
                        if self.side is not None:
                            with torch.cuda.stream(self.side):
                                prefetched = self._weights(self.calls[k], env)
                        else:
                            prefetched = self._weights(self.calls[k], env)
                    args = [weights[a] if a in weights else env[a] if isinstance(a, torch.fx.Node) else a
                            for a in node.args]
                    env[node] = getattr(self.split, node.target)(*args)
                elif node.op == "call_function" and node.target is operator.getitem:
                    env[node] = env[node.args[0]][node.args[1]]
                elif node.op == "output":
                    return tuple(env[a] if isinstance(a, torch.fx.Node) else a for a in node.args[0])
                for a in node.all_input_nodes:                  # drop what no later node reads
                    if self.last_use.get(a) == i and a not in self.param_nodes:
                        env.pop(a, None)
        raise RuntimeError("the split program has no output")
