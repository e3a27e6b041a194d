"""fusion: group ops into kernels the way dataflow compilers do (TVM FuseOps op classes).

Op classes (from the op registry, ``mmgraph.core.ops``): ``view`` and ``elementwise`` ops fuse into their producer's kernel; a
``reduction`` (sum, mean, softmax, norms, loss) becomes one kernel with its elementwise
prologue, and several reductions over the same rows share it (softmax, RMSNorm); a
``matmul`` starts a kernel and takes its elementwise epilogue; ``attention`` and ``opaque``
ops (scatter, gather, embedding) are kernels of their own.

Legality (phase, layer, cycles) is decided apart from policy (the class rules); every refused
fusion is recorded with a reason a person can read. The graph is unchanged: the pass
annotates the Program with kernels.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Optional

import torch.fx as fx

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import Contract, Kernel, Program
from mmgraph.core.opcost import node_val
from mmgraph.core.ops import op_class

CONTRACT = Contract(provides=("kernels",), invalidates=("segments", "schedule"))   # grouping only: the remat plan stands



def _is_cast(node: fx.Node) -> bool:
    return getattr(node.target, "__name__", "").split(".")[0] == "_to_copy"


@dataclass
class _Group:
    id: int
    kind: str              # elementwise | reduction | matmul | attention | opaque
    layer: str
    phase: str
    nodes: list
    rows: Optional[tuple] = None   # input shape of the first reduction (softmax/norm rows)


def _policy(group: _Group, cls: str, node: fx.Node) -> Optional[str]:
    """Whether joining is profitable under the op-class rules; a reason when not."""
    if group.kind in ("attention", "opaque") and cls != "view":
        return f"a {group.kind} kernel takes no {cls} epilogue"
    if cls == "elementwise" and group.kind == "matmul" and node.users and all(
            op_class(u) == "reduction" for u in node.users):
        return "kept as the prologue of the reduction that consumes it"
    if cls in ("view", "elementwise"):
        return None
    if cls == "matmul":
        return "a matmul starts its own kernel (no prologue fusion)"
    if cls in ("attention", "opaque"):
        return f"{cls} ops are kernels of their own"
    if cls == "reduction":
        if group.kind == "matmul":
            return "a reduction does not fuse into a matmul epilogue"
        rows = _in_shape(node)
        if group.kind == "reduction" and group.rows is not None and rows is not None and rows[:-1] != group.rows[:-1]:
            return f"reductions over different rows ({list(group.rows)} vs {list(rows)})"
    return None


def _in_shape(node: fx.Node) -> Optional[tuple]:
    for a in node.args:
        vals = node_val(a)
        if vals:
            return tuple(vals[0].shape)
    return None


def check_supported(program: Program, source: str | None = None) -> None:
    """Every op must have a class; otherwise name the op and the module it came from."""
    problems = []
    for node in program.ops():
        if op_class(node) == "unsupported":
            where = program.info[node.name].module or "the model's forward"
            problems.append(Problem(source, None, f"op {node.target} (node %{node.name}) in module "
                                    f"{where} is not supported by the fusion pass"))
    if problems:
        raise UserError(problems)


def fusion(program: Program) -> tuple[Program, dict]:
    check_supported(program)
    info = program.info
    group_of: dict[fx.Node, _Group] = {}
    deps: dict[int, int] = {}          # group id -> bitmask of groups it depends on (transitively)
    groups: list[_Group] = []
    refusals: list[tuple[str, str, str]] = []

    def new_group(node, cls):
        g = _Group(len(groups), cls if cls != "view" else "elementwise", info[node.name].layer,
                   info[node.name].phase.value, [node],
                   _in_shape(node) if cls == "reduction" else None)
        groups.append(g)
        deps[g.id] = 0
        return g

    # Views and casts of inputs (weights in a mixed-precision program arrive at the kernel already
    # at the target's precision) and constant sources: placed with their consumer.
    free: list[fx.Node] = []
    for node in program.ops():
        cls = op_class(node)
        me = info[node.name]
        producers = [a for a in node.all_input_nodes if a in group_of]
        if cls == "source" or (not producers and (cls == "view" or _is_cast(node))):
            free.append(node)
            continue
        in_masks = 0
        for a in producers:
            in_masks |= deps[group_of[a].id] | (1 << group_of[a].id)
        chosen = None
        for a in producers:
            g = group_of[a]
            if g is chosen:
                continue
            reason = None
            if g.phase != me.phase.value:
                reason = "crosses the forward/backward boundary"
            elif g.layer != me.layer:
                reason = f"crosses a layer boundary ({g.layer} -> {me.layer})"
            else:
                # Legal only if no other input depends on g through a node outside g (a cycle).
                others = [group_of[b] for b in producers if group_of[b] is not g]
                if any(deps[o.id] >> g.id & 1 for o in others):
                    reason = "would create a cycle through another kernel"
                else:
                    reason = _policy(g, cls, node)
            if reason is None:
                chosen = g
                break
            refusals.append((node.name, a.name, reason))
        if chosen is None:
            chosen = new_group(node, cls)
        else:
            chosen.nodes.append(node)
            if cls == "reduction" and chosen.kind == "elementwise":
                chosen.kind, chosen.rows = "reduction", _in_shape(node)
            elif cls == "matmul":
                chosen.kind = "matmul"
        group_of[node] = chosen
        deps[chosen.id] |= in_masks & ~(1 << chosen.id)

    position = {n: i for i, n in enumerate(program.gm.graph.nodes)}
    for node in reversed(free):   # consumers come later in the graph, so place them first
        users = sorted((u for u in node.users if u in group_of), key=position.__getitem__)
        g = group_of[users[0]] if users else new_group(node, "elementwise")
        g.nodes.insert(0, node)
        group_of[node] = g
    kernels = tuple(_kernel(g, program) for g in groups if g.nodes)
    kernels = tuple(replace(k, id=i) for i, k in enumerate(kernels))
    notes = {
        "kernels": len(kernels),
        "kernels_by_kind": dict(sorted(Counter(k.kind for k in kernels).items())),
        "refused": len(refusals),
        "refused_by_reason": dict(Counter(_reason_class(r) for _, _, r in refusals).most_common()),
        "intermediate_bytes_in_kernels": sum(k.internal_bytes for k in kernels),
    }
    return replace(program, kernels=kernels, refusals=tuple(refusals)), notes


def _reason_class(reason: str) -> str:
    return reason.split(" (")[0]


def _kernel(g: _Group, program: Program) -> Kernel:
    members = set(g.nodes)
    internal = 0
    for n in g.nodes:
        if n.users and all(u in members for u in n.users) and op_class(n) != "view":
            internal += sum(v.numel() * v.element_size() for v in node_val(n))
    return Kernel(id=g.id, kind=g.kind, layer=g.layer, phase=g.phase,
                  nodes=tuple(n.name for n in g.nodes),
                  flops=sum(program.info[n.name].flops for n in g.nodes), internal_bytes=internal)
