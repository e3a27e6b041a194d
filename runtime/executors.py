"""Executors: what runs a lowered program's kernels, and what each one supports.

- ``reference``: the program's graph module as Python code (fx codegen, generated once), ATen
  ops: the semantics of record. Train and eval, CPU and CUDA.
- ``compiled``: the same graph handed to torch.compile (Inductor), once per program; fuses
  and vectorizes across kernel boundaries. Train and eval, CPU and CUDA. Not bit-identical to
  ``reference`` (Inductor reorders reductions); checked within tolerance.
- ``onnxruntime``: eval only, CPU. Runs the ONNX export of the eval step (the same loss and
  logits, checked against the reference in the tests) with the store's weights as inputs.

All take the program's inputs in order (parameters from the store, then batch fields) and return
its outputs in order.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional

import torch

from mmgraph.config import Params
from mmgraph.errors import Problem, UserError
from mmgraph.ir import InputKind, Program


class Executor:
    name = ""
    modes: frozenset[str] = frozenset({"train", "eval"})
    devices: frozenset[str] = frozenset({"cpu", "cuda"})

    def __init__(self, program: Program, params: Params, device: torch.device):
        self.program = program

    def __call__(self, inputs: list[torch.Tensor]) -> tuple:
        raise NotImplementedError


def placed(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """The graph with every op that makes a tensor (``arange``, ``full``, ...) making it on
    ``device``: programs are traced on the CPU's fake tensors, so those ops name the CPU."""
    if all(n.kwargs.get("device") in (None, device) for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if isinstance(new.kwargs.get("device"), torch.device):
            new.kwargs = {**new.kwargs, "device": device}
        env[node] = new
    return torch.fx.GraphModule(gm, graph)


class ReferenceExecutor(Executor):
    name = "reference"

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        self.fn = placed(program.gm, device)

    def __call__(self, inputs):
        with torch.no_grad():
            return self.fn(*inputs)


class CompiledExecutor(Executor):
    """torch.compile of the whole step graph; compiled on the first call (static shapes)."""

    name = "compiled"

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        self.fn = torch.compile(placed(program.gm, device), dynamic=False, fullgraph=True)

    def __call__(self, inputs):
        with torch.no_grad():
            return self.fn(*inputs)


class OnnxRuntimeExecutor(Executor):
    """The eval step exported to ONNX (weights are graph inputs, not constants) and run in
    onnxruntime; the store's CPU tensors are passed without copies (numpy views)."""

    name = "onnxruntime"
    modes = frozenset({"eval"})
    devices = frozenset({"cpu"})

    def __init__(self, program: Program, params: Params, device: torch.device, path: Optional[Path] = None):
        super().__init__(program, params, device)
        import onnxruntime as ort

        from mmgraph.formats import export_onnx, onnx_skip_reason

        too_big = onnx_skip_reason(program)
        if too_big:
            raise UserError(Problem(None, "--eval_executor", f"onnxruntime cannot serve this model: {too_big.removeprefix('not written: ')}"))
        batch = next(s.shape[0] for s in program.inputs if s.name == "labels")
        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mmgraph-ort-")
            path = Path(self._tmp.name) / "eval.onnx"
        export_onnx(params, path, batch_size=batch)
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feeds = [i.name for i in self.session.get_inputs()]
        index = {("model." + s.name if s.kind == InputKind.PARAM else s.name): i
                 for i, s in enumerate(program.inputs)}
        missing = [f for f in self.feeds if f not in index]
        if missing:
            raise UserError(Problem(str(path), missing[0], "ONNX input has no program input"))
        self.index = [index[f] for f in self.feeds]

    def __call__(self, inputs):
        feeds = {f: inputs[i].detach().cpu().numpy() for f, i in zip(self.feeds, self.index)}
        return tuple(torch.from_numpy(x) for x in self.session.run(None, feeds))


EXECUTORS: dict[str, type[Executor]] = {e.name: e for e in (ReferenceExecutor, CompiledExecutor, OnnxRuntimeExecutor)}


def make_executor(name: str, program: Program, params: Params, device: torch.device) -> Executor:
    """The executor ``name`` for ``program``; an error naming what it does not support."""
    if name == "streaming":
        from mmgraph.runtime.streaming import StreamingExecutor
        return StreamingExecutor(program, params, device)
    cls = EXECUTORS.get(name)
    if cls is None:
        raise UserError(Problem(None, "--executor", f"unknown executor {name!r}; one of {', '.join(EXECUTORS)}"))
    if program.mode not in cls.modes:
        raise UserError(Problem(None, "--executor", f"{name} runs {', '.join(sorted(cls.modes))} programs only, "
                                f"not {program.mode}"))
    if device.type not in cls.devices:
        raise UserError(Problem(None, "--executor", f"{name} runs on {', '.join(sorted(cls.devices))} only, "
                                f"not {device.type}"))
    return cls(program, params, device)
