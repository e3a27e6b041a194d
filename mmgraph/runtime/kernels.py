"""Kernels the runtime picks for a program's ops where ATen's default is slow on this CPU.

GEMM. ATen's float32 ``mm`` and ``addmm`` call MKL's sgemm. On CPUs whose vendor MKL does not
dispatch its AVX-512 kernels for (the AMD EPYC machines this project runs on), sgemm reaches
about 180 GFLOP/s on 2 threads where oneDNN's JIT-compiled kernels (``mkldnn._linear_pointwise``,
the same float32 arithmetic, no reduced-precision accumulation) reach 220-430 GFLOP/s for the
shapes of a transformer's forward and backward (measured 2026-12-02); on an Intel Xeon MKL's
sgemm is the faster for every shape. The compiled executor rewrites its copy of a CPU program's
graph (``cpu_gemms``): each float32 GEMM stays ATen's ``mm``/``addmm`` or becomes
``mmgraph::gemm`` on oneDNN, whichever ran faster for that shape and layout on this machine,
timed once per process when the graph is rewritten (``auto``: an ATen GEMM stays the program's
own op, with no call of ours around it), or as ``MMGRAPH_CPU_GEMM`` says (``onednn``: every
one; ``aten``: none). The lowered program itself is not changed.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

from mmgraph.core.errors import Problem, UserError

ENV = "MMGRAPH_CPU_GEMM"
CHOICES = ("auto", "onednn", "aten")
aten = torch.ops.aten


def gemm_policy() -> str:
    """The CPU GEMM choice (``MMGRAPH_CPU_GEMM``; ``auto`` by default). oneDNN unavailable in
    this PyTorch build: ``aten`` whatever was asked (nothing else could run)."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise UserError(Problem(None, ENV, f"unknown CPU GEMM choice {value!r}; one of {', '.join(CHOICES)}"))
    if not onednn_available():
        return "aten"
    return value


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _aten(a, b, bias):
    return torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)


def _onednn(a, b, bias):
    return torch.ops.mkldnn._linear_pointwise(a, b.t(), bias, "none", [], "")


KERNELS = {"aten": _aten, "onednn": _onednn}
chosen: dict[tuple, str] = {}        # the auto choice per shape and layout, for this process


def _time(fn, args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def choose(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], timer=_time, rounds: int = 3) -> str:
    """The faster kernel for this GEMM's shapes and layouts, timed once per process on the
    operands given (read only: a kernel writes just its output), each kernel warmed once, then
    ``rounds`` interleaved calls, the best of each: oneDNN where it took under 0.9 of ATen's
    time (a near tie stays with ATen's)."""
    key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), bias is None, a.dtype)
    kernel = chosen.get(key)
    if kernel is None:
        args = (a, b, bias)
        for fn in KERNELS.values():
            fn(*args)
        times = dict.fromkeys(KERNELS, float("inf"))
        for _ in range(rounds):
            for name, fn in KERNELS.items():
                times[name] = min(times[name], timer(fn, args))
        kernel = chosen[key] = "onednn" if times["onednn"] < 0.9 * times["aten"] else "aten"
    return kernel


# The op is defined with torch.library's schema and per-backend kernel, not ``custom_op``: its
# call then costs about 7 us over the kernel's, against 26 us through custom_op's autograd and
# aliasing checks (measured 2026-12-02; a step calls it up to 104 times on the small config).
torch.library.define("mmgraph::gemm", "(Tensor a, Tensor b, Tensor? bias, str kernel) -> Tensor")


@torch.library.impl("mmgraph::gemm", "CPU")
def gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor], kernel: str) -> torch.Tensor:
    """``a @ b (+ bias)``, 2-D ``a`` and ``b``, 1-D ``bias``: by ``kernel`` (aten, onednn, or
    auto: ``choose``)."""
    if kernel == "auto":
        kernel = choose(a, b, bias)
    return KERNELS[kernel](a, b, bias)


@torch.library.register_fake("mmgraph::gemm")
def _(a, b, bias, kernel):
    return a.new_empty((a.shape[0], b.shape[1]))


def _operand(val: torch.Tensor) -> torch.Tensor:
    """A tensor with ``val``'s shape, strides and dtype (random values): what a GEMM is timed on
    before the graph runs."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(val.shape, val.stride()) if size > 0)
    return torch.randn(span, dtype=val.dtype).as_strided(tuple(val.shape), val.stride())


def _float32(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype == torch.float32


def cpu_gemms(gm: torch.fx.GraphModule, kernel: str) -> torch.fx.GraphModule:
    """``gm`` with each float32 ``mm`` and ``addmm`` (1-D bias, no scaling) that runs faster on
    oneDNN as ``mmgraph::gemm`` on oneDNN: with ``auto`` the ones ``choose`` times faster there
    (on operands of the node's shapes and strides), with ``onednn`` all; ``aten``: ``gm`` itself.
    A rewritten node keeps the op's node name (``region_of`` and the program's facts find it).
    A new graph module: the program's own graph is not touched."""
    if kernel == "aten":
        return gm
    graph = torch.fx.Graph()
    env: dict = {}
    for node in gm.graph.nodes:
        operands = None
        if node.target is aten.mm.default and _float32(node) and not node.kwargs:
            operands = (*node.args, None)
        elif (node.target is aten.addmm.default and _float32(node) and not node.kwargs and len(node.args) == 3
              and isinstance(node.args[0], torch.fx.Node) and _float32(node.args[0])
              and node.args[0].meta["val"].dim() == 1):
            operands = (node.args[1], node.args[2], node.args[0])
        if operands is not None and kernel == "auto":
            vals = [_operand(x.meta["val"]) if isinstance(x, torch.fx.Node) else x for x in operands]
            operands = operands if choose(*vals) == "onednn" else None
        if operands is None:
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        a, b, bias = (env[x] if isinstance(x, torch.fx.Node) else x for x in operands)
        new = graph.create_node("call_function", torch.ops.mmgraph.gemm.default, (a, b, bias, "onednn"), {},
                                name=node.name)                    # the program's facts stay its own
        new.meta = dict(node.meta)
        env[node] = new
    return torch.fx.GraphModule(gm, graph)
