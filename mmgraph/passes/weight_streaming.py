"""weight_streaming: split the fused program into segments for a weight-streaming target.

Activations stay on the device; weights live off it. Each segment (normally one layer in one
phase) gets its weights streamed in when it runs: in the forward pass, and again in the
backward pass for the weights the backward reads; gradients of trainable weights stream out
after the backward segment; the optimizer updates them off the device.

- Kernels run in a topological order of the kernel graph (ties: kernel id); consecutive
  kernels of one layer and phase form a segment.
- A segment without weights (masks, rotary tables, the loss) merges into its neighbour.
- A segment whose weights exceed one weight buffer (half the target's weight-buffer memory:
  two buffers for double buffering) is split between kernels.
- Activations kept for backward are counted where they are made and freed after their last
  backward reader, at the precision the params train in.
- The memory plan (``program.memory``, passes/memory.py) applies: with pieces, a segment's
  working set is one piece's (and values made in one segment and read only by the next, such as
  the logits between the loss's forward and backward, live one piece at a time); the kept values
  of offloaded layers stream out after the segment that makes them and back in before their
  first backward reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

import networkx as nx
import torch.fx as fx

from mmgraph.core.batchscale import BatchScaling
from mmgraph.core.ir import Contract, InputKind, MemoryPlan, Phase, Program, Segment
from mmgraph.core.precision import Precision
from mmgraph.core.ops import op_class, op_name
from mmgraph.core.target import Target

CONTRACT = Contract(requires=("kernels",), provides=("segments",), invalidates=("schedule",))



def kernel_order(program: Program) -> list[int]:
    return list(nx.lexicographical_topological_sort(program.kernel_dag()))


def make_weight_streaming(target: Target, precision: Precision):
    def weight_streaming(program: Program) -> tuple[Program, dict]:
        return _weight_streaming(program, target, precision)
    return weight_streaming


def _weight_streaming(program: Program, target: Target, precision: Precision) -> tuple[Program, dict]:
    segments, notes = segment_program(program, target, precision, program.memory)
    return replace(program, segments=tuple(segments)), notes


def segment_program(program: Program, target: Target, precision: Precision,
                    memory: Optional[MemoryPlan] = None) -> tuple[list[Segment], dict]:
    """The segments of ``program`` (under ``memory``'s pieces and offload, when given)."""
    fb = precision.bytes          # floating-point values move at the target's precision
    scaling = BatchScaling(program)
    m = program.batch_size
    offloaded = set(memory.offloaded) if memory is not None else set()
    nodes = {n.name: n for n in program.gm.graph.nodes}
    kernels = {k.id: k for k in program.kernels}
    root = weight_roots(program)              # weights, and their views and casts -> the weight
    params_of: dict[int, set[str]] = {}
    for k in program.kernels:
        params_of[k.id] = {root[a] for n in k.nodes for a in nodes[n].all_input_nodes if a in root}
    param_bytes = {s.name: int(s.numel * precision.bytes) for s in program.inputs if s.kind == InputKind.PARAM}
    param_numel = {s.name: s.numel for s in program.inputs if s.kind == InputKind.PARAM}
    owner = {name: k.id for k in program.kernels for name in k.nodes}
    outs = list(program.gm.graph.nodes)[-1].args[0]
    grad_kernel = {}
    for node, spec in zip(outs, program.outputs):
        if spec.kind == "grad" and isinstance(node, fx.Node):
            grad_kernel.setdefault(owner.get(node.name, -1), []).append(spec.target)

    # 1. runs of one (phase, layer) in execution order
    order = kernel_order(program)
    runs: list[list[int]] = []
    for kid in order:
        k = kernels[kid]
        if runs and (kernels[runs[-1][0]].phase, kernels[runs[-1][0]].layer) == (k.phase, k.layer):
            runs[-1].append(kid)
        else:
            runs.append([kid])

    def weights(run):
        return set().union(*(params_of[k] for k in run))

    merged = _merge_weightless(runs, kernels, weights)                       # 2.
    split, splits = _split_by_buffer(merged, weights, param_bytes,          # 3.
                                     target.memory.bytes * target.memory.weight_buffer_share / 2)
    piece = [memory.piece_for(kernels[run[0]].layer, str(kernels[run[0]].phase)) if memory is not None else m
             for run in split]
    kept = _kept_activations(program, split, [kernels[run[0]].layer for run in split], scaling, fb, piece,
                             offloaded)   # 4.

    segments = []
    for i, run in enumerate(split):
        w = sorted(weights(run))
        grads = sorted(g for kid in run for g in grad_kernel.get(kid, []))
        layers = tuple(dict.fromkeys(kernels[k].layer for k in run))
        working = max(int(scaling.kernel_io(kernels[k], nodes, fb).at(piece[i])) for k in run)
        segments.append(Segment(
            id=i, phase=kernels[run[0]].phase, layers=layers, kernels=tuple(run), weights=tuple(w),
            weight_bytes=sum(param_bytes[p] for p in w), grads=tuple(grads),
            grad_bytes=sum(param_bytes[g] for g in grads), grad_params=sum(param_numel[g] for g in grads),
            flops=sum(kernels[k].flops for k in run), saved_bytes=kept.saved[i], freed_bytes=kept.freed[i],
            working_bytes=working, offload_bytes=kept.offload[i], reload_bytes=kept.reload[i],
            pieces=math.ceil(m / piece[i])))
    notes = {
        "segments": len(segments),
        "split": splits,
        "weight_bytes_streamed": sum(s.weight_bytes for s in segments),
        "gradient_bytes_streamed": sum(s.grad_bytes for s in segments),
        "activation_bytes_kept": sum(kept.saved),
        "precision": precision.name,
    }
    if min(piece, default=m) < m or offloaded:
        notes.update({"segments_in_pieces": sum(1 for q in piece if q < m), "smallest_piece": min(piece),
                      "offloaded_layers": len(offloaded), "activation_bytes_offloaded": sum(kept.offload)})
    return segments, notes


def _merge_weightless(runs: list[list[int]], kernels: dict, weights) -> list[list[int]]:
    """2. Runs without weights join a neighbour of the same phase (the next one when the previous
    is of another phase)."""
    merged: list[list[int]] = []
    pending: list[int] = []
    for run in runs:
        if not weights(run):
            if merged and kernels[merged[-1][0]].phase == kernels[run[0]].phase and not pending:
                merged[-1].extend(run)
            else:
                pending.extend(run)
            continue
        if pending and kernels[pending[0]].phase == kernels[run[0]].phase:
            run = pending + run
        elif pending:
            merged.append(pending)
        pending = []
        merged.append(run)
    if pending:
        merged.append(pending)
    return merged


def _split_by_buffer(merged: list[list[int]], weights, param_bytes: dict, buffer: float) -> tuple[list, int]:
    """3. Runs whose weights exceed one weight buffer are cut; returns the runs and the cuts."""
    split: list[list[int]] = []
    splits = 0
    for run in merged:
        chunk: list[int] = []
        for kid in run:
            if chunk and sum(param_bytes[p] for p in weights(chunk + [kid])) > buffer:
                split.append(chunk)
                splits += 1
                chunk = []
            chunk.append(kid)
        split.append(chunk)
    return split, splits


@dataclass
class _Kept:
    saved: list[int]       # per segment: kept values made there that stay on the device
    freed: list[int]       # per segment: kept values (resident or reloaded) whose last reader runs there
    offload: list[int]     # per segment: kept values made there that stream out
    reload: list[int]      # per segment: offloaded values streamed back in before it runs


@dataclass(frozen=True)
class KeptValue:
    """A forward value the backward reads: where it is made and read (segment indices)."""

    node: fx.Node
    layer: str
    made: int
    first: int            # its first backward reader's segment
    last: int             # its last backward reader's segment


def weight_roots(program: Program) -> dict[fx.Node, str]:
    """Every weight and every view or cast of one (mixed precision: the weight at the training
    precision), each mapped to its weight's name. A backward kernel that reads the forward's cast
    of a weight streams that weight again."""
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    root = {p: spec.name for p, spec in zip(placeholders, program.inputs) if spec.kind == InputKind.PARAM}
    for node in program.ops():
        ins = node.all_input_nodes
        if len(ins) == 1 and ins[0] in root and (op_class(node) == "view" or op_name(node) == "_to_copy"):
            root[node] = root[ins[0]]
    return root


def kept_values(program: Program, segment_of_kernel: dict) -> list[KeptValue]:
    """Every activation kept across the forward/backward boundary (views are their source's;
    weights and their views and casts are the streamed weights, not activations)."""
    owner = {name: k.id for k in program.kernels for name in k.nodes}
    placeholders = [p for p in program.gm.graph.nodes if p.op == "placeholder"]
    weightish = {p for p, spec in zip(placeholders, program.inputs) if spec.kind == InputKind.PARAM}
    out = []
    for node in program.ops():
        ins = node.all_input_nodes
        if ins and set(ins) <= weightish and (op_class(node) == "view" or op_name(node) == "_to_copy"):
            weightish.add(node)
            continue      # a weight's view or cast (mixed precision): the streamed weight, not an activation
        info = program.info[node.name]
        if info.phase != Phase.FORWARD or op_class(node) == "view":
            continue
        readers = backward_readers(node, program)
        if not readers:
            continue
        segs = [segment_of_kernel[owner[r.name]] for r in readers]
        out.append(KeptValue(node, info.layer, segment_of_kernel[owner[node.name]], min(segs), max(segs)))
    return out


def _kept_activations(program: Program, split: list[list[int]], layer_of: list[str], scaling: BatchScaling, fb: int,
                      piece: list[int], offloaded: set) -> _Kept:
    """4. Per segment, bytes of activations made in the forward and read in the backward (saved
    there), and of those whose last backward reader runs there (freed there). With pieces, a
    value read only by the segment right after the one that makes it is one piece's; the values
    an offloaded layer's backward reads first (with full recomputation, its input) stream out
    after the segment that makes them instead of staying, and back in before that backward."""
    seg_of_kernel = {kid: i for i, run in enumerate(split) for kid in run}
    n = len(split)
    kept = _Kept([0] * n, [0] * n, [0] * n, [0] * n)
    m = program.batch_size
    for v in kept_values(program, seg_of_kernel):
        size = scaling.value(v.node, fb)
        # the loss's logits between its forward and backward, both run piece by piece
        in_pieces = v.last == v.made + 1 and piece[v.made] < m and piece[v.made] == piece[v.last]
        if layer_of[v.first] in offloaded:
            nbytes = int(size.at(m))
            kept.offload[v.made] += nbytes
            kept.reload[v.first] += nbytes
            kept.freed[v.last] += nbytes
        else:
            nbytes = int(size.at(piece[v.made] if in_pieces else m))
            kept.saved[v.made] += nbytes
            kept.freed[v.last] += nbytes
    return kept


def backward_readers(node: fx.Node, program: Program) -> list[fx.Node]:
    """Backward ops that read ``node`` directly or through views of it."""
    out, todo = [], list(node.users)
    while todo:
        u = todo.pop()
        if u.op != "call_function":
            continue
        if program.info[u.name].phase == Phase.BACKWARD:
            out.append(u)
        elif op_class(u) == "view":
            todo.extend(u.users)
    return out
