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

The planner (``choose``) costs every combination it considers with the same arithmetic the
cost pass simulates (kernel roofline times, stream times, double-buffered schedule) and picks the
fastest that fits: per piece size, each layer's options (recompute policy x offloaded or not)
are priced by the step time they add (a recomputation hidden under a streamed segment is free,
an offload that delays the weights is not) and by the device bytes they save; the cheapest
options whose bytes fit are taken greedily (bytes saved per second added). Every micro-batch's
figures come from one traced program (mmgraph/core/batchscale.py), so ``explore`` evaluates
every candidate micro-batch without tracing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

from mmgraph.core.batchscale import ZERO, Affine, BatchScaling
from mmgraph.core.ir import MemoryPlan, Phase, Program, Schedule, Segment
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


def _compute(w: Workload, m: int, piece: int) -> list[float]:
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


def _stream(w: Workload, nbytes: float) -> float:
    return nbytes / w.target.stream.effective + w.target.stream.latency_s if nbytes and w.streaming else 0.0


def _per_flop(w: Workload, layer: str, m: int, comp: list[float]) -> float:
    """Seconds per FLOP of a layer's forward: what its recomputation costs."""
    fwd = w.fwd.get(layer, [])
    flops = sum(w.segs[i].flops.at(m) for i in fwd)
    return sum(comp[i] for i in fwd) / flops if flops else 0.0


# -- memory -------------------------------------------------------------------------------------
def _policy_of_span(sp: Span, policy: dict) -> str:
    """Under which policy a span exists: its layer's, or for values outside the layers, the
    policy of the layer that reads them first."""
    return policy.get(sp.layer or sp.reader, "none")


def _turn(sp: Span) -> bool:
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


def _live(w: Workload, m: int, policy: dict, offloaded: set) -> _Live:
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
        elif _turn(sp):
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


def _segment_pieces(w: Workload, live: _Live, sizes: list[int]) -> Optional[list[int]]:
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
            if _turn(sp) and out[sp.made] != out[sp.last]:
                out[sp.made] = out[sp.last] = min(out[sp.made], out[sp.last])
    return out


# -- the plan for one micro-batch ----------------------------------------------------------------
@dataclass
class _Option:
    policy: str
    offload: bool
    device: float          # kept bytes its backward needs that stay on the device
    time: float            # the step time its layer's segments take with it
    recompute: float       # bytes it recomputes (one piece)
    flops: float


def _reader_bytes(w: Workload, m: int) -> dict:
    """policy -> layer -> bytes of the kept values that layer's backward reads first."""
    out = {}
    for level, spans in w.spans.items():
        per: dict = {}
        for sp in spans:
            if sp.reader and not _turn(sp):
                per[sp.reader] = per.get(sp.reader, 0.0) + sp.size.at(m)
        out[level] = per
    return out


def _layer_options(w: Workload, layer: str, m: int, piece: int, levels: tuple, offload: bool,
                   reader_bytes: dict) -> list[_Option]:
    """A layer's options (policy x offloaded) with the time its segments take: forward segments
    whole, backward ones in pieces of ``piece``."""
    whole, cut = _compute(w, m, m), _compute(w, m, piece)
    fwd, bwd = w.fwd.get(layer, []), w.bwd.get(layer, [])
    per_flop = _per_flop(w, layer, m, whole)
    out = []
    for policy in levels:
        term = w.terms[policy][layer]
        kept = reader_bytes[policy].get(layer, 0.0)
        rc_s = term.flops.at(m) * per_flop if policy != "none" else 0.0
        for off in ((False, True) if offload else (False,)):
            t = 0.0
            for j, i in enumerate(fwd):
                s = w.segs[i]
                extra = _stream(w, kept) if off and j == len(fwd) - 1 else 0.0
                t += max(whole[i], _stream(w, s.weight_bytes), _stream(w, s.grad_bytes) + extra)
            for j, i in enumerate(bwd):
                s = w.segs[i]
                first = j == 0
                t += max(cut[i] + (rc_s if first else 0.0),
                         _stream(w, s.weight_bytes) + (_stream(w, kept) if off and first else 0.0),
                         _stream(w, s.grad_bytes))
            out.append(_Option(policy, off, 0.0 if off else kept, t,
                               term.recomputed.at(piece) if policy != "none" else 0.0,
                               term.flops.at(m) if policy != "none" else 0.0))
    return out


