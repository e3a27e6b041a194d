"""remat: decide per layer which forward values the backward keeps and which it recomputes.

Policies (``model.activation_checkpointing`` or ``--remat``):

- ``none``: the backward reads every forward value it needs (what the trace made).
- ``full``: each transformer layer keeps its input only (the values other layers hand it) and
  recomputes the rest of its forward in its backward.
- ``selective``: a layer keeps the outputs of its matmuls with weights (the expensive values)
  and recomputes the cheap, memory-heavy rest: attention's core (scores, softmax, dropout,
  attention over values), elementwise ops and norms (Korthikanti et al. 2022).
- ``auto``: per layer, the policy the memory planner (passes/memory.py) chooses: with the
  target's other mechanisms (pieces of the micro-batch, offload of kept activations), the
  fastest plan that fits; ``full`` everywhere when nothing fits (the cost pass then reports it).

With a target, the planner also decides, for any policy, how many pieces each segment runs the
micro-batch in and which layers' kept values are offloaded (``Program.memory``); the
weight_streaming and cost passes apply that.

The rewrite: a forward value chosen for recomputation is duplicated (``rc_<name>``) into the
backward, right before its first backward reader, with the recomputed values it depends on; so
the forward values the backward reads afterwards (the kept set) are exactly what crosses the
forward/backward boundary. Dropout masks are pure values of the program's random inputs
(models/rng.py), recomputed like any other; values of stateful random ops (a model that draws
from torch's generator) are always kept, so recomputation never draws new numbers.
Recomputed ops run the same ATen ops on the same inputs, so the gradients are unchanged. The
program is fused again so the recomputed ops join the backward's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import torch.fx as fx

from mmgraph.core.batchscale import ZERO, Affine, BatchScaling
from mmgraph.core.ir import Contract, InputKind, LayerKind, Phase, Program, RematLayer, RematPlan
from mmgraph.core.opcost import kernel_io_bytes, value_bytes
from mmgraph.core.ops import is_random, op_class, op_name
from mmgraph.passes.cluster import resident_bytes
from mmgraph.passes.memory import LayerTerm, build_workload
from mmgraph.passes.memory_planner import choose, memory_plan
from mmgraph.passes.util import copy_program, drop_dead
from mmgraph.passes.verify import VerificationError
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target

POLICIES = ("none", "selective", "full", "auto")
LEVELS = ("none", "selective", "full")            # from least to most recompute
CLONE_PREFIX = "rc_"

# the plan (remat, memory) comes with a backward. The rewrite leaves the recomputed ops in no
# kernel: the pipeline runs fusion again after this pass (stage fuse_recomputed).
CONTRACT = Contract(requires=("kernels",), invalidates=("kernels", "segments", "schedule"))
Fuse = Callable[[Program], "tuple[Program, dict]"]



def _random(node: fx.Node) -> bool:
    """Ops that draw random numbers (the registry's ``random``, and attention with dropout): never
    recomputed."""
    if is_random(node):
        return True
    schema = getattr(node.target, "_schema", None)
    for i, arg in enumerate(schema.arguments if schema is not None else ()):
        if arg.name == "dropout_p":
            p = node.args[i] if i < len(node.args) else node.kwargs.get("dropout_p", arg.default_value)
            return bool(p)
    return False


@dataclass
class _Graph:
    """What the decision needs to know of the program, computed once."""

    program: Program
    fb: int                                   # bytes of a floating-point value
    param_like: set                           # parameters and views / casts of them only
    layers: list                              # rematerializable layers, in graph order
    boundary: set                             # forward values a forward op of another layer reads
    weight_mm: set                            # matmuls that read a weight

    def layer(self, node: fx.Node) -> str:
        return self.program.info[node.name].layer

    def phase(self, node: fx.Node) -> Phase:
        return self.program.info[node.name].phase


def _analyse(program: Program, fb: int) -> _Graph:
    info = program.info
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    param_like = {n for n, s in zip(placeholders, program.inputs) if s.kind == InputKind.PARAM}
    layers: dict[str, None] = {}
    boundary, weight_mm = set(), set()
    for node in program.ops():
        ins = node.all_input_nodes
        if ins and all(a in param_like for a in ins) and (op_class(node) == "view" or op_name(node) == "_to_copy"):
            param_like.add(node)
        me = info[node.name]
        if me.phase != Phase.FORWARD:
            continue
        if me.kind == LayerKind.BLOCK:
            layers.setdefault(me.layer)
        for a in ins:
            if a.op == "call_function" and info[a.name].layer != me.layer:
                boundary.add(a)
        if op_class(node) == "matmul" and any(a in param_like for a in ins):
            weight_mm.add(node)
    outs = list(program.gm.graph.nodes)[-1].args[0]
    boundary |= {o for o in outs if isinstance(o, fx.Node) and o.op == "call_function"}
    return _Graph(program, fb, param_like, list(layers), boundary, weight_mm)


def _anchor(g: _Graph, node: fx.Node, policy_of: dict) -> bool:
    """Whether ``node`` is kept when the backward needs it (else it is recomputed)."""
    if node.op != "call_function" or node in g.param_like or g.phase(node) != Phase.FORWARD:
        return True
    policy = policy_of.get(g.layer(node), "none")
    if policy == "none" or node in g.boundary or _random(node):
        return True
    if op_class(node) == "source":
        return False
    if op_class(node) == "view" and any(_random(a) for a in node.all_input_nodes):
        return True                                   # an output of a random op (a dropout's mask)
    return policy == "selective" and node in g.weight_mm


def _storage(g: _Graph, node: fx.Node) -> Optional[fx.Node]:
    """The value that holds the memory of ``node`` (views: their source), None for inputs."""
    while node.op == "call_function" and op_class(node) == "view" and node.all_input_nodes:
        node = node.all_input_nodes[0]
    if node.op != "call_function" or node in g.param_like:
        return None
    return node


@dataclass
class _Split:
    kept: set            # forward values the backward reads (views included)
    recompute: set       # forward values made again in the backward


def _split(g: _Graph, policy_of: dict) -> _Split:
    kept, recompute = set(), set()
    todo = []
    for node in g.program.ops():
        if g.phase(node) == Phase.BACKWARD:
            todo.extend(a for a in node.all_input_nodes if a.op == "placeholder" or g.phase(a) == Phase.FORWARD)
    while todo:
        a = todo.pop()
        if a in kept or a in recompute:
            continue
        if _anchor(g, a, policy_of):
            kept.add(a)
        else:
            recompute.add(a)
            todo.extend(a.all_input_nodes)
    return _Split(kept, recompute)


def kept_readers(g: _Graph, policy_of: dict) -> dict[fx.Node, set[fx.Node]]:
    """Per kept value (its storage): the backward ops that read it once the program is
    rewritten for ``policy_of``, directly or through the values recomputed from it (a recomputed
    op runs in the backward right before the op that needs it)."""
    readers: dict[fx.Node, set[fx.Node]] = {}
    todo = []
    for node in g.program.ops():
        if g.phase(node) == Phase.BACKWARD:
            todo.extend((a, node) for a in node.all_input_nodes if a.op == "placeholder" or g.phase(a) == Phase.FORWARD)
    seen = set()
    while todo:
        a, reader = todo.pop()
        if (a, reader) in seen:
            continue
        seen.add((a, reader))
        if _anchor(g, a, policy_of):
            s = _storage(g, a)
            if s is not None:
                readers.setdefault(s, set()).add(reader)
        else:
            todo.extend((x, reader) for x in a.all_input_nodes)
    return readers


@dataclass
class _Tally:
    kept_bytes: dict      # layer ('' for values outside rematerialized layers) -> bytes (Affine in the micro-batch)
    kept: dict            # layer -> storage node names
    work: dict            # layer -> bytes recomputed (Affine)
    flops: dict           # layer -> FLOPs recomputed (Affine)
    recomputed: dict      # layer -> node names

    def at(self, what: str, layer: str, m: int) -> int:
        return int(getattr(self, what).get(layer, ZERO).at(m))


def _tally(g: _Graph, split: _Split, scaling: BatchScaling) -> _Tally:
    t = _Tally({}, {}, {}, {}, {})
    roots = {s for s in (_storage(g, a) for a in split.kept) if s is not None}
    remat_layers = set(g.layers)
    for s in sorted(roots, key=lambda n: n.name):
        layer = g.layer(s) if g.layer(s) in remat_layers else ""
        t.kept_bytes[layer] = t.kept_bytes.get(layer, ZERO) + scaling.value(s, g.fb)
        t.kept.setdefault(layer, []).append(s.name)
    for n in split.recompute:
        layer = g.layer(n)
        if op_class(n) != "view":
            t.work[layer] = t.work.get(layer, ZERO) + scaling.value(n, g.fb)
        t.flops[layer] = t.flops.get(layer, ZERO) + scaling.flops(n)
        t.recomputed.setdefault(layer, []).append(n.name)
    return t


@dataclass
class _Fixed:
    """Peak-memory terms that no policy changes."""

    outside_kept: int     # kept values outside rematerializable layers (masks, rotary tables, ...)
    kernel_work: int      # largest kernel working set
    buffers: int          # weight buffers (streaming) or every weight (resident)
    memory: int           # the target's memory; 0 without a target
    scores: int           # largest attention-score tensor a layer makes


def _fixed(g: _Graph, tallies: dict, target: Optional[Target], precision: Precision) -> _Fixed:
    program = g.program
    nodes = {n.name: n for n in program.gm.graph.nodes}
    work = max((kernel_io_bytes(k, nodes, g.fb) for k in program.kernels or ()), default=0)
    scores = 0
    for node in program.ops():
        shape = program.info[node.name].shape
        # [batch, heads, queries, keys] (masks have one head and are made outside the layers)
        if (op_class(node) != "view" and len(shape) >= 4 and shape[-1] == shape[-2] > 1 and shape[-3] > 1
                and program.info[node.name].layer in g.layers):
            scores = max(scores, value_bytes(node, g.fb))
    buffers, memory = 0, 0
    if target is not None:
        memory = int(target.memory.bytes)
        params = [s for s in program.inputs if s.kind == InputKind.PARAM]
        if target.stream_enabled:
            by_layer: dict[str, int] = {}
            placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
            spec = dict(zip(placeholders, program.inputs))
            for p, s in spec.items():
                if s.kind == InputKind.PARAM and p.users:
                    layer = program.info[next(iter(p.users)).name].layer
                    by_layer[layer] = by_layer.get(layer, 0) + int(s.numel * precision.bytes)
            cap = target.memory.bytes * target.memory.weight_buffer_share / 2
            buffers = 2 * int(min(max(by_layer.values(), default=0), cap))
        else:
            buffers = sum(int(s.numel * precision.bytes) for s in params)
    m0 = program.batch_size
    outside = max(t.at("kept_bytes", "", m0) for t in tallies.values())
    return _Fixed(outside, work, buffers, memory, scores)


def _estimate(choice: dict, tallies: dict, fixed: _Fixed, m0: int) -> tuple[int, int, int]:
    """(peak, kept activations, largest layer's recomputed values) for a per-layer choice, the
    whole micro-batch at once and nothing offloaded: what the step needs without the target's
    other mechanisms."""
    kept = fixed.outside_kept + sum(tallies[p].at("kept_bytes", layer, m0) for layer, p in choice.items())
    work = max((tallies[p].at("work", layer, m0) for layer, p in choice.items() if p != "none"), default=0)
    return kept + work + fixed.kernel_work + fixed.buffers, kept, work


def _rewrite(program: Program, recompute: set) -> tuple[Program, list[str]]:
    """Duplicate the recomputed forward values into the backward before their first reader."""
    gm, info = copy_program(program)
    graph = gm.graph
    names = {n.name for n in recompute}
    by_name = {n.name: n for n in graph.nodes}
    clones: dict[fx.Node, fx.Node] = {}

    def make(a: fx.Node, before: fx.Node) -> fx.Node:
        if a in clones:
            return clones[a]
        for i in a.all_input_nodes:
            if i.name in names:
                make(i, before)
        args = fx.map_arg(a.args, lambda n: clones.get(n, n))
        kwargs = fx.map_arg(a.kwargs, lambda n: clones.get(n, n))
        with graph.inserting_before(before):
            new = graph.create_node("call_function", a.target, args, kwargs, name=CLONE_PREFIX + a.name)
        new.meta = dict(a.meta)
        info[new.name] = replace(info[a.name], phase=Phase.BACKWARD, layer=info[before.name].layer,
                                 kind=info[before.name].kind)
        clones[a] = new
        return new

    for node in list(graph.nodes):
        if node.op != "call_function" or info[node.name].phase != Phase.BACKWARD or node.name.startswith(CLONE_PREFIX):
            continue
        for a in list(node.all_input_nodes):
            if a.name in names and a.op == "call_function":
                node.replace_input_with(a, make(by_name[a.name], node))
    drop_dead(gm, info, keep_impure=True)
    rewritten = replace(program.with_pass_result(gm, info), kernels=None, refusals=())
    return rewritten, [c.name for c in clones.values() if c.name in info]


def _layer_records(g: _Graph, choice: dict, tallies: dict) -> tuple[RematLayer, ...]:
    out = []
    m0 = g.program.batch_size
    for layer in g.layers:
        p = choice[layer]
        t, base = tallies[p], tallies["none"]
        kept = t.at("kept_bytes", layer, m0)
        out.append(RematLayer(
            layer=layer, policy=p, kept=tuple(t.kept.get(layer, ())),
            recomputed=tuple(sorted(t.recomputed.get(layer, ()))) if p != "none" else (),
            kept_bytes=kept, recomputed_bytes=t.at("work", layer, m0) if p != "none" else 0,
            saved_bytes=base.at("kept_bytes", layer, m0) - kept,
            extra_flops=t.at("flops", layer, m0) if p != "none" else 0))
    return tuple(out)


def layer_terms(program: Program, precision: Precision):
    """The remat analysis of ``program``: (graph, per-policy tallies, per-policy LayerTerms).
    Layers whose backward reads nothing of their forward (frozen, no gradient through them) are
    left out."""
    g = _analyse(program, precision.bytes)
    scaling = BatchScaling(program)
    tallies = {p: _tally(g, _split(g, {layer: p for layer in g.layers}), scaling) for p in LEVELS}
    m0 = program.batch_size
    g.layers = [layer for layer in g.layers
                if tallies["none"].at("kept_bytes", layer, m0) or tallies["full"].at("flops", layer, m0)]
    terms = {p: {layer: LayerTerm(t.kept_bytes.get(layer, ZERO), t.work.get(layer, ZERO), t.flops.get(layer, ZERO))
                 for layer in g.layers} for p, t in tallies.items()}
    return g, tallies, terms


def _readers_by_policy(g: _Graph) -> dict:
    """policy -> (kept value -> its backward readers), each policy on every layer."""
    return {p: kept_readers(g, {layer: p for layer in g.layers}) for p in LEVELS}


def workload(program: Program, target: Target, precision: Precision, batch_size: int, tokens_per_sample: int,
             fuse: Fuse, world_size: int = 1, zero: int = 0):
    """The memory planner's view of ``program`` (fused, before recomputation) on ``target``
    (on a resident GPU target, beside the model states of one of ``world_size`` ranks). ``fuse``:
    the fusion pass (the pipeline's), to see the kernels a rewrite would get."""
    g, tallies, terms = layer_terms(program, precision)
    resident = resident_bytes(program, precision, target, world_size, zero)
    w = build_workload(program, terms, list(g.layers), _readers_by_policy(g), target, precision, batch_size,
                       tokens_per_sample, resident)
    w.fused_work = _fused_work_of(program, g, precision, fuse)
    return w, (g, tallies)


def _fused_work_of(program: Program, g: _Graph, precision: Precision, fuse: Fuse):
    """policy -> layer -> the largest working set of the layer's backward kernels that hold its
    recomputed values, with every layer under that policy: fusion merges a recomputed value
    into the backward kernel that reads it, and that kernel can be larger than any before (a
    recomputed softmax with its backward reads the scores and their gradient). Computed the
    first time the planner asks for a policy (one rewrite and fusion of the program)."""
    cache: dict[str, dict] = {}

    def of(policy: str) -> dict:
        if policy not in cache:
            rewritten, clones = _rewrite(program, _split(g, {layer: policy for layer in g.layers}).recompute)
            fused, _ = fuse(rewritten)
            scaling = BatchScaling(fused)
            nodes = {n.name: n for n in fused.gm.graph.nodes}
            made = set(clones)
            out: dict[str, Affine] = {}
            m0 = fused.batch_size
            for k in fused.kernels or ():
                if not any(n in made for n in k.nodes):
                    continue
                layer = fused.info[k.nodes[-1]].layer
                io = scaling.kernel_io(k, nodes, precision.bytes)
                if layer not in out or io.at(m0) > out[layer].at(m0):
                    out[layer] = io
            cache[policy] = out
        return cache[policy]

    return of


def plan_remat(program: Program, policy: str, target: Optional[Target], precision: Precision, fuse: Fuse,
               batch_size: Optional[int] = None, tokens_per_sample: int = 1, world_size: int = 1, zero: int = 0):
    """The per-layer choice for ``policy`` (with a target, the memory planner's, with its pieces
    and offload), the memory arithmetic, and the memory plan (None without a target)."""
    mplan = None
    if target is not None:
        w, (g, tallies) = workload(program, target, precision, batch_size or program.batch_size, tokens_per_sample,
                                   fuse, world_size, zero)
        plan = choose(w, program.batch_size, policy)
        choice = dict(plan.policy)
        mplan = memory_plan(plan, w)
    else:
        g, tallies, _ = layer_terms(program, precision)
        choice = {layer: ("none" if policy == "auto" else policy) for layer in g.layers}
    fixed = _fixed(g, tallies, target, precision)
    peak, kept, work = _estimate(choice, tallies, fixed, program.batch_size)
    plan_r = RematPlan(policy=policy, layers=_layer_records(g, choice, tallies), clones=(),
                       kept_bytes=kept, layer_work_bytes=work, attention_scores_bytes=fixed.scores,
                       kernel_work_bytes=fixed.kernel_work, weight_buffer_bytes=fixed.buffers,
                       estimated_peak_bytes=mplan.estimated_peak_bytes if mplan else peak,
                       memory_bytes=fixed.memory)
    return g, choice, plan_r, mplan


def make_remat(policy: str, target: Optional[Target], precision: Precision, fuse: Fuse,
               batch_size: Optional[int] = None, tokens_per_sample: int = 1, world_size: int = 1, zero: int = 0):
    """The remat pass for ``policy``: per layer, the forward values the backward keeps or
    recomputes, the recomputed ops cloned into the backward (in no kernel: fuse again after it).
    ``fuse``: the fusion pass, which the memory planner runs on candidate rewrites."""
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {', '.join(POLICIES)}, got {policy!r}")

    def remat(program: Program) -> tuple[Program, dict]:
        if program.mode != "train":
            return program, {"policy": "none (no backward)"}
        g, choice, plan, mplan = plan_remat(program, policy, target, precision, fuse, batch_size, tokens_per_sample,
                                            world_size, zero)
        clones: list[str] = []
        if any(p != "none" for p in choice.values()):
            split = _split(g, choice)
            program, clones = _rewrite(program, split.recompute)
        plan = replace(plan, clones=tuple(clones))
        counts = {p: sum(1 for c in choice.values() if c == p) for p in LEVELS}
        notes = {
            "policy": policy, "layers": {p: n for p, n in counts.items() if n},
            "recomputed_ops": len(clones), "extra_flops": plan.extra_flops,
            "kept_activation_bytes": plan.kept_bytes, "estimated_peak_bytes": plan.estimated_peak_bytes,
        }
        if mplan is not None:
            notes.update({"pieces": mplan.pieces, "piece_samples": mplan.piece_samples,
                          "offloaded_layers": len(mplan.offloaded), "mechanisms": list(mplan.mechanisms)})
        return replace(program, remat=plan, memory=mplan), notes
    return remat


def crossing_values(program: Program) -> dict[str, set[str]]:
    """Per layer: the forward values (their storage) that backward ops read in ``program``,
    which after this pass must be exactly the kept set the plan names."""
    g = _analyse(program, 4)
    out: dict[str, set[str]] = {}
    for node in program.ops():
        if g.phase(node) != Phase.BACKWARD:
            continue
        for a in node.all_input_nodes:
            s = _storage(g, a) if a.op == "call_function" and g.phase(a) == Phase.FORWARD else None
            if s is not None:
                out.setdefault(g.layer(s), set()).add(s.name)
    return out


def verify_plan(program: Program, after: str) -> None:
    """Recomputed ops run in the backward; what crosses the forward/backward boundary of each
    layer is exactly the kept set the remat plan names (the pipeline checks it after each stage
    that carries a plan; passes/verify.py checks what every stage must hold)."""
    for name in program.remat.clones:
        if name not in program.info or program.info[name].phase.value != "backward":
            raise VerificationError(f"after {after}: recomputed op {name} is not in the backward")
    crossing = crossing_values(program)
    for layer in program.remat.layers:
        got, want = crossing.get(layer.layer, set()), set(layer.kept)
        if got != want:
            extra, missing = sorted(got - want)[:3], sorted(want - got)[:3]
            raise VerificationError(f"after {after}: {layer.layer} ({layer.policy}): the backward reads "
                                    f"{extra} not in the kept set, and not {missing}")
