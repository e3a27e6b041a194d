"""Executors: what runs a lowered program's kernels, and what each one supports.

- ``reference``: the program's graph module as Python code (fx codegen, generated once), ATen
  ops: the semantics of record. Train and eval, CPU and CUDA. An elementwise op whose operand
  no later op reads writes its result there (``reuse_dead_operands``: the same kernel and
  values, no new buffer), as eager autograd sums gradients in place.
- ``compiled``: the same graph compiled by Inductor, per region, once per program; fuses
  and vectorizes across kernel boundaries; on the CPU its float32 GEMMs run on ATen's or
  oneDNN's kernel, whichever measured faster (``runtime/kernels.py``). Train and eval, CPU and
  CUDA. Not bit-identical to ``reference`` (Inductor reorders reductions, oneDNN sums in its
  own order); checked within tolerance.
- ``onnxruntime``: eval only, CPU. Runs the ONNX export of the eval step (the same loss and
  logits, checked against the reference in the tests) with the store's weights as inputs.
- ``streaming`` (``--weight_streaming``): the program run segment by segment (the target's
  partition, split once with ``torch.fx``'s ``split_module``), each segment getting its weights
  from the parameter store when it runs. The store may live in host memory while the program
  runs on a GPU: each segment's weights are copied in just before it runs, the next segment's
  are prefetched on a side stream. With the store on the run device nothing is copied.

All take the program's inputs in order (parameters from the store, then batch fields) and return
its outputs in order.
"""

from __future__ import annotations

import operator
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch.fx.passes.split_module import split_module

from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import InputKind, Program
from mmgraph.core.ops import CLASSES, op_class
from mmgraph.runtime.cpp_builds import batched
from mmgraph.runtime.gradients import dense
from mmgraph.runtime.kernels import cpu_gemms, gemm_policy
from mmgraph.runtime.onnx_program import export_program
from mmgraph.runtime.regions import Region, Site, prepared, region_of, regional, writes_in_place


class Executor:
    """What an executor runs is declared, not discovered: program modes, devices, and the op
    registry's classes (``mmgraph.core.ops``; None: any op, registered or not)."""

    name = ""
    modes: frozenset[str] = frozenset({"train", "eval"})
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    op_classes: Optional[frozenset[str]] = frozenset(CLASSES) - {"collective"}

    def __init__(self, program: Program, params: Params, device: torch.device):
        self.program = program

    def __call__(self, inputs: list[torch.Tensor]) -> tuple:
        raise NotImplementedError


aten = torch.ops.aten
# The functional copies a wafer program holds (legalize: CIRH has no aliasing views), run as the
# views they copy: the same values, since no op of a program writes in place, without the copies
# (1.3x the small config's CPU step otherwise). ``reshape`` for ``view_copy``: it views when it can.
AS_VIEW = {aten.view_copy.default: aten.reshape.default, aten.t_copy.default: aten.t.default,
           aten.transpose_copy.int: aten.transpose.int, aten.permute_copy.default: aten.permute.default,
           aten.slice_copy.Tensor: aten.slice.Tensor, aten.select_copy.int: aten.select.int,
           aten.unsqueeze_copy.default: aten.unsqueeze.default, aten.squeeze_copy.dim: aten.squeeze.dim,
           aten.squeeze_copy.default: aten.squeeze.default, aten.expand_copy.default: aten.expand.default,
           aten.split_copy.Tensor: aten.split.Tensor, aten.split_with_sizes_copy.default: aten.split_with_sizes.default,
           aten.as_strided_copy.default: aten.as_strided.default, aten.diagonal_copy.default: aten.diagonal.default,
           aten.alias_copy.default: aten.alias.default, aten.detach_copy.default: aten.detach.default}


def placed(gm: torch.fx.GraphModule, device: torch.device, own: bool = False) -> torch.fx.GraphModule:
    """The graph as it runs on ``device``: every op that makes a tensor (``arange``, ``full``, ...)
    making it there (programs are traced on the CPU's fake tensors, so those ops name the CPU),
    and functional copies run as views (``AS_VIEW``) when no op writes in place. ``own``: always
    a new graph (its nodes the caller's to change), never ``gm`` itself."""
    nodes = list(gm.graph.nodes)
    moved = not all(n.kwargs.get("device") in (None, device) for n in nodes)
    views = any(n.target in AS_VIEW for n in nodes) and not any(writes_in_place(n) for n in nodes)
    if not moved and not views and not own:
        return gm
    graph = torch.fx.Graph()
    env: dict = {}
    for node in nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if isinstance(new.kwargs.get("device"), torch.device):
            new.kwargs = {**new.kwargs, "device": device}
        if views and new.target in AS_VIEW:
            new.target = AS_VIEW[new.target]
        env[node] = new
    return torch.fx.GraphModule(gm, graph)