def _greedy(options: dict, budget: float) -> Optional[dict]:
    """Per layer one option: the least time whose device bytes sum to at most ``budget``
    (greedy on each layer's lower convex hull of (bytes, time), most bytes saved per second
    first). None when even the least bytes do not fit."""
    choice, steps = {}, []
    for layer, opts in options.items():
        opts = sorted(opts, key=lambda o: (round(o.time, 9), o.offload, o.flops, o.device))
        cur = opts[0]
        choice[layer] = cur
        while True:
            better = [o for o in opts if o.device < cur.device - 1e-9]
            if not better:
                break
            nxt = min(better, key=lambda o: ((o.time - cur.time) / (cur.device - o.device), o.offload, o.flops))
            steps.append(((nxt.time - cur.time) / (cur.device - nxt.device), nxt.offload, layer, nxt))
            cur = nxt
    total = sum(o.device for o in choice.values())
    if total <= budget:
        return choice
    # per layer the hull's slopes increase, so taking them in global order respects each layer's order
    for _, _, layer, nxt in sorted(steps, key=lambda s: (s[0], s[1], s[2])):
        total -= choice[layer].device - nxt.device
        choice[layer] = nxt
        if total <= budget:
            return choice
    return None


def _fixed_bytes(w: Workload, m: int, piece: int, cap: float) -> float:
    """Bytes no layer option changes, at their largest: buffers, kept values no layer's backward
    reads first, the working set (one piece of ``piece`` samples) with the largest recomputation
    ``cap`` beside it."""
    none = {L: "none" for L in w.layers}
    n = len(w.segs)
    diff = [0.0] * (n + 1)
    extra = [0.0] * n
    for sp in w.spans.get("none", ()):
        if sp.reader:
            continue
        if _turn(sp):
            extra[sp.made] += sp.size.at(piece)
            extra[sp.last] += sp.size.at(piece)
        else:
            diff[sp.made] += sp.size.at(m)
            diff[sp.last + 1] -= sp.size.at(m)
    del none
    most, running = 0.0, 0.0
    for i, s in enumerate(w.segs):
        running += diff[i]
        work = w.work(piece)[i]
        most = max(most, running + extra[i] + work + (cap if s.phase != Phase.FORWARD and s.layer in w.bwd else 0.0))
    return w.buffers + most


def evaluate(w: Workload, m: int, policy: dict, offloaded: set, pieces: list[int]) -> Plan:
    """The estimate of one plan: per-layer policy, offloaded layers, per-segment piece size."""
    live = _live(w, m, policy, offloaded)
    peak = max((_at(live, i, q) for i, q in enumerate(pieces)), default=0.0) + w.buffers
    biggest = max((_at(live, i, q) - live.kept[i] for i, q in enumerate(pieces)), default=0.0)
    whole = _compute(w, m, m)
    comp = [_compute(w, m, q)[i] for i, q in enumerate(pieces)]
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
            extra = w.terms[policy[L]][L].flops.at(m) * _per_flop(w, L, m, whole)
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
                _stream(w, sum(offload)) + _stream(w, sum(reload)) if any(offload) else 0.0, sum(offload), rc_flops,
                peak <= w.memory, sched, tuple(pieces))


def choose(w: Workload, m: int, policy: str = "auto") -> Plan:
    """The fastest plan at micro-batch ``m`` that fits; when none fits, the one with the
    smallest peak (every mechanism at its most)."""
    mech = w.target.mechanisms
    if policy == "auto":
        levels = LEVELS if mech.recompute else ("none",)
    else:
        levels = (policy,)
    offload = mech.offload.enabled and w.streaming
    pieces_ok = mech.pieces.enabled and m > 1
    sizes = sorted({math.ceil(m / P) for P in range(1, m + 1)} if pieces_ok else {m}, reverse=True)
    sizes = [q for q in sizes if q >= min(mech.pieces.min_samples, m)]
    # the budget's piece: the micro-batch in 1, 2, 3, 4, 6, 8, 12, ... pieces (each segment then
    # takes the largest piece of ``sizes`` it fits with)
    counts = sorted({1, 2, 3} | {2 ** k for k in range(2, 12)} | {3 * 2 ** k for k in range(1, 11)})
    budget_pieces = sorted({math.ceil(m / P) for P in counts if P <= m} & set(sizes) | {sizes[-1]}, reverse=True)
    reader_bytes = _reader_bytes(w, m)
    best: Optional[Plan] = None
    stale = 0
    for piece in budget_pieces:
        before = best
        options = {L: _layer_options(w, L, m, piece, levels, offload, reader_bytes) for L in w.layers}
        caps = sorted({o.recompute for opts in options.values() for o in opts}) or [0.0]
        for cap in caps:
            allowed = {L: [o for o in opts if o.recompute <= cap] for L, opts in options.items()}
            choice = _greedy(allowed, w.memory - _fixed_bytes(w, m, piece, cap))
            for _ in range(len(w.layers) + 1):          # offloading one more layer when the estimate missed
                if choice is None:
                    break
                pol = {L: o.policy for L, o in choice.items()}
                n_off = sum(1 for o in choice.values() if o.offload)
                offloaded = set(w.layers[:n_off])
                pieces = _segment_pieces(w, _live(w, m, pol, offloaded), [q for q in sizes if q >= piece])
                if pieces is not None:
                    plan = evaluate(w, m, pol, offloaded, pieces)
                    if best is None or _better(plan, best):
                        best = plan
                    break
                if not offload or n_off >= len(w.layers):
                    break
                choice = {L: (replace(o, offload=True, device=0.0) if j <= n_off else o)
                          for j, (L, o) in enumerate(choice.items())}
        if best is not None and best.pieces == 1 and not best.offloaded:
            break                                   # nothing to gain from smaller pieces
        stale = stale + 1 if best is not None and best is before else 0
        if stale >= 2:
            break                                   # smaller pieces stopped paying
    if best is not None:
        return best
    return _smallest(w, m, levels, offload, sizes)


