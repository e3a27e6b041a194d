"""memory_planner: which of the target's mechanisms make a step fit, and at what cost.

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
from dataclasses import dataclass, replace
from typing import Optional

from mmgraph.core.ir import MemoryPlan, Phase
from mmgraph.passes.memory import (LEVELS, Plan, Workload, at_the_turn, compute_times, evaluate, live_bytes,
                                   seconds_per_flop, segment_pieces, stream_seconds)


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
            if sp.reader and not at_the_turn(sp):
                per[sp.reader] = per.get(sp.reader, 0.0) + sp.size.at(m)
        out[level] = per
    return out


def _layer_options(w: Workload, layer: str, m: int, piece: int, levels: tuple, offload: bool,
                   reader_bytes: dict) -> list[_Option]:
    """A layer's options (policy x offloaded) with the time its segments take: forward segments
    whole, backward ones in pieces of ``piece``."""
    whole, cut = compute_times(w, m, m), compute_times(w, m, piece)
    fwd, bwd = w.fwd.get(layer, []), w.bwd.get(layer, [])
    per_flop = seconds_per_flop(w, layer, m, whole)
    out = []
    for policy in levels:
        term = w.terms[policy][layer]
        kept = reader_bytes[policy].get(layer, 0.0)
        rc_s = term.flops.at(m) * per_flop if policy != "none" else 0.0
        for off in ((False, True) if offload else (False,)):
            t = 0.0
            for j, i in enumerate(fwd):
                s = w.segs[i]
                extra = stream_seconds(w, kept) if off and j == len(fwd) - 1 else 0.0
                t += max(whole[i], stream_seconds(w, s.weight_bytes), stream_seconds(w, s.grad_bytes) + extra)
            for j, i in enumerate(bwd):
                s = w.segs[i]
                first = j == 0
                t += max(cut[i] + (rc_s if first else 0.0),
                         stream_seconds(w, s.weight_bytes) + (stream_seconds(w, kept) if off and first else 0.0),
                         stream_seconds(w, s.grad_bytes))
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
        if at_the_turn(sp):
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
                pieces = segment_pieces(w, live_bytes(w, m, pol, offloaded), [q for q in sizes if q >= piece])
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
