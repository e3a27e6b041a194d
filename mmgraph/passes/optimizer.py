"""The optimizer update in the program (``--optimizer_in_program``): one function holds the
forward, the backward and the update, as cstorch traces a training step.

The pass runs last, on the lowered program: the weights' gradients stop being outputs and feed
the update (mmgraph/core/update.py, traced once with make_fx and spliced in); the program takes
the optimizer state (kind ``state``, named ``WEIGHT::KEY`` as the runtime's optimizer names it)
and the step's scalars (kind ``scalar``: learning rate, Adam's bias correction and step size, inverse loss scale) as inputs, and
returns each trainable weight's new value (``param_update``, aliased to its weight input), the
new state (``state_update``), the global gradient norm and, for float16, whether the step was
finite. The update's ops are phase ``backward``, layer ``optimizer``, and name the weight they
update as their module (``NodeInfo.module``; one weight's ops are one run of the graph, so a
compiled executor can treat a repeated layer's update like its forward and backward).

The analyses before it (segments, schedule, memory) leave the update out on purpose: the cost
pass already places it where the target runs it, in MemoryX for weight streaming (its
``optimizer_update_rate``) and after the step on a host. On a target with an op set the spliced
ops are legalized like the rest.
"""

from __future__ import annotations

import re
from dataclasses import replace

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from mmgraph.core.ir import LOSS_SCALE, Contract, InputKind, InputSpec, Kernel, NodeInfo, OutputSpec, Phase, Program
from mmgraph.core.opcost import node_bytes, node_flops, node_val
from mmgraph.core.update import CORRECTION, INV_SCALE, LR, STEP_SIZE, UpdateRule, apply
from mmgraph.passes.util import copy_program

LAYER = "optimizer"
_SANITIZE = re.compile(r"[^0-9a-zA-Z_]")

CONTRACT = Contract(requires=("kernels",), provides=("kernels",))   # keeps the analyses: they leave the update out



def state_name(weight: str, key: str) -> str:
    return f"{weight}::{key}"


def make_optimizer_in_program(rule: UpdateRule, no_decay: frozenset, legalize=None, runs_on: str = "host"):
    """The pass; ``legalize``: the target's legalize pass, run again on the spliced program;
    ``runs_on``: where the target runs the update (in the notes; the cost pass costs it there)."""

    def optimizer(program: Program) -> tuple[Program, dict]:
        if program.mode != "train":
            return program, {"update": "none (no backward)"}
        if program.world_size > 1 or any(s.kind == InputKind.GRAD for s in program.inputs):
            raise ValueError("the optimizer in the program needs one rank and one micro-step per step")
        new = _splice(program, rule, no_decay)
        notes = {"rule": rule.kind, "runs_on": runs_on, "weights": sum(1 for o in new.outputs if o.kind == "param_update"),
                 "state_inputs": sum(1 for s in new.inputs if s.kind == InputKind.STATE)}
        if legalize is not None:
            new, more = legalize(new)
            notes["legalized"] = more.get("rewritten", 0)
        new = _update_kernel(new)
        return new, notes
    return optimizer


def _update_kernel(program: Program) -> Program:
    """The update's ops as one kernel of their own (layer ``optimizer``, in no segment: the
    target runs the update beside the step, in MemoryX on a wafer), so every op stays in
    exactly one kernel."""
    if program.kernels is None:
        return program
    owned = {n for k in program.kernels for n in k.nodes}
    ops = [n.name for n in program.ops() if n.name not in owned]
    if not ops:
        return program
    kernel = Kernel(max((k.id for k in program.kernels), default=-1) + 1, "elementwise", LAYER, Phase.BACKWARD.value,
                    tuple(ops), sum(program.info[n].flops for n in ops), 0)
    return replace(program, kernels=program.kernels + (kernel,))


def _splice(program: Program, rule: UpdateRule, no_decay: frozenset) -> Program:
    """The update traced once and copied in before the output; the gradients' outputs replaced
    by the new weights, state, norm (and ``finite``)."""
    gm, info = copy_program(program)
    outs = list(gm.graph.output_node().args[0])
    grads = [(o.target, n) for o, n in zip(program.outputs, outs) if o.kind == "grad"]
    keep = [(o, n) for o, n in zip(program.outputs, outs) if o.kind != "grad"]
    names = [w for w, _ in grads]
    scaled = any(s.name == LOSS_SCALE for s in program.inputs)
    weights, states, scalars, new_inputs = _add_inputs(gm.graph, info, program, names, rule, scaled)
    sub = _trace_update(rule, [w not in no_decay for w in names], weights, [n for _, n in grads], states, scalars)
    keys = rule.state_keys()
    owners = names + names + [w for w in names for _ in keys] + [LAYER] * len(scalars)
    results = _inline(gm.graph, info, sub, weights + [n for _, n in grads] + [st[k] for st in states for k in keys]
                      + scalars, owners)
    outputs = _update_outputs(names, rule.state_keys(), scaled)
    gm.graph.output_node().args = (tuple([v for _, v in keep] + results),)
    gm.graph.lint()
    gm.recompile()
    return replace(program.with_pass_result(gm, info, tuple(o for o, _ in keep) + outputs), inputs=tuple(new_inputs))