# Elementwise ops that may write their result into an operand no later op reads: (in-place
# form, operand positions it may write: the first, or either when the op commutes).
IN_PLACE = {aten.add.Tensor: (aten.add_.Tensor, (0, 1)), aten.mul.Tensor: (aten.mul_.Tensor, (0, 1)),
            aten.sub.Tensor: (aten.sub_.Tensor, (0,)), aten.div.Tensor: (aten.div_.Tensor, (0,)),
            aten.add.Scalar: (aten.add_.Scalar, (0,)), aten.mul.Scalar: (aten.mul_.Scalar, (0,)),
            aten.div.Scalar: (aten.div_.Scalar, (0,)), aten.neg.default: (aten.neg_.default, (0,))}
# Ops whose result shares its input's storage though their schema does not say so.
UNDECLARED_VIEWS = {aten._unsafe_view.default, torch.ops._c10d_functional.wait_tensor.default}
# Views whose elements may share memory: never written in place.
OVERLAPPING_VIEWS = {aten.expand.default, aten.as_strided.default, aten.unfold.default}


def _dead_after(node: torch.fx.Node, user: torch.fx.Node) -> bool:
    """Whether ``user`` is the only reader of ``node``'s storage: ``node`` and each tensor it is a
    view of (back to the op that made the storage) have that one reader, and the storage was made
    by an ATen op of the program (not an input, a constant or a tuple's view)."""
    while True:
        if node.op != "call_function" or list(node.users) != [user] or node.target in OVERLAPPING_VIEWS:
            return False
        if node.target is operator.getitem:               # one output of a multi-output op
            src = node.args[0]
            schema = getattr(src.target, "_schema", None)
            return (schema is not None and src.op == "call_function" and src.target.namespace == "aten"
                    and len(schema.returns) > 1 and all(r.alias_info is None for r in schema.returns)
                    and not schema.is_mutable)
        schema = getattr(node.target, "_schema", None)
        if schema is None or node.target.namespace not in ("aten", "_c10d_functional") or len(schema.returns) != 1:
            return False
        if schema.returns[0].alias_info is None and node.target not in UNDECLARED_VIEWS:
            return not schema.is_mutable                  # a fresh tensor: the storage's maker
        base = node.args[0] if node.args else None        # a view (or in-place op) of its first argument
        if not isinstance(base, torch.fx.Node):
            return False
        node, user = base, node