def _better(a: Plan, b: Plan) -> bool:
    """Faster by more than 0.5%; else fewer offloaded layers, fewer pieces, less recompute."""
    if a.samples_per_s > b.samples_per_s * 1.005:
        return True
    if b.samples_per_s > a.samples_per_s * 1.005:
        return False
    return (len(a.offloaded), a.pieces, a.recompute_flops) < (len(b.offloaded), b.pieces, b.recompute_flops)


def _smallest(w: Workload, m: int, levels: tuple, offload: bool, sizes: list[int]) -> Plan:
    policy = {L: levels[-1] for L in w.layers}
    offloaded = set(w.layers) if offload else set()
    return evaluate(w, m, policy, offloaded, [sizes[-1]] * len(w.segs))


def memory_plan(plan: Plan, w: Workload) -> MemoryPlan:
    """The IR record of a plan."""
    mech = w.target.mechanisms
    words = []
    counts = plan.counts()
    if "recompute" in plan.mechanisms:
        words.append("recompute (" + ", ".join(f"{n} layers {p}" for p, n in counts.items()) + ")")
    if plan.pieces > 1:
        cut = sum(1 for q in plan.segment_pieces if q < plan.micro_batch_size)
        words.append(f"{cut} of {len(w.segs)} segments in pieces (down to {plan.pieces} pieces of "
                     f"{plan.piece_samples} samples)")
    if plan.offloaded:
        words.append(f"offload of {len(plan.offloaded)} layers' kept activations "
                     f"({plan.offloaded[0]} .. {plan.offloaded[-1]}, {plan.offload_bytes / 1e9:.2f} GB out and back)")
    by_key: dict = {}
    for s, q in zip(w.segs, plan.segment_pieces):
        if q < plan.micro_batch_size:
            key = (s.layer, str(s.phase))
            by_key[key] = min(by_key.get(key, q), q)
    return MemoryPlan(
        micro_batch_size=plan.micro_batch_size, pieces=plan.pieces, piece_samples=plan.piece_samples,
        offloaded=plan.offloaded, offload_bytes=int(plan.offload_bytes), kept_bytes=int(plan.kept_bytes),
        working_bytes=int(plan.working_bytes), buffer_bytes=int(w.buffers), estimated_peak_bytes=int(plan.peak_bytes),
        memory_bytes=int(w.memory), estimated_step_s=plan.step_s, recompute_s=plan.recompute_s,
        piece_overhead_s=plan.piece_overhead_s, offload_s=plan.offload_s, fits=plan.fits,
        mechanisms=plan.mechanisms, available=mech.names() if w.streaming else tuple(
            n for n in mech.names() if n == "recompute"),
        note="; ".join(words) or "nothing: the step fits as traced",
        segment_pieces=tuple((layer, phase, q) for (layer, phase), q in sorted(by_key.items())))


def explore(w: Workload, sizes, policy: str = "auto") -> list[Plan]:
    """``choose`` for every micro-batch in ``sizes``."""
    out = []
    for m in sizes:
        out.append(choose(w, m, policy))
        w._times.clear()
        w._lives.clear()
    return out
