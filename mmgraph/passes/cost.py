"""cost: time every kernel on the target and simulate the step's schedule.

Per kernel (or per op on targets that run op by op, like a CPU host running eager PyTorch):
``time = max(FLOPs / (peak x efficiency), bytes moved / bandwidth) / op_efficiency + overhead``,
where the bandwidth is the cache's for ops that move at most ``cache_bytes`` (targets with a
cache). Run op by op, views cost the overhead only and copies (``clone``) their bytes.

Per segment, with two weight buffers (double buffering), in execution order:

    stream-in i   starts when stream-in i-1 ended and buffer i-2 is free (segment i-2 done)
    compute i     starts when compute i-1 ended and stream-in i ended
    stream-out i  (gradients) starts when compute i ended and stream-out i-1 ended
    optimizer i   starts when stream-out i ended and optimizer i-1 ended

A micro-step ends when the last compute and the last gradient stream end; the optimizer's work
left after that is paid once per batch. Targets that keep weights on the device (``stream:
enabled: false``, such as the host) stream nothing.

The memory plan (``program.memory``, passes/memory.py) applies: a segment run in pieces costs
each piece's kernel times plus the target's overhead per piece; offloaded activations add to
the stream-out of the forward segment that makes them and to the stream-in of the backward
segment that reads them (and are live from the segment before it: prefetched).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from mmgraph.core.batchscale import BatchScaling
from mmgraph.core.ir import Contract, Program, Schedule, SegmentTime
from mmgraph.core.opcost import kernel_io_bytes, node_bytes, node_flops
from mmgraph.core.ops import is_transcendental, moves_bytes, op_class
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target

_MATMUL_LIKE = ("matmul", "attention")

CONTRACT = Contract(requires=("kernels", "segments"), provides=("schedule",))



def op_time(flops: int, nbytes: float, matmul: bool, target: Target, precision: Precision,
            attention: bool = False, transcendental_elements: int = 0) -> float:
    peak = getattr(target.compute.peak_flops, precision.name)
    rate = peak * (target.matmul_share(flops, attention) if matmul else 1.0)
    mem = target.memory
    bandwidth = (mem.cache_bandwidth if mem.cache_bandwidth and nbytes <= mem.cache_bytes
                 else mem.bandwidth * mem.bandwidth_efficiency)
    special = transcendental_elements / target.compute.transcendental_rate if target.compute.transcendental_rate else 0.0
    roofline = max(flops / rate, nbytes / bandwidth, special)
    return roofline / target.compute.op_efficiency + target.compute.kernel_overhead_s


def node_time(node, target: Target, precision: Precision, flops: int | None = None) -> float:
    """One ATen op run on its own (targets that run op by op): views pay the overhead only."""
    if not moves_bytes(node):
        return target.compute.kernel_overhead_s
    flops = node_flops(node) if flops is None else flops
    cls = op_class(node)
    return op_time(flops, node_bytes(node, precision.bytes), cls in _MATMUL_LIKE, target, precision,
                   attention=cls == "attention", transcendental_elements=flops if is_transcendental(node) else 0)


def piece_sizes(m: int, piece: int) -> list[int]:
    """The micro-batch ``m`` in pieces of at most ``piece`` samples (the last one smaller)."""
    pieces = math.ceil(m / piece)
    return [piece] * (pieces - 1) + [m - (pieces - 1) * piece]


def segment_compute_s(program: Program, seg, target: Target, precision: Precision,
                      kernels: dict, nodes: dict, scaling: Optional[BatchScaling] = None) -> float:
    """``kernels``: id -> Kernel; ``nodes``: name -> fx node (ops and placeholders). A segment
    run in pieces (``seg.pieces`` > 1, the program's memory plan) pays each piece's kernel times
    (their FLOPs and bytes at the piece's size, ``scaling``) and the overhead per piece."""
    if seg.pieces > 1 and program.memory is not None:
        scaling = scaling or BatchScaling(program)
        sizes = piece_sizes(program.batch_size, program.memory.piece_for(seg.layers[0], seg.phase))
        total = len(sizes) * target.mechanisms.pieces.overhead_s
        for size in set(sizes):
            total += sizes.count(size) * _segment_at(program, seg, target, precision, kernels, nodes, scaling, size)
        return total
    total = 0.0
    for kid in seg.kernels:
        k = kernels[kid]
        if target.compute.granularity == "kernel":
            io = kernel_io_bytes(k, nodes, precision.bytes)
            total += op_time(k.flops, io, k.kind in _MATMUL_LIKE, target, precision, attention=k.kind == "attention")
            continue
        total += sum(node_time(nodes[name], target, precision, program.info[name].flops) for name in k.nodes)
    return total


def _segment_at(program: Program, seg, target: Target, precision: Precision, kernels: dict, nodes: dict,
                scaling: BatchScaling, size: int) -> float:
    """Compute time of one piece of ``size`` samples."""
    fb = precision.bytes
    total = 0.0
    for kid in seg.kernels:
        k = kernels[kid]
        if target.compute.granularity == "kernel":
            total += op_time(scaling.kernel_flops(k, nodes).at(size), scaling.kernel_io(k, nodes, fb).at(size),
                             k.kind in _MATMUL_LIKE, target, precision, attention=k.kind == "attention")
            continue
        for name in k.nodes:
            node = nodes[name]
            if not moves_bytes(node):
                total += target.compute.kernel_overhead_s
                continue
            f = scaling.flops(node).at(size)
            nbytes = scaling.value(node, fb)
            for a in node.args:
                if hasattr(a, "op"):
                    nbytes = nbytes + scaling.value(a, fb)
            cls = op_class(node)
            total += op_time(f, nbytes.at(size), cls in _MATMUL_LIKE, target, precision, attention=cls == "attention",
                             transcendental_elements=f if is_transcendental(node) else 0)
    return total


def simulate(segments, compute_s: list[float], target: Target, micro_batch_size: int,
             batch_size: int, tokens_per_sample: int, model_flops: int, precision: Precision,
             weight_buffer_bytes: int, resident_weight_bytes: int,
             recompute_bytes: Optional[list[int]] = None, overheads: Optional[list[float]] = None) -> Schedule:
    """The schedule of one step. Memory: kept activations, the values a backward segment
    recomputes (``recompute_bytes``) and the working set of the running segment, plus two
    weight buffers when streaming, or every weight when resident. Offloaded activations are live
    while the segment that makes them and the next one run (streaming out), and from the segment
    before their reader (streaming in) to their last reader."""
    streaming = target.stream_enabled
    bw, lat = target.stream.effective, target.stream.latency_s
    times: list[SegmentTime] = []
    in_end = out_end = opt_end = 0.0
    ends: list[float] = []
    live = 0
    peak_live = 0
    prev_offload = 0
    for i, (seg, comp) in enumerate(zip(segments, compute_s)):
        s_in = (seg.weight_bytes / bw + lat) if streaming and seg.weight_bytes else 0.0
        s_out = (seg.grad_bytes / bw + lat) if streaming and seg.grad_bytes else 0.0
        reload_s = (seg.reload_bytes / bw + lat) if streaming and seg.reload_bytes else 0.0
        offload_s = (seg.offload_bytes / bw + lat) if streaming and seg.offload_bytes else 0.0
        s_in += reload_s
        s_out += offload_s
        ext = target.external_memory
        opt = (seg.grad_params / ext.optimizer_update_rate + len(seg.grads) * ext.optimizer_tensor_overhead_s
               if seg.grad_params else 0.0)
        buffer_free = ends[i - 2] if i >= 2 else 0.0
        in_start = max(in_end, buffer_free)
        in_end = in_start + s_in
        start = max(ends[-1] if ends else 0.0, in_end)
        end = start + comp
        out_end = max(end, out_end) + s_out
        opt_end = max(out_end, opt_end) + opt
        ends.append(end)
        live += seg.saved_bytes + seg.reload_bytes
        prefetch = segments[i + 1].reload_bytes if i + 1 < len(segments) else 0
        here = (live + seg.working_bytes + (recompute_bytes[i] if recompute_bytes else 0)
                + seg.offload_bytes + prev_offload + prefetch)
        peak_live = max(peak_live, here)
        live -= seg.freed_bytes
        prev_offload = seg.offload_bytes
        stream = max(s_in, s_out)
        bottleneck = "compute" if comp >= stream else ("stream-in" if s_in >= s_out else "stream-out")
        times.append(SegmentTime(comp, s_in, s_out, opt, in_start, in_end, start, end, out_end, opt_end,
                                 here, bottleneck, overheads[i] if overheads else 0.0, reload_s, offload_s))
    micro = max(ends[-1] if ends else 0.0, out_end)
    # Streaming targets update off the device while later segments run; a host updates after.
    tail = max(0.0, opt_end - micro) if streaming else sum(t.optimizer_s for t in times)
    n_micro = max(1, math.ceil(batch_size / micro_batch_size))      # the last may be smaller
    step = n_micro * micro + tail
    peak_flops = getattr(target.compute.peak_flops, precision.name)
    buffers = 2 * weight_buffer_bytes if streaming else resident_weight_bytes
    peak_memory = peak_live + buffers
    per_sample = peak_live / micro_batch_size
    room = target.memory.bytes - buffers
    max_mbs = int(room // per_sample) if per_sample > 0 else batch_size
    return Schedule(
        target=target.name, precision=precision.name, micro_batch_size=micro_batch_size,
        batch_size=batch_size, tokens_per_sample=tokens_per_sample, times=tuple(times),
        micro_step_s=micro, optimizer_tail_s=tail, step_s=step,
        samples_per_s=batch_size / step if step else 0.0,
        tokens_per_s=batch_size * tokens_per_sample / step if step else 0.0,
        utilization=(n_micro * model_flops) / (step * peak_flops) if step else 0.0,
        weight_bytes_in=sum(s.weight_bytes for s in segments) if streaming else 0,
        grad_bytes_out=sum(s.grad_bytes for s in segments) if streaming else 0,
        peak_memory_bytes=int(peak_memory), weight_buffer_bytes=int(weight_buffer_bytes),
        memory_bytes=int(target.memory.bytes), fits=peak_memory <= target.memory.bytes,
        max_micro_batch_size=max(0, max_mbs), offload_bytes=sum(s.offload_bytes for s in segments),
        piece_overhead_s=sum(overheads) if overheads else 0.0, micro_steps=n_micro, **_totals(times))


def _totals(times) -> dict:
    """Per micro-step sums and the step's bottleneck: the largest of compute, stream-in, stream-out."""
    sums = {"compute_s": sum(t.compute_s for t in times), "stream_in_s": sum(t.stream_in_s for t in times),
            "stream_out_s": sum(t.stream_out_s for t in times)}
    names = {"compute_s": "compute", "stream_in_s": "stream-in", "stream_out_s": "stream-out"}
    return {**sums, "bottleneck": names[max(sums, key=sums.__getitem__)] if times else ""}


def recompute_per_segment(program: Program, precision: Precision,
                          scaling: Optional[BatchScaling] = None) -> tuple[list[int], int, list[int]]:
    """Per segment: bytes (one piece's, with pieces) and FLOPs (the micro-batch's) of the values
    the remat pass recomputes there."""
    clones = set(program.remat.clones) if program.remat else set()
    kernels = {k.id: k for k in program.kernels}
    nodes = {n.name: n for n in program.gm.graph.nodes}
    scaling = scaling or BatchScaling(program)
    mem, flops = [], []
    for seg in program.segments:
        piece = program.memory.piece_for(seg.layers[0], seg.phase) if program.memory else program.batch_size
        names = [n for kid in seg.kernels for n in kernels[kid].nodes if n in clones]
        mem.append(int(sum(scaling.value(nodes[n], precision.bytes).at(piece) for n in names
                           if op_class(nodes[n]) != "view")))
        flops.append(sum(program.info[n].flops for n in names))
    return mem, sum(flops), flops


def peak_breakdown(program: Program, precision: Precision) -> dict:
    """The parts of the simulated peak, at the segment where it occurs: activations kept for the
    backward, the values that segment recomputes, its working set, and the weight buffers."""
    sched = program.schedule
    recompute = recompute_per_segment(program, precision)[0]
    i = max(range(len(sched.times)), key=lambda j: sched.times[j].live_bytes)
    seg = program.segments[i]
    kept = sched.times[i].live_bytes - seg.working_bytes - recompute[i]
    return {"segment": seg.name, "kept": kept, "recomputed": recompute[i], "working": seg.working_bytes,
            "buffers": sched.peak_memory_bytes - sched.times[i].live_bytes}


def make_cost(target: Target, precision: Precision, batch_size: int, tokens_per_sample: int,
              real_token_share: float = 1.0, resident=None):
    """``real_token_share``: non-pad share of each row (the data's statistics), for real tokens/s;
    ``resident``: program -> bytes a resident target holds besides activations (None: the weights)."""
    def cost(program: Program) -> tuple[Program, dict]:
        mbs = program.batch_size
        kernels = {k.id: k for k in program.kernels}
        nodes = {n.name: n for n in program.gm.graph.nodes}
        scaling = BatchScaling(program)
        compute = [segment_compute_s(program, seg, target, precision, kernels, nodes, scaling)
                   for seg in program.segments]
        overheads = [seg.pieces * target.mechanisms.pieces.overhead_s if seg.pieces > 1 else 0.0
                     for seg in program.segments]
        biggest = max((s.weight_bytes for s in program.segments), default=0)
        held = resident(program) if resident is not None else None
        resident_bytes = held if held is not None else sum(
            int(s.numel * precision.bytes) for s in program.inputs if s.kind.value == "param")
        recompute_mem, recompute_flops, per_seg = recompute_per_segment(program, precision, scaling)
        # Model FLOPs (utilization) leave the recomputation out; the time includes it.
        sched = simulate(program.segments, compute, target, mbs, batch_size, tokens_per_sample,
                         program.flops() - recompute_flops, precision, biggest, resident_bytes, recompute_mem, overheads)
        recompute_s = sum((c - o) * f / seg.flops for c, o, f, seg in zip(compute, overheads, per_seg, program.segments)
                          if seg.flops)
        sched = replace(sched, recompute_flops=recompute_flops, recompute_s=recompute_s,
                        real_token_share=real_token_share)
        notes = {
            "target": target.name, "step_s": round(sched.step_s, 6), "micro_step_s": round(sched.micro_step_s, 6),
            "samples_per_s": round(sched.samples_per_s, 3), "utilization": round(sched.utilization, 4),
            "peak_memory_bytes": sched.peak_memory_bytes, "fits": sched.fits,
            "max_micro_batch_size": sched.max_micro_batch_size,
            "recompute_flops": recompute_flops, "bottleneck": sched.bottleneck,
            "real_tokens_per_step": round(batch_size * tokens_per_sample * real_token_share),
            "real_tokens_per_s": round(sched.real_tokens_per_s, 1),
        }
        if program.memory is not None:
            notes.update({"pieces": program.memory.pieces, "offloaded_layers": len(program.memory.offloaded),
                          "offload_bytes": sched.offload_bytes, "piece_overhead_s": round(sched.piece_overhead_s, 6)})
        return replace(program, schedule=sched), notes
    return cost