def reuse_dead_operands(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each elementwise op of ``IN_PLACE`` whose operand no later op reads writes its result into
    that operand's memory (``add`` -> ``add_``), as eager autograd does when it sums gradients:
    the same values (the same kernel, into other memory), no new buffer. Only where the operand
    is dense, of the result's shape and dtype, and its storage made by the program
    (``_dead_after``), so no input, weight, output or live view is written."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in IN_PLACE or "val" not in node.meta:
            continue
        op, positions = IN_PLACE[node.target]
        if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:       # a + alpha * b: not commuting
            positions = (0,)
        out = node.meta["val"]
        if not isinstance(out, torch.Tensor):
            continue
        for i in positions:
            x = node.args[i] if i < len(node.args) else None
            val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
            if (isinstance(val, torch.Tensor) and val.shape == out.shape and val.dtype == out.dtype
                    and val.device == out.device and dense(val) and _dead_after(x, node)):
                if i == 1:
                    node.args = (node.args[1], node.args[0], *node.args[2:])
                node.target = op
                break
    gm.recompile()
    return gm


def reference_graph(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """The program's graph as the ``reference`` (and ``streaming``) executor runs it: placed on
    ``device`` (``placed``), dead operands written in place (``reuse_dead_operands``), on a copy."""
    return reuse_dead_operands(placed(gm, device, own=True))


class ReferenceExecutor(Executor):
    name = "reference"
    op_classes = None                       # the program's own ATen code: collectives included

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        self.fn = reference_graph(program.gm, device)

    def __call__(self, inputs):
        with torch.no_grad():
            return self.fn(*inputs)


def write_back(program: Program) -> list[tuple[int, int]]:
    """(output index, input index) of each output that replaces an input: a program holding the
    optimizer update (``param_update`` of a weight, ``state_update`` of optimizer state)."""
    index = {s.name: i for i, s in enumerate(program.inputs)}
    return [(o, index[spec.target]) for o, spec in enumerate(program.outputs)
            if spec.kind in ("param_update", "state_update") and spec.target in index]


def in_place(gm: torch.fx.GraphModule, pairs: list[tuple[int, int]]) -> torch.fx.GraphModule:
    """``gm`` writing each updated value over its input (``pairs``: ``write_back``) and returning
    that input in its place: an ``aten.copy_`` node as soon as both the value is made and the
    input's last reader has run (so it lands in the region that makes the value). Under
    Inductor they become the update kernels' own stores into the weight and state buffers:
    no new buffers, no copy pass after the step."""
    if not pairs:
        return gm
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    outs = list(nodes[-1].args[0])
    due: dict[int, list[tuple[int, int]]] = {}
    for o, i in pairs:
        after = max([pos[outs[o]]] + [pos[u] for u in placeholders[i].users if u.op != "output"])
        due.setdefault(after, []).append((o, i))
    graph = torch.fx.Graph()
    env: dict = {}
    copies: dict[int, torch.fx.Node] = {}
    for k, node in enumerate(nodes):
        if node.op == "output":
            graph.output(tuple(copies[o] if o in copies else env[v] if isinstance(v, torch.fx.Node) else v
                               for o, v in enumerate(outs)))
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        for o, i in due.get(k, ()):
            copies[o] = graph.call_function(aten.copy_.default, (env[placeholders[i]], env[outs[o]]))
    return torch.fx.GraphModule(gm, graph)


class CompiledExecutor(Executor):
    """Inductor's compile of the step graph, per region (``regional``: each repeated layer's forward,
    its backward, the rest between them) or whole (``regions=False``); compiled on the first
    call (static shapes). A program holding the optimizer update writes the new weights and state
    into their input buffers (``in_place``): the outputs it returns for them are those inputs.
    On the CPU its float32 GEMMs run on the faster of ATen's and oneDNN's kernels
    (``runtime.kernels``)."""

    name = "compiled"

    def __init__(self, program: Program, params: Params, device: torch.device, regions: bool = True):
        super().__init__(program, params, device)
        gm = in_place(placed(program.gm, device), write_back(program))
        if device.type == "cpu":
            gm = cpu_gemms(gm, gemm_policy())
        self.fn = regional(gm, region_of(program, gm)) if regions else Site(Region(gm, shared=False))

    def __call__(self, inputs):
        prepared()                         # before Inductor's first compile: its probes, once
        with torch.no_grad(), batched():
            return self.fn(*inputs)


class OnnxRuntimeExecutor(Executor):
    """The eval program exported to ONNX (``runtime/onnx_program.py``: the program's own graph,
    weights as graph inputs, not constants) and run in onnxruntime; the store's CPU tensors are
    passed without copies (numpy views)."""

    name = "onnxruntime"
    modes = frozenset({"eval"})
    devices = frozenset({"cpu"})

    def __init__(self, program: Program, params: Params, device: torch.device, path: Optional[Path] = None):
        super().__init__(program, params, device)
        import onnxruntime as ort


        if path is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mmgraph-ort-")
            path = Path(self._tmp.name) / "eval.onnx"
        export_program(program, path)
        options = ort.SessionOptions()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.feeds = [i.name for i in self.session.get_inputs()]
        index = {s.name: i for i, s in enumerate(program.inputs)}
        missing = [f for f in self.feeds if f not in index]
        if missing:
            raise UserError(Problem(str(path), missing[0], "ONNX input has no program input"))
        self.index = [index[f] for f in self.feeds]

    def __call__(self, inputs):
        feeds = {f: inputs[i].detach().cpu().numpy() for f, i in zip(self.feeds, self.index)}
        return tuple(torch.from_numpy(x) for x in self.session.run(None, feeds))


class StreamingExecutor(Executor):
    """The program segment by segment, weights fetched from the store per segment."""

    name = "streaming"

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        if not program.segments:
            raise UserError(Problem(None, "--weight_streaming", "the program has no segments: compile it for a "
                                    "target (mmgraph run does)"))
        kernels = {k.id: k for k in program.kernels}
        segment_of = {n: s.id for s in program.segments for k in s.kernels for n in kernels[k].nodes}
        gm = reference_graph(program.gm, device)
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
                        main = torch.cuda.current_stream(self.device)
                        main.wait_stream(self.side)
                        for t in prefetched.values():       # made on the side stream, read on main:
                            t.record_stream(main)           # not reused before main is done with it
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


EXECUTORS: dict[str, type[Executor]] = {e.name: e for e in (ReferenceExecutor, CompiledExecutor, OnnxRuntimeExecutor,
                                                                   StreamingExecutor)}


def make_executor(name: str, program: Program, params: Params, device: torch.device) -> Executor:
    """The executor ``name`` for ``program``; an error naming what it does not support."""
    cls = EXECUTORS.get(name)
    if cls is None:
        raise UserError(Problem(None, "--executor", f"unknown executor {name!r}; one of {', '.join(EXECUTORS)}"))
    if program.mode not in cls.modes:
        raise UserError(Problem(None, "--executor", f"{name} runs {', '.join(sorted(cls.modes))} programs only, "
                                f"not {program.mode}"))
    if device.type not in cls.devices:
        raise UserError(Problem(None, "--executor", f"{name} runs on {', '.join(sorted(cls.devices))} only, "
                                f"not {device.type}"))
    if cls.op_classes is not None:
        for node in program.ops():
            kind = op_class(node)
            if kind not in cls.op_classes:
                what = "not in the op registry" if kind == "unsupported" else f"a {kind} op"
                raise UserError(Problem(None, "--executor", f"{name} does not run {node.target} (node %{node.name}: "
                                        f"{what}); the reference executor runs every op"))
    return cls(program, params, device)
