"""The compiled executor's regions: how it cuts a program's graph for torch.compile, and the
set-up it starts before the program is lowered.

- ``region_of``: each transformer layer's forward, its backward, its weights' update, and the
  runs between them; ``canonical`` names a region's values by position, so repeated layers have
  the same code; ``regional`` splits the graph (``split_module``) and compiles each distinct
  region code once with Inductor (``Region``, called by a ``Site`` per call; ``gapped_inputs``
  keeps a shared region's inputs in one layout; a region with little to fuse, ``MIN_FUSIBLE``,
  stays fx code).
- ``prepare``: Inductor's one-time probe of the CPU's vector ISAs on background threads, so it
  overlaps the lowering (``mmgraph run`` and bench_runtime call it); ``prepared`` waits for it.
"""

from __future__ import annotations

import platform
import threading
from typing import Optional

import networkx as nx
import torch
from torch.fx.passes.split_module import split_module

from mmgraph.core.ir import InputKind, LayerKind, Program
from mmgraph.core.ops import op_class
from mmgraph.passes.optimizer import LAYER as OPTIMIZER_LAYER


def writes_in_place(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and schema.is_mutable


def region_of(program: Program, gm: Optional[torch.fx.GraphModule] = None, merge: bool = True):
    """The region label of each op node of ``gm`` (the program's graph as it runs: by default
    the program's own): contiguous runs of one transformer layer's forward (or backward, or its
    weights' update: an update op names its weight as its module), and the runs of everything
    else between them. With ``merge``, once the layers' updates have begun, the update of the
    weights of no layer is one region wherever its runs fall (between the layers' updates: each
    its own compile and C++ kernel otherwise), unless that would make regions depend on each
    other both ways (then every run is a region, as without ``merge``). Nodes the program has no
    facts for (``in_place``'s write-back copies) go with the node before them."""
    layer_of = _weight_layers(program)
    nodes = [n for n in (gm or program.gm).graph.nodes if n.op not in ("placeholder", "output")]
    labels: dict[str, int] = {}
    run, last, tail = -1, object(), False
    first: dict = {}
    for node in nodes:
        info = program.info.get(node.name)
        if info is None:
            key = last
        elif info.kind == LayerKind.BLOCK:
            key = (info.layer, info.phase)
        elif info.module in layer_of:
            key = ("update", layer_of[info.module])
        else:
            key = ("update", None) if merge and tail and info.layer == OPTIMIZER_LAYER else "rest"
        if key != last:
            run, last = run + 1, key
            tail = tail or (isinstance(key, tuple) and key[0] == "update" and key[1] is not None)
            first.setdefault(key, run)
        labels[node.name] = first[key] if key == ("update", None) else max(run, 0)
    if merge and not _acyclic(nodes, labels):
        return region_of(program, gm, merge=False)
    return lambda node: labels.get(node.name, max(run, 0))


def _acyclic(nodes: list, labels: dict[str, int]) -> bool:
    """Whether the regions ``labels`` makes depend on each other in one direction only."""
    edges = nx.DiGraph()
    edges.add_edges_from((labels[a.name], labels[n.name]) for n in nodes for a in n.all_input_nodes
                         if a.name in labels and labels[a.name] != labels[n.name])
    return nx.is_directed_acyclic_graph(edges)


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


def gapped_inputs(args, written: frozenset[int]) -> tuple[int, ...]:
    """The inputs of a shared region a call makes contiguous, so that its sites pass one layout:
    the views with gaps between their elements (the first layer's input is a slice of a longer
    sequence; the next layers get a dense tensor), so the region's code is not compiled a second
    time for one call site (small config: 2 of 13 compiles, 2-4 s each, for a 1 MB copy a step).
    Dense views (a transposed weight, an expanded mask: the same at every call site) pass as they
    are, as do the inputs the region writes (``written``: its ``copy_`` targets)."""
    return tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in written and _gapped(a))


def _layout(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else (type(a), a)
                 for a in args)