def _add_inputs(graph: fx.Graph, info: dict, program: Program, names: list[str], rule: UpdateRule, scaled: bool):
    """New placeholders after the last one: each weight's state, then the step's scalars.
    Returns (weight nodes, per weight its state nodes by key, scalar nodes, the new InputSpecs)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    weight_node = {s.name: p for p, s in zip(placeholders, program.inputs) if s.kind == InputKind.PARAM}
    spec_of = {s.name: s for s in program.inputs}
    new_inputs = list(program.inputs)
    last = placeholders[-1]
    fake_mode = node_val(weight_node[names[0]])[0].fake_mode if names else None

    def placeholder(name: str, kind: InputKind, shape, dtype, node_name: str) -> fx.Node:
        nonlocal last
        with graph.inserting_after(last):
            node = graph.placeholder(node_name)
        with fake_mode:                      # a value of the trace's own fake mode (the MLIR importer reads it)
            node.meta["val"] = torch.empty(shape, dtype=dtype)
        info[node.name] = NodeInfo(tuple(shape), dtype, "", "", Phase.FORWARD, 0, 0)
        new_inputs.append(InputSpec(name, kind, False, tuple(shape), dtype))
        last = node
        return node

    states = [{k: placeholder(state_name(w, k), InputKind.STATE, spec_of[w].shape, spec_of[w].dtype,
                              "s_" + _SANITIZE.sub("_", f"{w}_{k}")) for k in rule.state_keys()} for w in names]
    scalars = [placeholder(s, InputKind.SCALAR, (), torch.float32, s)
               for s in (LR, CORRECTION, STEP_SIZE) + ((INV_SCALE,) if scaled else ())]
    return [weight_node[w] for w in names], states, scalars, new_inputs


def _trace_update(rule: UpdateRule, decayed: list[bool], weights, grads, states, scalars) -> fx.GraphModule:
    """``core.update.apply`` traced on the program's own fake values (flat results: new
    weights, new state by weight then key, norm, finite)."""
    keys = rule.state_keys()
    names = (LR, CORRECTION, STEP_SIZE, INV_SCALE)[:len(scalars)]

    def update(ps, gs, ss, sc):
        new_p, new_s, norm, finite = apply(rule, ps, gs, [dict(zip(keys, s)) for s in ss], decayed,
                                           dict(zip(names, sc)))
        return (*new_p, *[st[k] for st in new_s for k in keys], norm) + ((finite,) if finite is not None else ())

    def val(node: fx.Node) -> torch.Tensor:
        return node_val(node)[0]

    with val(scalars[0]).fake_mode:
        return make_fx(update)([val(n) for n in weights], [val(n) for n in grads],
                               [[val(st[k]) for k in keys] for st in states], [val(n) for n in scalars])


def _inline(graph: fx.Graph, info: dict, sub: fx.GraphModule, sources: list[fx.Node], owners: list[str]) -> list:
    """Copy ``sub``'s ops in before the output, its inputs bound to ``sources``; the new ops are
    the update's (layer ``optimizer``, phase backward), each with the weight it updates as its
    module (``_owner``; ``optimizer`` for ops no one weight owns). Returns its results as
    program nodes."""
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env = dict(zip(placeholders, sources))
    owner = dict(zip(placeholders, owners))
    order = {n: i for i, n in enumerate(sub.graph.nodes)}
    with graph.inserting_before(graph.output_node()):
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            new = graph.node_copy(node, lambda n: env[n])
            env[node] = new
            owner[node] = _owner(node, owner, order)
            vals = node_val(new)
            info[new.name] = NodeInfo(tuple(vals[0].shape) if vals else (), vals[0].dtype if vals else None,
                                      owner[node], LAYER, Phase.BACKWARD, node_flops(new), node_bytes(new))
    return [env[a] if isinstance(a, fx.Node) else a for a in sub.graph.output_node().args[0]]


def _owner(node: fx.Node, owner: dict, order: dict) -> str:
    """The weight an update op belongs to: the weight whose value, gradient or state it reads;
    else the owner of its latest operand (the global norm's running sum: the gradient just
    added); ``optimizer`` when none (the ops after the norm, that every weight reads, go with
    the last weight's)."""
    args = node.all_input_nodes
    direct = {owner[a] for a in args if a.op == "placeholder" and owner.get(a, LAYER) != LAYER}
    if len(direct) == 1:
        return direct.pop()
    owned = [a for a in args if owner.get(a, LAYER) != LAYER]
    return owner[max(owned, key=order.__getitem__)] if owned else LAYER


def _update_outputs(names: list[str], keys: tuple[str, ...], scaled: bool) -> tuple[OutputSpec, ...]:
    """The specs of ``_trace_update``'s results, in its order."""
    return (tuple(OutputSpec("param_update", w) for w in names)
            + tuple(OutputSpec("state_update", state_name(w, k)) for w in names for k in keys)
            + (OutputSpec("grad_norm"),) + ((OutputSpec("finite"),) if scaled else ()))
