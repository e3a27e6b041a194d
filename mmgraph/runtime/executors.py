"""Executors: what runs a lowered program's kernels, and what each one supports.

- ``reference``: the program's graph module as Python code (fx codegen, generated once), ATen
  ops: the semantics of record. Train and eval, CPU and CUDA.
- ``compiled``: the same graph handed to torch.compile (Inductor), once per program; fuses
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
import platform
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch.fx.passes.split_module import split_module

from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import InputKind, LayerKind, Program
from mmgraph.core.ops import CLASSES, op_class
from mmgraph.passes.optimizer import LAYER as OPTIMIZER_LAYER
from mmgraph.runtime.kernels import cpu_gemms, gemm_policy
from mmgraph.runtime.onnx_program import export_program


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


def _writes_in_place(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def placed(gm: torch.fx.GraphModule, device: torch.device) -> torch.fx.GraphModule:
    """The graph as it runs on ``device``: every op that makes a tensor (``arange``, ``full``, ...)
    making it there (programs are traced on the CPU's fake tensors, so those ops name the CPU),
    and functional copies run as views (``AS_VIEW``) when no op writes in place."""
    nodes = list(gm.graph.nodes)
    moved = not all(n.kwargs.get("device") in (None, device) for n in nodes)
    views = any(n.target in AS_VIEW for n in nodes) and not any(_writes_in_place(n) for n in nodes)
    if not moved and not views:
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


class ReferenceExecutor(Executor):
    name = "reference"
    op_classes = None                       # the program's own ATen code: collectives included

    def __init__(self, program: Program, params: Params, device: torch.device):
        super().__init__(program, params, device)
        self.fn = placed(program.gm, device)

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
    torch.compile they become the update kernels' own stores into the weight and state buffers:
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


def region_of(program: Program, gm: Optional[torch.fx.GraphModule] = None):
    """The region label of each op node of ``gm`` (the program's graph as it runs: by default
    the program's own): contiguous runs of one transformer layer's forward (or backward, or its
    weights' update: an update op names its weight as its module), and the runs of everything
    else between them; once the layers' updates have begun, the update of the weights of no layer
    is one region, wherever its runs fall (between the layers' updates: each its own compile and
    C++ kernel otherwise), unless that would make regions depend on each other both ways. Nodes the program has no facts for (``in_place``'s
    write-back copies) go with the node before them."""
    layer_of = _weight_layers(program)
    labels: dict[str, int] = {}
    run, last, tail = -1, object(), False
    first: dict = {}
    nodes = [n for n in (gm or program.gm).graph.nodes if n.op not in ("placeholder", "output")]
    for node in nodes:
        info = program.info.get(node.name)
        if info is None:
            key = last
        elif info.kind == LayerKind.BLOCK:
            key = (info.layer, info.phase)
        elif info.module in layer_of:
            key = ("update", layer_of[info.module])
        else:
            key = ("update", None) if tail and info.layer == OPTIMIZER_LAYER else "rest"
        if key != last:
            run, last = run + 1, key
            tail = tail or (isinstance(key, tuple) and key[0] == "update" and key[1] is not None)
            if tail:
                first.setdefault(key, run)
        labels[node.name] = first[key] if key == ("update", None) and tail else max(run, 0)
    if not _acyclic(nodes, labels):
        return region_of_runs(program, gm)
    return lambda node: labels.get(node.name, max(run, 0))


def region_of_runs(program: Program, gm: Optional[torch.fx.GraphModule] = None):
    """``region_of`` with every run a region of its own."""
    layer_of = _weight_layers(program)
    labels: dict[str, int] = {}
    run, last = -1, object()
    for node in (gm or program.gm).graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        info = program.info.get(node.name)
        if info is None:
            key = last
        elif info.kind == LayerKind.BLOCK:
            key = (info.layer, info.phase)
        else:
            key = ("update", layer_of[info.module]) if info.module in layer_of else "rest"
        if key != last:
            run, last = run + 1, key
        labels[node.name] = max(run, 0)
    return lambda node: labels.get(node.name, max(run, 0))


def _acyclic(nodes: list, labels: dict[str, int]) -> bool:
    """Whether the regions ``labels`` makes depend on each other in one direction only."""
    edges: dict[int, set[int]] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            a, b = labels.get(arg.name), labels[node.name]
            if a is not None and a != b:
                edges.setdefault(a, set()).add(b)
    state: dict[int, int] = {}

    def visit(v: int) -> bool:                      # False on a cycle
        stack = [(v, iter(edges.get(v, ())))]
        state[v] = 1
        while stack:
            u, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[u] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return False
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(edges.get(nxt, ()))))
        return True

    return all(visit(v) for v in list(edges) if v not in state)


def _weight_layers(program: Program) -> dict[str, str]:
    """Each weight read by a transformer layer's ops: that layer (the update's regions group a
    repeated layer's weights, as its forward and backward are grouped)."""
    out = {}
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, program.inputs):
        if spec.kind != InputKind.PARAM:
            continue
        users = (program.info.get(u.name) for u in node.users)
        blocks = {i.layer for i in users if i is not None and i.kind == LayerKind.BLOCK}
        if len(blocks) == 1:
            out[spec.name] = blocks.pop()
    return out


def canonical(sub: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``sub`` with its values named by position (``a0``.. inputs, ``v0``.. the rest): two
    regions doing the same thing (one transformer layer and the next) get the same code."""
    graph = torch.fx.Graph()
    env: dict = {}
    for i, node in enumerate(sub.graph.nodes):
        if node.op == "output":
            graph.output(torch.fx.map_arg(node.args[0], lambda n: env[n]))
            continue
        new = graph.node_copy(node, lambda n: env[n])
        new.name = graph._graph_namespace.create_name(f"a{i}" if node.op == "placeholder" else f"v{i}", None)
        if node.op == "placeholder":
            new.target = new.name
        env[node] = new
    return torch.fx.GraphModule(sub, graph)


class OneLayout(torch.nn.Module):
    """A compiled region that several call sites share, called with its inputs in one layout:
    a view with gaps between its elements (the first layer's input is a slice of a longer
    sequence; the next layers get a dense tensor) is made contiguous before the call, so dynamo's
    stride guards do not compile the region's code a second time for one call site (small
    config: 2 of 13 compiles, 2-4 s each, for a 1 MB copy a step). Dense views (a transposed
    weight, an expanded mask: the same at every call site) pass as they are, as do the inputs
    the region writes (``written``: its ``copy_`` targets)."""

    def __init__(self, fn, written: frozenset[int]):
        super().__init__()
        self.fn, self.written = fn, written

    def forward(self, *args):
        return self.fn(*(a.contiguous() if isinstance(a, torch.Tensor) and i not in self.written and _gapped(a) else a
                         for i, a in enumerate(args)))


def _gapped(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements leave gaps in the memory they span: its strides, in increasing
    order (broadcast and size-1 dimensions aside), are not each the product of the sizes below."""
    if t.is_contiguous():
        return False
    span = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1 and st != 0):
        if stride != span:
            return True
        span *= size
    return False


def _written(sub: torch.fx.GraphModule) -> frozenset[int]:
    """Positions of the inputs ``sub`` writes in place."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    targets = {n.args[0] for n in sub.graph.nodes if _writes_in_place(n) and n.args}
    return frozenset(i for i, p in enumerate(placeholders) if p in targets)


# A region with fewer elementwise and reduction ops than this, used once, runs as fx code: there
# is next to nothing for Inductor to fuse, and each of its C++ kernels costs a g++ build (about
# 1 s of CPU) on the first call. On the small config: the patch embedding's run (a convolution,
# the class token's cat, the position add, a layer norm: 2 kernels).
MIN_FUSIBLE = 4


def _fusible(sub: torch.fx.GraphModule) -> int:
    return sum(op_class(n) in ("elementwise", "reduction") for n in sub.graph.nodes if n.op == "call_function")


def regional(gm: torch.fx.GraphModule, program: Program, region) -> torch.fx.GraphModule:
    """``gm`` split into regions (``region_of``) under torch.compile, one compiled function per
    distinct region code (``canonical``): the repeated layers call the same compiled code, so it
    is traced and compiled once (dynamo's guards recompile where an input's shape differs; a
    shared region's inputs are passed in one layout, ``OneLayout``); a region used once with
    little to fuse (``MIN_FUSIBLE``) stays fx code. The split module that calls them is fx code."""
    split = split_module(gm, None, region, keep_original_order=True)
    subs = {name: canonical(sub) for name, sub in split.named_children()}
    uses: dict[str, int] = {}
    for sub in subs.values():
        uses[sub.code] = uses.get(sub.code, 0) + 1
    compiled: dict[str, torch.nn.Module] = {}
    for name, sub in subs.items():
        if uses[sub.code] == 1 and _fusible(sub) < MIN_FUSIBLE:
            setattr(split, name, sub)
            continue
        if sub.code not in compiled:
            fn = torch.compile(sub, dynamic=False, fullgraph=True)
            compiled[sub.code] = OneLayout(fn, _written(sub)) if uses[sub.code] > 1 else fn
        setattr(split, name, compiled[sub.code])
    return split


_setup: dict[str, threading.Thread] = {}


def _probe_cpu_isa() -> None:
    """Inductor's choice of vector ISA, made now: each ISA this CPU reports (AVX2, AVX-512,
    AVX-512 VNNI on x86) is checked by a g++ build of its own, one thread each (Inductor checks
    them one after the other), then ``pick_vec_isa`` reads the cached answers."""
    try:
        from torch._inductor import cpu_vec_isa

        checker = getattr(cpu_vec_isa, "x86_isa_checker", None)
        if checker is not None and platform.machine() in ("x86_64", "AMD64"):
            flags = checker()
            isas = [isa for isa in getattr(cpu_vec_isa, "supported_vec_isa_list", [])
                    if all(f in flags for f in str(isa).split())]
            threads = [threading.Thread(target=bool, args=(isa,), daemon=True) for isa in isas]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        cpu_vec_isa.pick_vec_isa()
    except Exception:               # Inductor probes again on the main thread and says what failed
        pass


def prepare(executor: str, device: torch.device) -> None:
    """Start, on a background thread, what ``executor`` sets up once per process whatever the
    program, so that it overlaps the program's lowering (``CompiledExecutor`` waits for it).
    ``compiled`` on the CPU: Inductor's probe of the CPU's vector ISA (up to six g++ builds, each
    loaded by a child Python: 5-7 s with an empty Inductor cache, spent waiting on subprocesses,
    so the lowering's Python keeps running). Anything else: nothing."""
    if executor == "compiled" and device.type == "cpu" and "cpu_isa" not in _setup:
        _setup["cpu_isa"] = threading.Thread(target=_probe_cpu_isa, name="mmgraph-inductor-setup", daemon=True)
        _setup["cpu_isa"].start()


def _prepared() -> None:
    for thread in _setup.values():
        thread.join()


class CompiledExecutor(Executor):
    """torch.compile of the step graph, per region (``regional``: each repeated layer's forward,
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
        self.fn = (regional(gm, program, region_of(program, gm)) if regions else
                   torch.compile(gm, dynamic=False, fullgraph=True))

    def __call__(self, inputs):
        _prepared()                        # before Inductor's first compile: its probes, once
        with torch.no_grad():
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
