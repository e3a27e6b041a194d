"""cluster: N GPUs training data-parallel with weights resident, as users run LLaVA (DeepSpeed
ZeRO-2 / ZeRO-3, FSDP), from the one-rank schedule the cost pass made on a resident GPU target.

Memory per rank (Rajbhandari et al. 2020, "ZeRO", section 3.1: mixed-precision Adam keeps per
parameter 2 bytes of 16-bit weights, 2 of 16-bit gradients and K = 12 of fp32 master weights,
momentum and variance; frozen parameters keep their weights only):

    stage 0 (DDP)   weights 2 Psi        gradients 2 Psi_T       optimizer 12 Psi_T
    stage 1         weights 2 Psi        gradients 2 Psi_T       optimizer 12 Psi_T / N
    stage 2         weights 2 Psi        gradients 2 Psi_T / N   optimizer 12 Psi_T / N
    stage 3         weights 2 Psi / N    gradients 2 Psi_T / N   optimizer 12 Psi_T / N
                    (+ the gathered weights of the running and the next layer)

plus the activations the step keeps (with gradient checkpointing: each layer's input) and its
largest working set, as the cost pass counts them.

Time per micro-step: the segments' compute (kernel roofline times at the target's measured
efficiencies) and, overlapped with it as weight streaming is, the collectives each segment
needs, at the ring bus bandwidth the target names (``interconnect``: link rate x measured NCCL
efficiency; the slower inter-node link past ``systems_per_node``):

    stage 3         all-gather of the segment's weights before it runs (forward and backward;
                    prefetched one segment ahead), reduce-scatter of its gradients after it
    stage 1, 2      reduce-scatter (stage 2) or all-reduce (0, 1) of each backward segment's
                    gradients, bucketed under the rest of the backward

and per step: the optimizer on the rank's share of the parameters (memory-bound: 28 bytes moved
per parameter at the target's measured bandwidth), then for stages 1 and 2 the all-gather of
the updated weights. Gradient accumulation: stages 2 and 3 reduce every micro-step (DeepSpeed),
stages 0 and 1 the last only. The global batch splits into ``ceil(B / (N x micro_batch))``
micro-steps per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from mmgraph.core.ir import InputKind, Program
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target
from mmgraph.passes.cost import simulate

OPTIMIZER_STATE_BYTES = 12        # fp32 master weights + Adam momentum + variance (ZeRO paper's K)
OPTIMIZER_TRAFFIC_BYTES = 28      # AdamW reads master, m, v (12) and the gradient (4), writes 12 (assumption)


@dataclass(frozen=True)
class State:
    """Bytes per rank of what persists across steps (ZeRO's model states)."""

    weights: int
    gradients: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer


def state_bytes(program: Program, precision: Precision, world_size: int, zero: int) -> State:
    """The model states one rank holds (table in the module's docstring)."""
    params = [s for s in program.inputs if s.kind == InputKind.PARAM]
    total = sum(s.numel for s in params)
    trainable = sum(s.numel for s in params if s.trainable)
    pb, n = precision.bytes, max(world_size, 1)
    opt = OPTIMIZER_STATE_BYTES if pb < 4 else 8          # fp32 training: Adam's m and v only
    return State(weights=int(total * pb / (n if zero >= 3 else 1)),
                 gradients=int(trainable * pb / (n if zero >= 2 else 1)),
                 optimizer=int(trainable * opt / (n if zero >= 1 else 1)))


@dataclass(frozen=True)
class World:
    """N ranks training together: what ``report.json`` calls ``world``."""

    world_size: int
    zero: int
    micro_batch_size: int             # per rank
    micro_steps: int                  # per rank, per global batch
    step_s: float
    samples_per_s: float              # all ranks together
    tokens_per_s: float
    real_tokens_per_s: float
    micro_step_s: float
    optimizer_s: float                # per step, after the last micro-step
    gather_s: float                   # per step, all-gathers of weights (stage 3 per segment; 1, 2 after the update)
    reduce_s: float                   # per step, gradient reductions
    exposed_s: float                  # per step, communication not hidden under compute
    bus_bandwidth: float              # bytes/s a ring collective reaches
    weights_bytes: int                # per rank
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int            # the step's peak of activations and working set
    gathered_bytes: int               # stage 3: the gathered weights of two segments
    peak_bytes: int
    memory_bytes: int
    fits: bool


def world(program: Program, target: Target, precision: Precision, world_size: int, zero: int,
          batch_size: int, tokens_per_sample: int, real_token_share: float = 1.0) -> World:
    """The step of ``world_size`` ranks on a resident GPU target (or one rank when 1)."""
    sched = program.schedule
    n = max(world_size, 1)
    link = target.interconnect
    bw = link.collective_bandwidth(n) if link is not None and n > 1 else 0.0
    ring = (n - 1) / n
    lat = (n - 1) * link.latency_s if link is not None and n > 1 else 0.0
    pb = precision.bytes
    param_bytes = {s.name: s.numel * pb for s in program.inputs if s.kind == InputKind.PARAM}
    resident = sum(param_bytes.values())
    # one rank's segments with the collectives as streams in (gathers) and out (reductions)
    grads = gradient_bytes(program, pb)
    segs = []
    for seg, grad in zip(program.segments, grads):
        gather = int(ring * seg.weight_bytes) if zero >= 3 and n > 1 else 0
        factor = ring if zero >= 2 else 2 * ring          # reduce-scatter, or all-reduce
        reduce = int(factor * grad) if n > 1 else 0
        segs.append(replace(seg, weight_bytes=gather, grad_bytes=reduce, grad_params=0, grads=(),
                            offload_bytes=0, reload_bytes=0))
    links = target.model_copy(update={
        "stream": target.stream.model_copy(update={"enabled": True, "bandwidth": bw or 1.0, "weight_share": 1.0,
                                                   "latency_s": lat}),
    })
    compute = [t.compute_s for t in sched.times]
    last = simulate(segs, compute, links, sched.micro_batch_size, sched.micro_batch_size, tokens_per_sample,
                    0, precision, 0, 0)
    if zero < 2:     # stages 0 and 1 reduce once per step: the earlier micro-steps communicate nothing
        quiet = simulate([replace(s, grad_bytes=0) for s in segs], compute, links, sched.micro_batch_size,
                         sched.micro_batch_size, tokens_per_sample, 0, precision, 0, 0)
    else:
        quiet = last
    per_rank = math.ceil(batch_size / n)
    micro_steps = max(1, math.ceil(per_rank / sched.micro_batch_size))
    trainable = sum(s.numel for s in program.inputs if s.kind == InputKind.PARAM and s.trainable)
    share = trainable / (n if zero >= 1 else 1)
    optimizer = share * OPTIMIZER_TRAFFIC_BYTES / (target.memory.bandwidth * target.memory.bandwidth_efficiency)
    after = ring * trainable * pb / bw + lat if 1 <= zero <= 2 and n > 1 and bw else 0.0
    step = (micro_steps - 1) * quiet.micro_step_s + last.micro_step_s + optimizer + after
    gather = sum(s.weight_bytes for s in segs) / bw * micro_steps if bw else 0.0
    reduce = sum(s.grad_bytes for s in segs) / bw * (micro_steps if zero >= 2 else 1) if bw else 0.0
    busy = sum(compute) * micro_steps
    exposed = max(0.0, step - optimizer - busy)
    state = state_bytes(program, precision, n, zero)
    activations = max(0, sched.peak_memory_bytes - resident)
    gathered = 2 * max((s.weight_bytes for s in program.segments), default=0) if zero >= 3 else 0
    peak = state.total + activations + gathered
    samples = batch_size / step if step else 0.0
    return World(n, zero, sched.micro_batch_size, micro_steps, step, samples, samples * tokens_per_sample,
                 samples * tokens_per_sample * real_token_share, last.micro_step_s, optimizer, gather, reduce,
                 exposed, bw, state.weights, state.gradients, state.optimizer, activations, gathered, peak,
                 int(target.memory.bytes), peak <= target.memory.bytes)


def gradient_bytes(program: Program, float_bytes: int) -> list[int]:
    """Per segment: the bytes of the gradients it completes, each trainable weight's in the last
    backward segment of its layer (in a data-parallel program the gradients leave through the
    collectives, so they are found by layer, not by output)."""
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    last: dict = {}
    for i, seg in enumerate(program.segments):
        if seg.phase == "backward":
            for layer in seg.layers:
                last[layer] = i
    fallback = max(last.values(), default=len(program.segments) - 1)
    out = [0] * len(program.segments)
    for node, spec in zip(placeholders, program.inputs):
        if spec.kind == InputKind.PARAM and spec.trainable and node.users:
            layer = program.info[next(iter(node.users)).name].layer
            out[last.get(layer, fallback)] += spec.numel * float_bytes
    return out


def resident_bytes(program: Program, precision: Precision, target: Target, world_size: int = 1,
                   zero: int = 0) -> Optional[int]:
    """What a resident GPU target holds besides activations: the model states of one rank (None
    for streaming targets and hosts, whose resident weights the cost pass counts itself)."""
    if target.stream_enabled or target.kind != "gpu" or program.mode != "train":
        return None
    gathered = 0
    if zero >= 3 and world_size > 1:               # the running and the next layer's weights, gathered
        by_layer: dict = {}
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        for node, spec in zip(placeholders, program.inputs):
            if spec.kind == InputKind.PARAM and node.users:
                layer = program.info[next(iter(node.users)).name].layer
                by_layer[layer] = by_layer.get(layer, 0) + spec.numel * precision.bytes
        gathered = 2 * max(by_layer.values(), default=0)
    return state_bytes(program, precision, world_size, zero).total + gathered