class Region:
    """One distinct region code, compiled by Inductor directly (``torch._inductor.compile``: the
    region is already ATen ops, so torch.compile's frame evaluation and guards, about 70 us a
    call, are left out) on the inputs of its first call, once per input layout; with an input
    that is not a tensor, by torch.compile (whose guards check its value). ``shared``: called
    from several sites, its inputs passed in one layout (``gapped_inputs``)."""

    def __init__(self, sub: torch.fx.GraphModule, shared: bool):
        self.sub = sub
        self.written = _written(sub) if shared else None
        self.compiled: dict[tuple, object] = {}         # input layout -> compiled function

    def function(self, args) -> tuple[object, tuple]:
        key = _layout(args)
        fn = self.compiled.get(key)
        if fn is None:
            if all(isinstance(a, torch.Tensor) for a in args):
                from torch._inductor import compile as inductor_compile

                fn = inductor_compile(self.sub, list(args))
            else:
                fn = torch.compile(self.sub, dynamic=False, fullgraph=True)
            self.compiled[key] = fn
        return fn, key


class Site:
    """One call of a ``Region`` in the split program: the function compiled for the layout of
    its inputs, called as it is, with the inputs its first call found gapped made contiguous
    (``gapped_inputs``, shared regions). Inductor's code checks each input's size and strides
    before it runs a kernel (``assert_size_stride``): when they changed since the site's first
    call, the site looks at its inputs again and takes (or compiles) the region's function for
    the new layout."""

    __slots__ = ("region", "fn", "key", "copy")

    def __init__(self, region: Region):
        self.region, self.fn, self.key, self.copy = region, None, None, ()

    def _bind(self, args) -> None:
        written = self.region.written
        self.copy = gapped_inputs(args, written) if written is not None else ()
        self.fn, self.key = self.region.function(self._laid_out(args))

    def _laid_out(self, args):
        if not self.copy:
            return args
        args = list(args)
        for i in self.copy:
            args[i] = args[i].contiguous()
        return args

    def __call__(self, *args):
        if self.fn is None:
            self._bind(args)
        try:
            return self.fn(*self._laid_out(args))
        except AssertionError:
            was = (self.copy, self.key)
            self._bind(args)
            if (self.copy, self.key) == was:
                raise
            return self.fn(*self._laid_out(args))


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
    targets = {n.args[0] for n in sub.graph.nodes if writes_in_place(n) and n.args}
    return frozenset(i for i, p in enumerate(placeholders) if p in targets)


# A region with fewer elementwise and reduction ops than this, used once, runs as fx code: there
# is next to nothing for Inductor to fuse, and each of its C++ kernels costs a g++ build (about
# 1 s of CPU) on the first call. On the small config: the patch embedding's run (a convolution,
# the class token's cat, the position add, a layer norm: 2 kernels).
MIN_FUSIBLE = 4


def _fusible(sub: torch.fx.GraphModule) -> int:
    return sum(op_class(n) in ("elementwise", "reduction") for n in sub.graph.nodes if n.op == "call_function")


def regional(gm: torch.fx.GraphModule, region) -> torch.fx.GraphModule:
    """``gm`` split into regions (``region_of``), compiled by Inductor, one ``Region`` per
    distinct region code (``canonical``): the repeated layers call the same compiled code, so it
    is compiled once (again where an input's layout differs; a shared region's inputs are passed
    in one layout, ``gapped_inputs``); a region used once with little to fuse (``MIN_FUSIBLE``)
    stays fx code. The split module that calls them (each call a ``Site``) is fx code."""
    split = split_module(gm, None, region, keep_original_order=True)
    subs = {name: canonical(sub) for name, sub in split.named_children()}
    uses: dict[str, int] = {}
    for sub in subs.values():
        uses[sub.code] = uses.get(sub.code, 0) + 1
    regions: dict[str, Region] = {}
    for name, sub in subs.items():
        if uses[sub.code] == 1 and _fusible(sub) < MIN_FUSIBLE:
            setattr(split, name, sub)
            continue
        if sub.code not in regions:
            regions[sub.code] = Region(sub, shared=uses[sub.code] > 1)
        delattr(split, name)
        setattr(split, name, Site(regions[sub.code]))
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


def prepared() -> None:
    """Wait for what ``prepare`` started."""
    for thread in _setup.values():
        thread.join()
