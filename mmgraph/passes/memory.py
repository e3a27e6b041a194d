"""memory: the memory model of a training step on a target, and the mechanisms that make it fit.

What is on the device during a micro-step (weight streaming, docs/targets.md):

- **kept activations**: forward values the backward reads (the remat pass decides which, per
  layer), from the segment that makes them to their last backward reader;
- **one segment's working set**: its largest kernel's inputs and outputs, plus, in a backward
  segment, the values it recomputes (all live together: an upper bound);
- **weight buffers**: two, for double buffering (or every weight, on targets that keep them).

The mechanisms, each a capability the target declares (``mechanisms`` in its YAML):

- ``recompute``: per layer ``none | selective | full`` (passes/remat.py): fewer kept values,
  more FLOPs in the backward;
- ``pieces``: each segment runs the micro-batch in P pieces of ``ceil(m / P)`` samples, one after
  the other with the same weights: the working set (and the values between the loss's forward and
  backward) is one piece's; each piece pays the target's overhead per segment. On a dataflow
  wafer a layer's values stream between its kernels, so a layer never needs the whole
  micro-batch's intermediate values at once;
- ``offload``: the kept values of the earliest layers (their backward comes last) stream out to
  external memory after the forward segment that makes them, over the out-direction of the link
  (which carries gradients only in the backward), and back in ahead of their backward segment,
  over the in-direction, beside the weights.

The planner that picks among them is ``passes/memory_planner.py``; ``evaluate`` here prices
one plan (kept bytes, pieces, offload) with the cost pass's arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from mmgraph.core.batchscale import ZERO, Affine, BatchScaling
from mmgraph.core.ir import Phase, Program, Schedule, Segment
from mmgraph.core.ops import is_transcendental, moves_bytes, op_class
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target
from mmgraph.passes.cost import op_time, piece_sizes, simulate
from mmgraph.passes.weight_streaming import segment_program

LEVELS = ("none", "selective", "full")           # from least to most recompute
_MATMUL_LIKE = ("matmul", "attention")


@dataclass(frozen=True)
class LayerTerm:
    """One rematerializable layer under one recompute policy, as functions of the micro-batch."""

    kept: Affine              # bytes its backward keeps (values it makes)
    recomputed: Affine        # bytes it makes again in its backward (live together)
    flops: Affine             # FLOPs it makes again


@dataclass(frozen=True)
class Span:
    """A kept value: from the segment that makes it to its last backward reader (indices of the
    program's segments before recomputation)."""

    size: Affine
    layer: str                # the rematerializable layer whose policy keeps it ('' outside them)
    reader: str               # the layer whose backward reads it first ('' when not such a layer)
    made: int
    first: int
    last: int
    name: str = ""
    # a value outside the layers: (the reading op's layer or '', its segment) per backward reader,
    # so that with layers under different policies it lives until the last reader of any
    readers: tuple = ()


@dataclass(frozen=True)
class _Unit:
    """What runs as one unit on the target (a kernel, or an op on op-by-op targets)."""

    flops: Affine
    nbytes: Affine
    matmul: bool
    attention: bool = False
    transcendental: bool = False
    moves: bool = True


@dataclass
class _Seg:
    phase: str
    layer: str
    units: list[_Unit]
    work: list[Affine]            # per kernel: bytes in and out
    flops: Affine
    weight_bytes: int
    grad_bytes: int
    grad_params: int
    grads: tuple[str, ...]


@dataclass
class Workload:
    """A step's figures as functions of the micro-batch, from one traced program (before
    recomputation) and the remat pass's per-layer terms."""

    target: Target
    precision: Precision
    batch_size: int                       # samples per step (on this system)
    tokens_per_sample: int
    layers: list[str]                     # rematerializable layers, forward order
    terms: dict                           # policy -> layer -> LayerTerm
    spans: dict                           # policy -> [Span], every layer under that policy
    segs: list[_Seg]
    buffers: int                          # weight buffers, or every weight when resident
    model_flops: Affine                   # per micro-step, without recomputation
    # policy -> layer -> the largest working set (Affine) of that layer's backward kernels once
    # recomputation's clones are fused into them (passes/remat.py computes it when first asked)
    fused_work: Optional[object] = None
    fwd: dict = field(default_factory=dict)   # layer -> forward segment indices
    bwd: dict = field(default_factory=dict)   # layer -> backward segment indices
    _times: dict = field(default_factory=dict)
    _work: dict = field(default_factory=dict)
    _lives: dict = field(default_factory=dict)

    def work(self, q: float) -> list[float]:
        """Per segment: its largest kernel's bytes in and out for a piece of ``q`` samples."""
        if q not in self._work:
            self._work[q] = [max((a.at(q) for a in s.work), default=0.0) for s in self.segs]
        return self._work[q]

    @property
    def memory(self) -> float:
        return self.target.memory.bytes

    @property
    def streaming(self) -> bool:
        return self.target.stream_enabled


@dataclass(frozen=True)
class Plan:
    """The planner's choice for one micro-batch, with its estimate."""

    micro_batch_size: int
    piece_samples: int                    # the smallest piece
    pieces: int                           # pieces of the most divided segment
    policy: dict                          # layer -> none | selective | full
    offloaded: tuple[str, ...]            # layers whose backward's kept values go to external memory
    peak_bytes: float
    kept_bytes: float                     # kept values on the device at the start of the backward
    working_bytes: float                  # the largest working set (one piece, recomputed values included)
    step_s: float                         # per micro-step, simulated on the planner's segments
    samples_per_s: float
    recompute_s: float
    piece_overhead_s: float
    offload_s: float
    offload_bytes: float
    recompute_flops: float
    fits: bool
    schedule: Optional[Schedule] = None
    segment_pieces: tuple = ()            # per segment: its piece size (samples)

    @property
    def mechanisms(self) -> tuple[str, ...]:
        out = []
        if any(p != "none" for p in self.policy.values()):
            out.append("recompute")
        if self.pieces > 1:
            out.append("pieces")
        if self.offloaded:
            out.append("offload")
        return tuple(out)

    def counts(self) -> dict:
        c: dict = {}
        for p in self.policy.values():
            c[p] = c.get(p, 0) + 1
        return c


# -- building the workload --------------------------------------------------------------------
def build_workload(program: Program, terms: dict, layers: list[str], readers: dict, target: Target,
                   precision: Precision, batch_size: int, tokens_per_sample: int,
                   resident: Optional[int] = None) -> Workload:
    """``program``: fused, before recomputation; ``terms``: policy -> layer -> LayerTerm;
    ``readers``: policy -> kept value -> its backward readers (passes/remat.py); ``resident``:
    what a target that keeps weights holds besides activations (default: the weights)."""
    fb = precision.bytes
    scaling = BatchScaling(program)
    segments, _ = segment_program(program, target, precision)
    kernels = {k.id: k for k in program.kernels}
    nodes = {n.name: n for n in program.gm.graph.nodes}
    by_op = target.compute.granularity != "kernel"
    segs = []
    for seg in segments:
        units, work, flops = [], [], ZERO
        for kid in seg.kernels:
            k = kernels[kid]
            work.append(scaling.kernel_io(k, nodes, fb))
            kf = scaling.kernel_flops(k, nodes)
            flops = flops + kf
            if not by_op:
                units.append(_Unit(kf, work[-1], k.kind in _MATMUL_LIKE, k.kind == "attention"))
                continue
            for name in k.nodes:
                node = nodes[name]
                units.append(_Unit(scaling.flops(node), _node_bytes(node, scaling, fb), op_class(node) in _MATMUL_LIKE,
                                   op_class(node) == "attention", is_transcendental(node), moves_bytes(node)))
        segs.append(_Seg(seg.phase, seg.layers[0], units, work, flops, seg.weight_bytes, seg.grad_bytes,
                         seg.grad_params, seg.grads))
    if target.stream_enabled:
        buffers = 2 * max((s.weight_bytes for s in segments), default=0)
    else:
        buffers = resident if resident is not None else sum(
            int(s.numel * precision.bytes) for s in program.inputs if s.kind.value == "param")
    seg_of = {kid: i for i, s in enumerate(segments) for kid in s.kernels}
    owner = {name: k.id for k in program.kernels for name in k.nodes}
    layer_set = set(layers)
    spans = {}
    for policy, kept in readers.items():
        spans[policy] = []
        for node, reads in kept.items():
            made = seg_of[owner[node.name]]
            at = [seg_of[owner[r.name]] for r in reads]
            first, last = min(at), max(at)
            layer = program.info[node.name].layer
            reader = segments[first].layers[0]
            inside = layer in layer_set
            by_reader = () if inside else tuple(sorted(
                {(program.info[r.name].layer if program.info[r.name].layer in layer_set else "", seg_of[owner[r.name]])
                 for r in reads}))
            spans[policy].append(Span(scaling.value(node, fb), layer if inside else "",
                                      reader if reader in layer_set else "", made, first, last, node.name, by_reader))
    w = Workload(target, precision, batch_size, tokens_per_sample, layers, terms, spans, segs, buffers,
                 sum((s.flops for s in segs), ZERO))
    for i, s in enumerate(segs):
        if s.layer in layer_set:
            (w.fwd if s.phase == Phase.FORWARD else w.bwd).setdefault(s.layer, []).append(i)
    return w


def _node_bytes(node, scaling: BatchScaling, fb: int) -> Affine:
    """Bytes an op reads and writes run on its own (as ``opcost.node_bytes``), split."""
    if not moves_bytes(node):
        return ZERO
    total = scaling.value(node, fb)
    for a in node.args:
        if hasattr(a, "op"):
            total = total + scaling.value(a, fb)
    return total


# -- time ---------------------------------------------------------------------------------------
def _unit_time(u: _Unit, m: float, target: Target, precision: Precision) -> float:
    if not u.moves:
        return target.compute.kernel_overhead_s
    f = u.flops.at(m)
    return op_time(f, u.nbytes.at(m), u.matmul, target, precision, attention=u.attention,
                   transcendental_elements=f if u.transcendental else 0)


def compute_times(w: Workload, m: int, piece: int) -> list[float]:
    """Per segment: compute time at micro-batch ``m`` run in pieces of at most ``piece`` samples
    (the pieces' overhead included)."""
    key = (m, piece)
    if key not in w._times:
        sizes = piece_sizes(m, piece)
        overhead = len(sizes) * w.target.mechanisms.pieces.overhead_s if len(sizes) > 1 else 0.0
        out = []
        for s in w.segs:
            t = 0.0
            for size in set(sizes):
                t += sizes.count(size) * sum(_unit_time(u, size, w.target, w.precision) for u in s.units)
            out.append(t + overhead)
        w._times[key] = out
    return w._times[key]


def stream_seconds(w: Workload, nbytes: float) -> float:
    return nbytes / w.target.stream.effective + w.target.stream.latency_s if nbytes and w.streaming else 0.0


def seconds_per_flop(w: Workload, layer: str, m: int, comp: list[float]) -> float:
    """Seconds per FLOP of a layer's forward: what its recomputation costs."""
    fwd = w.fwd.get(layer, [])
    flops = sum(w.segs[i].flops.at(m) for i in fwd)
    return sum(comp[i] for i in fwd) / flops if flops else 0.0


# -- memory -------------------------------------------------------------------------------------
def _policy_of_span(sp: Span, policy: dict) -> str:
    """Under which policy a span exists: its layer's, or for values outside the layers, the
    policy of the layer that reads them first."""
    return policy.get(sp.layer or sp.reader, "none")


def at_the_turn(sp: Span) -> bool:
    """Made in one segment and read only by the next: the loss's values between its forward and
    backward, one piece's when both run in pieces."""
    return sp.last == sp.made + 1


@dataclass
class _Live:
    """Per segment: the kept bytes live while it runs without its working set, and what grows
    with its piece (kernels' bytes, recomputed values, the loss's values)."""

    kept: list[float]
    w: Workload
    extra: list[Affine]
    fused: list[list[Affine]] = field(default_factory=list)   # per segment: recomputing kernels' working sets


def live_bytes(w: Workload, m: int, policy: dict, offloaded: set) -> _Live:
    """As the weight_streaming and cost passes count them, per segment."""
    key = (m, tuple(sorted(policy.items())), tuple(sorted(offloaded)))
    if key not in w._lives:
        w._lives[key] = _count_live(w, m, policy, offloaded)
    return w._lives[key]


def _spans_under(w: Workload, policy: dict) -> list[Span]:
    """The kept values with each layer under its policy: a layer's values as its policy keeps
    them; a value outside the layers from its maker to its last reader among the layers (and
    the rest of the backward) as each reads it under its own policy."""
    out, outside = [], {}
    for level in set(policy.values()) | {"none"}:
        for sp in w.spans.get(level, ()):
            if sp.layer or not sp.readers:
                if _policy_of_span(sp, policy) == level:
                    out.append(sp)
                continue
            segs = [seg for layer, seg in sp.readers if policy.get(layer, "none") == level]
            if segs:
                outside.setdefault(sp.name, (sp, []))[1].extend(segs)
    for sp, segs in outside.values():
        first = min(segs)
        reader = sp.reader if first == sp.first else next((layer for layer, seg in sp.readers if seg == first and layer), "")
        out.append(replace(sp, first=first, last=max(segs), reader=reader))
    return out


def _count_live(w: Workload, m: int, policy: dict, offloaded: set) -> _Live:
    n = len(w.segs)
    diff = [0.0] * (n + 1)
    extra = [ZERO] * n

    def add(v: float, a: int, b: int) -> None:
        a, b = max(a, 0), min(b, n - 1)
        if a <= b:
            diff[a] += v
            diff[b + 1] -= v

    for sp in _spans_under(w, policy):
        if sp.reader in offloaded:
            v = sp.size.at(m)
            add(v, sp.made, sp.made + 1)                 # made, then streaming out
            add(v, max(sp.first - 1, sp.made + 2), sp.last)     # prefetched, then read
        elif at_the_turn(sp):
            extra[sp.made] = extra[sp.made] + sp.size
            extra[sp.last] = extra[sp.last] + sp.size
        else:
            add(sp.size.at(m), sp.made, sp.last)
    kept, running = [], 0.0
    for i in range(n):
        running += diff[i]
        kept.append(running)
    fused: list[list[Affine]] = [[] for _ in range(n)]
    for L in w.layers:
        if policy[L] != "none" and w.bwd.get(L):
            i = w.bwd[L][0]
            extra[i] = extra[i] + w.terms[policy[L]][L].recomputed
            if w.fused_work is not None:             # its recomputation fused into its backward kernels
                grown = w.fused_work(policy[L]).get(L)
                if grown is not None:
                    fused[i].append(grown)
    return _Live(kept, w, extra, fused)


def _at(live: _Live, i: int, q: float) -> float:
    work = live.w.work(q)[i]
    if live.fused and live.fused[i]:
        work = max(work, max(a.at(q) for a in live.fused[i]))
    return live.kept[i] + work + live.extra[i].at(q)


def segment_pieces(w: Workload, live: _Live, sizes: list[int]) -> Optional[list[int]]:
    """Per segment, the largest piece (of ``sizes``, descending) with which it fits; None when
    one does not fit even in the smallest."""
    room = w.memory - w.buffers
    out = []
    for i in range(len(w.segs)):
        q = next((q for q in sizes if _at(live, i, q) <= room), None)
        if q is None:
            return None
        out.append(q)
    # segments sharing values in pieces (the loss's forward and backward) run with the same piece
    for level in w.spans.values():
        for sp in level:
            if at_the_turn(sp) and out[sp.made] != out[sp.last]:
                out[sp.made] = out[sp.last] = min(out[sp.made], out[sp.last])
    return out



# -- one plan's figures ----------------------------------------------------------------------
def evaluate(w: Workload, m: int, policy: dict, offloaded: set, pieces: list[int]) -> Plan:
    """The estimate of one plan: per-layer policy, offloaded layers, per-segment piece size."""
    live = live_bytes(w, m, policy, offloaded)
    peak = max((_at(live, i, q) for i, q in enumerate(pieces)), default=0.0) + w.buffers
    biggest = max((_at(live, i, q) - live.kept[i] for i, q in enumerate(pieces)), default=0.0)
    whole = compute_times(w, m, m)
    comp = [compute_times(w, m, q)[i] for i, q in enumerate(pieces)]
    overhead = [len(piece_sizes(m, q)) * w.target.mechanisms.pieces.overhead_s if q < m else 0.0 for q in pieces]
    offload = [0] * len(w.segs)
    reload = [0] * len(w.segs)
    for level in set(policy.values()) | {"none"}:
        for sp in w.spans.get(level, ()):
            if _policy_of_span(sp, policy) == level and sp.reader in offloaded:
                offload[sp.made] += int(sp.size.at(m))
                reload[sp.first] += int(sp.size.at(m))
    rc_s = 0.0
    for L in w.layers:
        if policy[L] != "none" and w.bwd.get(L):
            extra = w.terms[policy[L]][L].flops.at(m) * seconds_per_flop(w, L, m, whole)
            comp[w.bwd[L][0]] += extra
            rc_s += extra
    segments = [Segment(i, s.phase, (s.layer,), (), (), s.weight_bytes, s.grads, s.grad_bytes, s.grad_params,
                        int(s.flops.at(m)), 0, 0, 0, offload[i], reload[i], len(piece_sizes(m, pieces[i])))
                for i, s in enumerate(w.segs)]
    rc_flops = sum(w.terms[policy[L]][L].flops.at(m) for L in w.layers if policy[L] != "none")
    sched = simulate(segments, comp, w.target, m, w.batch_size, w.tokens_per_sample,
                     int(w.model_flops.at(m)), w.precision, w.buffers // 2 if w.streaming else 0,
                     w.buffers if not w.streaming else 0, overheads=overhead)
    first_bwd = min((w.bwd[L][0] for L in w.layers if w.bwd.get(L)), default=len(w.segs) - 1)
    smallest = min(pieces, default=m)
    return Plan(m, smallest, len(piece_sizes(m, smallest)), dict(policy), tuple(L for L in w.layers if L in offloaded),
                peak, live.kept[min(first_bwd, len(live.kept) - 1)] if live.kept else 0.0, biggest,
                sched.micro_step_s, sched.samples_per_s, rc_s, sum(overhead),
                stream_seconds(w, sum(offload)) + stream_seconds(w, sum(reload)) if any(offload) else 0.0, sum(offload), rc_flops,
                peak <= w.memory, sched, tuple(pieces))
