"""data_parallel: gradient reduction across ranks, compiled into the training program.

Given a world size, the pass groups the program's gradient outputs into buckets (by the order
the backward produces them, at most ``bucket_bytes`` each, one dtype per bucket) and inserts, for
each bucket, torch's traceable functional collectives as graph nodes:

    flat   = cat([reshape(g, [-1]) for g in bucket])       # right after the bucket's last gradient
    work   = _c10d_functional.all_reduce(flat, "sum", G)  # issued at once: overlaps the backward
    ...                                                   # the rest of the backward
    red    = _c10d_functional.wait_tensor(work)            # waited as late as possible
    g_i    = view(split_with_sizes(red)[i], shape_i)       # the program's outputs

Each gradient is first multiplied by the ``grad_weight`` input, the micro-batch's share of the
global batch's loss (its supervised tokens over the global batch's with ``num_tokens`` loss
scaling), so the reduced sums are exactly the global batch's gradients and N ranks train like
one. ZeRO-1 (optimizer state sharded across ranks) needs nothing more of
the program: the runtime's optimizer updates what a rank owns and broadcasts it. ZeRO-2
(``shard_gradients``) reduce-scatters each bucket instead (padded to a multiple of the world
size): the program outputs, per bucket, this rank's shard of the summed flat bucket
(``grad_shard`` outputs), and never holds the whole reduced gradient.

Gradient accumulation: micro-steps before the last run the plain program and communicate
nothing; the last runs the ``accumulate`` variant, whose extra inputs (kind ``grad``) are the
weighted gradients summed so far: each is added to the new weighted gradient right where it is
made, and the bucket reduces the sum, once per step.

Compiling needs no process group: the group is a name (``group``), bound when the program runs.
The pass is a pure ``Program -> Program`` function; the new ops form ``collective`` kernels so the
kernel graph, the weight-streaming segments and the dumps show them.
"""

from __future__ import annotations

import contextlib
import operator
import re
from dataclasses import replace

import torch
import torch.fx as fx

from mmgraph.core.ir import GRAD_WEIGHT, Bucket, Contract, InputKind, InputSpec, Kernel, NodeInfo, OutputSpec, Phase, Program
from mmgraph.core.ops import addresses_group
from mmgraph.passes.util import copy_program

aten = torch.ops.aten
c10d = torch.ops._c10d_functional
ALL_REDUCE = c10d.all_reduce.default
REDUCE_SCATTER = c10d.reduce_scatter_tensor.default
WAIT = c10d.wait_tensor.default
DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024     # DDP's default bucket_cap_mb
WORLD = "0"                                 # the default group's name; the runtime rebinds it

CONTRACT = Contract(invalidates=("segments", "schedule"))   # keeps kernels when there are (collectives get their own)



@contextlib.contextmanager
def solo_group(program: Program):
    """Run ``program``'s collectives in a process group of one (this process) when none exists:
    for checking a data-parallel program's numerics without the ranks."""
    import torch.distributed as dist

    if program.world_size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        name = dist.group.WORLD.group_name
        for node in program.gm.graph.nodes:
            if addresses_group(node) and node.args[-1] != name:
                raise RuntimeError(f"collective {node.name} addresses group {node.args[-1]!r}, not {name!r}")
        yield
    finally:
        dist.destroy_process_group()


