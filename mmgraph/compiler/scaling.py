"""Data parallelism on N systems, simulated from the one-system schedule the cost pass made.

The global batch is split across N systems; each runs ``ceil(B / N / micro_batch)`` micro-steps
of the same program. What the systems add depends on how they are joined (``target.interconnect``):

- ``swarmx`` (wafer targets, the Model Zoo's ``num_csx``): SwarmX broadcasts the streamed weights
  to every system and reduces their gradients on the way back to MemoryX, so each system keeps
  its own link's stream rate; every streamed segment pays the tree's latency (``ceil(log2 N)``
  hops) once more, and MemoryX updates once per step, as on one system.
- ``ring`` (GPU targets): gradients are all-reduced over the interconnect by a ring
  (``2 (N - 1) / N`` of the gradient bytes each way, ``2 (N - 1)`` latencies), in buckets issued
  during the last micro-step's backward, so only what does not fit under that backward, and
  the last bucket, add to the step.

Scaling efficiency is samples/s on N systems over N times samples/s on one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from mmgraph.core.ir import Program
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target
from mmgraph.passes.cluster import world

SYSTEMS = (1, 2, 4, 8, 16)
BUCKET_BYTES = 25 * 1024 * 1024


@dataclass(frozen=True)
class ScalingPoint:
    systems: int
    micro_steps: int              # per system, per global batch
    step_s: float
    samples_per_s: float
    efficiency: float             # samples/s / (systems x samples/s on one)
    comm_s: float                 # reduction time added to the step (exposed)
    hidden_s: float               # reduction time overlapped with the backward


def scaling(program: Program, target: Target, systems: tuple[int, ...] = SYSTEMS,
            grad_bytes: int | None = None) -> list[ScalingPoint]:
    """Step time and scaling efficiency of ``program`` (with its schedule) on each system count."""
    sched = program.schedule
    if sched is None:
        raise ValueError("scaling needs a program with a schedule (run the cost pass first)")
    if grad_bytes is None:
        grad_bytes = sched.grad_bytes_out or _grad_bytes(program)
    backward_s = sum(t.compute_s for t, seg in zip(sched.times, program.segments or ()) if seg.phase == "backward")
    segments = len(sched.times)
    points = []
    base = None
    for n in systems:
        per_system = math.ceil(sched.batch_size / n)
        micro = max(1, math.ceil(per_system / sched.micro_batch_size))
        comm = hidden = 0.0
        link = target.interconnect
        if n > 1 and link is not None and link.topology == "swarmx":
            comm = micro * segments * math.ceil(math.log2(n)) * link.latency_s
        elif n > 1 and link is not None:
            bw = link.ring_bandwidth(n)
            ring = 2 * (n - 1) / n * grad_bytes / bw + 2 * (n - 1) * link.latency_s
            last_bucket = 2 * (n - 1) / n * min(grad_bytes, BUCKET_BYTES) / bw
            hidden = min(max(ring - last_bucket, 0.0), backward_s)
            comm = ring - hidden
        step = micro * sched.micro_step_s + sched.optimizer_tail_s + comm
        sps = sched.batch_size / step if step else 0.0
        base = base or sps / n
        points.append(ScalingPoint(n, micro, step, sps, sps / (n * base) if base else 0.0, comm, hidden))
    return points


def _grad_bytes(program: Program) -> int:
    grads = {s.target for s in program.outputs if s.kind == "grad"}
    return sum(s.numel * 4 for s in program.inputs if s.name in grads)


def scaling_table(points: list[ScalingPoint]) -> str:
    lines = ["systems  micro-steps  step (ms)  samples/s  efficiency  exposed comm (ms)  hidden (ms)"]
    for p in points:
        lines.append(f"{p.systems:>7}  {p.micro_steps:>11}  {p.step_s * 1e3:>9.1f}  {p.samples_per_s:>9.1f}  "
                     f"{p.efficiency:>10.1%}  {p.comm_s * 1e3:>17.2f}  {p.hidden_s * 1e3:>11.2f}")
    return "\n".join(lines)


def world_report(program: Program, target: Target, precision: Precision, world_size: int, zero: int,
                 batch_size: int, tokens_per_sample: int, real_token_share: float = 1.0) -> Optional[dict]:
    """``report.json``'s ``world``: all ranks together at ``world_size``. A resident GPU target
    gets the model above; a streaming target (a wafer with SwarmX, a GPU streaming from its host)
    the data-parallel scaling of compiler/scaling.py. None without a schedule or a backward."""
    if program.schedule is None or program.mode != "train":
        return None
    if not target.stream_enabled and target.kind == "gpu":
        w = world(program, target, precision, world_size, zero, batch_size, tokens_per_sample, real_token_share)
        return {"model": "resident weights, data parallel" + (f", ZeRO-{zero}" if zero else ""), **asdict(w)}
    if target.interconnect is None and world_size > 1:
        return None
    point = scaling(program, target, systems=(world_size,))[0]
    return {"model": f"weight streaming, {target.interconnect.topology if target.interconnect else 'one system'}",
            "world_size": world_size, "zero": zero, "micro_batch_size": program.schedule.micro_batch_size,
            "micro_steps": point.micro_steps, "step_s": point.step_s, "samples_per_s": point.samples_per_s,
            "tokens_per_s": point.samples_per_s * tokens_per_sample,
            "real_tokens_per_s": point.samples_per_s * tokens_per_sample * real_token_share,
            "exposed_s": point.comm_s, "peak_bytes": program.schedule.peak_memory_bytes,
            "memory_bytes": program.schedule.memory_bytes, "fits": program.schedule.fits}