def plan_buckets(program: Program, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[list[int]]:
    """Output positions of the gradients, grouped: backward order, one dtype, at most
    ``bucket_bytes`` a bucket (a single larger gradient is a bucket of its own)."""
    order = {n: i for i, n in enumerate(program.gm.graph.nodes)}
    outs = list(program.gm.graph.output_node().args[0])
    grads = [i for i, s in enumerate(program.outputs) if s.kind == "grad"]
    grads.sort(key=lambda i: order[outs[i]])
    buckets: list[list[int]] = []
    open_: dict[torch.dtype, tuple[list[int], int]] = {}
    for i in grads:
        val = outs[i].meta["val"]
        size = val.numel() * val.element_size()
        members, held = open_.get(val.dtype, ([], 0))
        if members and held + size > bucket_bytes:
            buckets.append(members)
            members, held = [], 0
        open_[val.dtype] = (members + [i], held + size)
    buckets += [members for members, _ in open_.values() if members]
    buckets.sort(key=lambda b: max(order[outs[i]] for i in b))     # issue order
    return buckets


def make_data_parallel(world_size: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES, group: str = WORLD,
                       accumulate: bool = False, shard_gradients: bool = False):
    """The pass for ``world_size`` ranks; ``accumulate``: the last micro-step's variant, taking the
    gradients accumulated so far as inputs; ``shard_gradients``: ZeRO-2 (reduce-scatter)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")

    def data_parallel(program: Program) -> tuple[Program, dict]:
        if program.mode != "train" or world_size == 1:
            return program, {"world_size": world_size, "buckets": 0, "note": "nothing to reduce"}
        gm, info = copy_program(program)
        specs, adds = _weigh_gradients(gm, info, program, accumulate)
        inputs = program.inputs + specs
        plan = plan_buckets(replace(program, gm=gm), bucket_bytes)
        rewriter = _Rewriter(gm, info, program, world_size, group, shard_gradients)
        for node in adds:                              # each weighting / addition a kernel of its layer
            rewriter.kernels.append(Kernel(rewriter.next_kernel, "elementwise", info[node.name].layer,
                                           Phase.BACKWARD.value, (node.name,), info[node.name].flops, 0))
            rewriter.next_kernel += 1
        buckets = [rewriter.bucket(k, members) for k, members in enumerate(plan)]
        outputs = rewriter.shard_outputs(buckets) if shard_gradients else program.outputs
        gm.graph.lint()
        gm.recompile()
        kernels = (program.kernels or ()) + tuple(rewriter.kernels)
        new = replace(program.with_pass_result(gm, info, outputs),
                      kernels=kernels if program.kernels is not None else None,
                      collectives=tuple(buckets), world_size=world_size, inputs=inputs)
        notes = {"world_size": world_size, "buckets": len(buckets), "accumulate": accumulate,
                 "collective": "reduce_scatter" if shard_gradients else "all_reduce",
                 "bucket_bytes": [b.bytes for b in buckets],
                 "reduced_bytes": sum(b.bytes for b in buckets)}
        return new, notes

    return data_parallel


def _weigh_gradients(gm: fx.GraphModule, info: dict[str, NodeInfo], program: Program,
                     accumulate: bool) -> tuple[tuple[InputSpec, ...], list[fx.Node]]:
    """Each gradient times the ``grad_weight`` input (this micro-batch's share of the global
    batch's loss) right where it is made, plus, with ``accumulate``, a ``grad`` input: the
    weighted gradients of this rank's earlier micro-batches."""
    graph = gm.graph
    first_op = next(n for n in graph.nodes if n.op != "placeholder")
    output = graph.output_node()
    outs = list(output.args[0])
    with graph.inserting_before(first_op):           # new inputs after the others, before any op
        weight = graph.placeholder(GRAD_WEIGHT)
    specs, made = [InputSpec(GRAD_WEIGHT, InputKind.SCALAR, False, (), torch.float32)], []
    grads = [i for i, spec in enumerate(program.outputs) if spec.kind == "grad"]
    first = outs[grads[0]].meta["val"] if grads else None
    with (first.fake_mode if hasattr(first, "fake_mode") else contextlib.nullcontext()):
        weight.meta["val"] = torch.empty((), dtype=torch.float32)
    info[weight.name] = NodeInfo((), torch.float32, "", "top", Phase.FORWARD, 0, 0)
    for i in grads:
        target = program.outputs[i].target
        grad = outs[i]
        val = grad.meta["val"]
        layer = info[grad.name].layer if grad.name in info else "top"
        total = _elementwise_after(graph, info, grad, aten.mul.Tensor, (grad, weight), layer, reads=1)
        made.append(total)
        if accumulate:
            with graph.inserting_before(first_op):
                acc = graph.placeholder("acc_" + re.sub(r"[^0-9a-zA-Z_]", "_", target))
            acc.meta["val"] = val
            info[acc.name] = NodeInfo(tuple(val.shape), val.dtype, "", layer, Phase.BACKWARD, 0, 0)
            total = _elementwise_after(graph, info, total, aten.add.Tensor, (total, acc), layer, reads=2)
            made.append(total)
            specs.append(InputSpec(target, InputKind.GRAD, False, tuple(val.shape), val.dtype))
        outs[i] = total
    output.args = (tuple(outs),)
    return tuple(specs), made


def _elementwise_after(graph: fx.Graph, info: dict[str, NodeInfo], after: fx.Node, target, args: tuple,
                       layer: str, reads: int) -> fx.Node:
    """``target(*args)`` right after ``after``, shaped like it: a backward elementwise op reading
    ``reads`` tensors of that shape and writing one."""
    val = after.meta["val"]
    with graph.inserting_after(after):
        node = graph.call_function(target, args)
    node.meta["val"] = val
    info[node.name] = NodeInfo(tuple(val.shape), val.dtype, "", layer, Phase.BACKWARD, val.numel(),
                               (reads + 1) * val.numel() * val.element_size())
    return node


class _Rewriter:
    """Inserts one bucket's flatten + collective after its last gradient, wait + split before
    the output."""

    def __init__(self, gm: fx.GraphModule, info: dict[str, NodeInfo], program: Program,
                 world_size: int, group: str, shard: bool = False):
        self.gm, self.info, self.program = gm, info, program
        self.world, self.group, self.shard = world_size, group, shard
        self.shards: list[fx.Node] = []
        self.graph = gm.graph
        self.output = self.graph.output_node()
        self.kernels: list[Kernel] = []
        self.next_kernel = 1 + max((k.id for k in program.kernels or ()), default=-1)

    def _add(self, target, args: tuple, val: torch.Tensor, layer: str, nbytes: int = 0) -> fx.Node:
        node = self.graph.call_function(target, args)
        node.meta["val"] = val
        self.info[node.name] = NodeInfo(tuple(val.shape), val.dtype, "", layer, Phase.BACKWARD, 0, nbytes)
        return node

    def _kernel(self, nodes: list[fx.Node], layer: str) -> None:
        self.kernels.append(Kernel(self.next_kernel, "collective", layer, Phase.BACKWARD.value,
                                   tuple(n.name for n in nodes), 0, 0))
        self.next_kernel += 1

    def bucket(self, index: int, members: list[int]) -> Bucket:
        outs = list(self.output.args[0])
        grads = [outs[i] for i in members]
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        last = max(grads, key=lambda n: order[n])
        layer = self.info[last.name].layer if last.name in self.info else "top"
        vals = [g.meta["val"] for g in grads]
        dtype = vals[0].dtype
        sizes = [v.numel() for v in vals]
        total = sum(sizes)
        fake = vals[0].fake_mode if hasattr(vals[0], "fake_mode") else None

        def empty(n: int) -> torch.Tensor:
            if fake is None:
                return torch.empty(n, dtype=dtype, device="meta")
            with fake:
                return torch.empty(n, dtype=dtype)

        issue: list[fx.Node] = []
        with self.graph.inserting_after(last):
            # reshape, not view: a gradient may be a transpose (copied once, as DDP copies into buckets)
            flat_parts = [self._add(aten.reshape.default, (g, [-1]), empty(v.numel()), layer) for g, v in zip(grads, vals)]
            issue += flat_parts
            flat = flat_parts[0]
            if len(flat_parts) > 1:
                flat = self._add(aten.cat.default, (flat_parts,), empty(total), layer)
                issue.append(flat)
            pad = (-total) % self.world if self.shard else 0
            if pad:
                flat = self._add(aten.constant_pad_nd.default, (flat, [0, pad]), empty(total + pad), layer)
                issue.append(flat)
            nbytes = (total + pad) * vals[0].element_size()
            if self.shard:
                coll = self._add(REDUCE_SCATTER, (flat, "sum", self.world, self.group),
                                 empty((total + pad) // self.world), layer, nbytes)
            else:
                coll = self._add(ALL_REDUCE, (flat, "sum", self.group), empty(total), layer, nbytes)
            issue.append(coll)
        # Re-order the issue nodes right after `last` (inserting_after places each after `last`).
        cursor = last
        for node in issue:
            cursor.append(node)
            cursor = node
        self._kernel(issue, layer)
        with self.graph.inserting_before(self.output):
            done = self._add(WAIT, (coll,), coll.meta["val"], "data_parallel")
            waited = [done]
            new_outs = [] if self.shard else self._split(done, vals, sizes, waited)
        self._kernel(waited + new_outs, "data_parallel")
        self.shards.append(done)
        for i, node in zip(members, new_outs):
            outs[i] = node
        self.output.args = (tuple(outs),)
        return Bucket(index, tuple(members), tuple(self.program.outputs[i].target for i in members), dtype,
                      total + pad, nbytes, last.name, coll.name, tuple(tuple(v.shape) for v in vals))

    def shard_outputs(self, buckets: list[Bucket]) -> tuple[OutputSpec, ...]:
        """ZeRO-2: the gradient outputs replaced by one ``grad_shard`` output per bucket."""
        outs = list(self.output.args[0])
        keep = [i for i, spec in enumerate(self.program.outputs) if spec.kind != "grad"]
        self.output.args = (tuple(outs[i] for i in keep) + tuple(self.shards),)
        return (tuple(self.program.outputs[i] for i in keep)
                + tuple(OutputSpec("grad_shard", f"bucket{b.index}") for b in buckets))

    def _split(self, done: fx.Node, vals: list, sizes: list[int], waited: list[fx.Node]) -> list[fx.Node]:
        if len(vals) == 1:
            node = self._add(aten.view.default, (done, list(vals[0].shape)), vals[0], "data_parallel")
            return [node]
        parts = self._add(aten.split_with_sizes.default, (done, sizes), done.meta["val"], "data_parallel")
        parts.meta["val"] = [torch.empty_like(v).view(-1) for v in vals]
        waited.append(parts)
        out = []
        for k, v in enumerate(vals):
            item = self._add(operator.getitem, (parts, k), parts.meta["val"][k], "data_parallel")
            node = self._add(aten.view.default, (item, list(v.shape)), v, "data_parallel")
            out += [node]
            waited.append(item)
        return out
