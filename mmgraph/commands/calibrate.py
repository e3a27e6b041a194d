"""``mmgraph calibrate``: measure this machine and write the ``host`` target.

Measured with PyTorch on the CPU (or a GPU with ``--device cuda``), median of repeats:
- matmul FLOP/s per dtype (square matmuls of ``--size``), taken as the peak, and the share of it
  that smaller square matmuls reach;
- memory bandwidth (a large out-of-place add: two reads and one write), and the cache's
  bandwidth with the largest traffic that keeps most of it;
- fused attention's share of the peak at generic shapes, and the rate of ``exp`` (elements/s);
- per-op overhead and the share of the roofline ops reach inside a step (``op_efficiency``):
  two generic transformer-encoder training steps (``torch.nn.TransformerEncoder``, one of tiny
  ops, one of larger ones) traced to ATen (forward + backward) and run from their generated code
  the way the runtime's reference executor runs a program; ``time = roofline / op_efficiency +
  ops x overhead`` solved for the two unknowns from the two steps;
- the optimizer: the runtime's own AdamW with gradient clipping, over 16 tensors of 256K elements
  and over 256 of 1K: the update rate and the cost per gradient tensor.
The host runs ATen op by op with weights in memory: ``granularity: op``, no streaming.

A fit is accepted only when plausible (overhead positive and below 1 ms per op, op_efficiency
strictly between 0.01 and 1, optimizer rates positive); otherwise it is measured again, up to
``ATTEMPTS`` times in all, and then ``calibrate`` refuses (exit 2) and writes nothing.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from mmgraph.core.config.optim import OptimizerConfig
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target, user_target_dir
from mmgraph.passes.cost import node_time
from mmgraph.runtime.optim import Optimizer


def _median_time(fn, repeats: int, sync=lambda: None, min_seconds: float = 0.2) -> float:
    """Median seconds of ``fn`` after a warm-up call: at least ``repeats`` calls, and more
    (up to 2,000) until ``min_seconds`` have been spent, so short ops are not judged on a few
    noisy samples."""
    fn()
    sync()
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < 2000):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(device: str = "cpu", size: int = 1024, repeats: int = 7) -> dict:
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    def matmul_rate(n: int, dtype) -> float:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return 2 * n**3 / _median_time(lambda: a @ b, repeats, sync)

    flops = {name: matmul_rate(size, dtype) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    # Efficiency curve (fp32): the share of the peak that smaller square matmuls reach.
    curve = []
    for n in (32, 64, 128, 256, 512):
        if n < size:
            curve.append([float(2 * n**3), min(1.0, matmul_rate(n, torch.float32) / flops["fp32"])])
    curve.append([float(2 * size**3), 1.0])
    attention = _attention_curve(device, repeats, sync, flops["fp32"])
    z = torch.randn(256 * 1024, device=device)
    transcendental = z.numel() / _median_time(lambda: torch.exp(z), repeats, sync)
    def add_bandwidth(n: int) -> float:
        x, y = torch.randn(n, device=device), torch.randn(n, device=device)
        return 3 * 4 * n / _median_time(lambda: x + y, repeats, sync)

    bandwidth = add_bandwidth(32 * 1024 * 1024)            # 384 MB moved: main memory
    # Cache: the bandwidth at 3 MB moved, and the largest traffic that keeps 70% of it.
    cache_bw = add_bandwidth(256 * 1024)
    cache_bytes = 0.0
    for mb in (3, 6, 12, 24, 48):
        if add_bandwidth(mb * 1024 * 1024 // 12) >= 0.7 * cache_bw:
            cache_bytes = mb * 1e6
    if cache_bw < 1.5 * bandwidth:
        cache_bytes, cache_bw = 0.0, bandwidth
    m = {"peak_flops": flops, "matmul_efficiency": curve, "attention_efficiency": attention,
         "transcendental_rate": transcendental, "bandwidth": bandwidth, "cache_bandwidth": cache_bw,
         "cache_bytes": cache_bytes, "overhead": 0.0, "op_efficiency": 1.0, "update_rate": 1.0}
    m["overhead"], m["op_efficiency"] = _step_figures(Target.model_validate(host_target(m, device)), device,
                                                      repeats, sync)
    m["update_rate"], m["tensor_overhead"] = _optimizer_figures(device, repeats, sync)
    return m


def _attention_curve(device: str, repeats: int, sync, peak: float) -> list:
    """Share of the fp32 peak reached by fused attention (forward) at generic shapes."""
    import torch.nn.functional as F

    curve = []
    for b, h, s, d in ((8, 4, 64, 16), (8, 4, 128, 32), (8, 8, 256, 64), (4, 16, 512, 64)):
        q, k, v = (torch.randn(b, h, s, d, device=device) for _ in range(3))
        mask = torch.zeros(s, s, device=device)
        fl = 4 * b * h * s * s * d
        rate = fl / _median_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), repeats, sync)
        curve.append([float(fl), min(1.0, rate / peak)])
    return curve


def _generic_step(device: str, width: int, seq: int, batch: int, layers: int):
    """A generic transformer encoder's training step (forward, a mean-square loss, backward)
    traced to ATen ops under fake tensors: the graph and real inputs to run it on."""
    from torch.fx.experimental.proxy_tensor import make_fx

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
    net = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False).to(device)
    names = [k for k, _ in net.named_parameters()]
    weights = [p.detach() for p in net.parameters()]
    x = torch.randn(batch, seq, width, device=device)

    def step(x, *ws):
        out = torch.func.functional_call(net, dict(zip(names, ws)), (x,))
        loss = out.square().mean()
        return (loss, *torch.autograd.grad(loss, ws))
    gm = make_fx(step, tracing_mode="fake")(x, *[w.clone().requires_grad_() for w in weights])
    return gm, [x, *weights]


# A fit outside these bounds is degenerate (a busy machine, a noisy minute), not a figure.
OVERHEAD_RANGE = (1e-8, 1e-3)          # seconds per op
EFFICIENCY_RANGE = (0.01, 0.999)       # op_efficiency, exclusive: 1.0 means faster than the roofline
ATTEMPTS = 3                           # measurements before calibrate refuses


class DegenerateFit(ValueError):
    """The measurements admit no plausible solution; the message says which figure and why."""


def fit_steps(rows: list[tuple[float, int, float]]) -> tuple[float, float]:
    """Per-op overhead (s) and ``op_efficiency`` from two steps' ``(roofline s, ops, measured s)``:
    each step's time is ``roofline / op_efficiency + ops x overhead``. Raises DegenerateFit when
    the solution is not plausible (overhead not positive or implausibly large, efficiency at or
    past a bound: the steps ran faster than their roofline, or the timings contradict each other)."""
    (r_a, n_a, t_a), (r_b, n_b, t_b) = rows
    det = n_a * r_b - n_b * r_a
    if not det or not all(math.isfinite(v) and v > 0 for v in (r_a, r_b, t_a, t_b)):
        raise DegenerateFit(f"the two steps give no solution (rows {rows})")
    overhead = (t_a * r_b - t_b * r_a) / det
    inverse = (t_a - n_a * overhead) / r_a
    efficiency = 1.0 / inverse if inverse > 0 else math.inf
    if not OVERHEAD_RANGE[0] < overhead < OVERHEAD_RANGE[1]:
        raise DegenerateFit(f"per-op overhead {overhead:.3g} s is outside "
                            f"{OVERHEAD_RANGE[0]:g}..{OVERHEAD_RANGE[1]:g} s")
    if not EFFICIENCY_RANGE[0] < efficiency < EFFICIENCY_RANGE[1]:
        raise DegenerateFit(f"op_efficiency {efficiency:.3g} is not strictly between {EFFICIENCY_RANGE[0]:g} and "
                            f"{EFFICIENCY_RANGE[1]:g}")
    return overhead, efficiency


def fit_optimizer(t1: float, t2: float) -> tuple[float, float]:
    """AdamW's elements per second and seconds per gradient tensor from 16 tensors of 256K elements
    (``t1``) and 256 of 1K (``t2``): both ``elements / rate + tensors x per-tensor``. Raises
    DegenerateFit unless both are positive."""
    (a1, b1), (a2, b2) = (16 * 256 * 1024, 16), (256 * 1024, 256)     # (elements, tensors)
    det = a1 * b2 - a2 * b1
    per_element, per_tensor = (t1 * b2 - t2 * b1) / det, (a1 * t2 - a2 * t1) / det
    if not (per_element > 0 and per_tensor > 0 and math.isfinite(per_element + per_tensor)):
        raise DegenerateFit(f"optimizer: {per_element:.3g} s per element, {per_tensor:.3g} s per tensor "
                            "(both must be positive)")
    return 1.0 / per_element, per_tensor


def fit_with_retries(measure_once: Callable[[], object], fit: Callable[[object], tuple], what: str,
                     attempts: int = ATTEMPTS) -> tuple:
    """``fit(measure_once())``, measured again (up to ``attempts`` times in all) while the fit is
    degenerate; then a UserError naming the last reason: nothing is written from a bad fit."""
    reasons = []
    for _ in range(attempts):
        try:
            return fit(measure_once())
        except DegenerateFit as err:
            reasons.append(str(err))
    raise UserError(Problem(None, what, f"no plausible fit in {attempts} measurements ({'; '.join(reasons)}); "
                            "the machine was probably busy: nothing written, run `mmgraph calibrate` again "
                            "when it is idle"))


def _step_figures(partial: Target, device: str, repeats: int, sync) -> tuple[float, float]:
    """Per-op overhead (s) and ``op_efficiency``, from two generic steps run as the runtime runs a
    program (generated code, ATen ops, no autograd): each step's time is ``roofline /
    op_efficiency + ops x overhead``, the roofline summed over its ops with the figures measured
    so far (``partial``: no overhead, efficiency 1). Re-measured while the fit is degenerate."""

    steps = []
    for shape in ((32, 32, 4, 4), (128, 128, 8, 2)):          # tiny ops; larger ops
        gm, inputs = _generic_step(device, *shape)
        ops = [n for n in gm.graph.nodes if n.op == "call_function"]
        steps.append((gm, inputs, sum(node_time(n, partial, Precision("fp32")) for n in ops), len(ops)))

    def measure_once():
        with torch.no_grad():
            return [(roofline, n, _median_time(lambda gm=gm, x=inputs: gm(*x), repeats, sync, min_seconds=1.0))
                    for gm, inputs, roofline, n in steps]
    return fit_with_retries(measure_once, fit_steps, "calibrate: per-op overhead and op_efficiency")


def _optimizer_figures(device: str, repeats: int, sync) -> tuple[float, float]:
    """The runtime's AdamW with clipping by global norm: elements per second and seconds per
    gradient tensor (``fit_optimizer``), re-measured while the fit is degenerate."""

    cfg = OptimizerConfig(optimizer_type="AdamW", learning_rate=1e-4, weight_decay=0.01, max_gradient_norm=1.0)

    def seconds(n: int, count: int) -> float:
        params = {f"w{i}": torch.randn(n, device=device) for i in range(count)}
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        opt = Optimizer(cfg, params)
        return _median_time(lambda: (opt.clip(grads), opt.step(grads)), repeats, sync)

    return fit_with_retries(lambda: (seconds(256 * 1024, 16), seconds(1024, 256)), lambda t: fit_optimizer(*t),
                            "calibrate: optimizer update rate")


def host_target(m: dict, device: str = "cpu") -> dict:
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if device.startswith("cuda"):
        total_memory = torch.cuda.get_device_properties(0).total_memory
    when = datetime.date.today().isoformat()
    return {
        "name": "host",
        "kind": "host",
        "description": f"this machine ({platform.machine()}, {os.cpu_count()} CPUs, {device}), measured {when}",
        "compute": {
            "cores": os.cpu_count() or 1,
            "peak_flops": {k: float(f"{v:.4g}") for k, v in m["peak_flops"].items()},
            "efficiency": 1.0,
            "matmul_efficiency": [[f, float(f"{e:.3g}")] for f, e in m["matmul_efficiency"]],
            "attention_efficiency": [[f, float(f"{e:.3g}")] for f, e in m["attention_efficiency"]],
            "transcendental_rate": float(f"{m['transcendental_rate']:.4g}"),
            "kernel_overhead_s": float(f"{m['overhead']:.4g}"),
            "op_efficiency": float(f"{m.get('op_efficiency', 1.0):.3g}"),
            "granularity": "op",
        },
        "memory": {"bytes": float(total_memory), "bandwidth": float(f"{m['bandwidth']:.4g}"),
                   "cache_bytes": m["cache_bytes"], "cache_bandwidth": float(f"{m['cache_bandwidth']:.4g}"),
                   "weight_buffer_share": 0.25},
        "stream": {"enabled": False, "bandwidth": float(f"{m['bandwidth']:.4g}"), "weight_share": 1.0,
                   "latency_s": 0.0},
        "external_memory": {"bytes": float(total_memory),
                            "optimizer_update_rate": float(f"{m['update_rate']:.4g}"),
                            "optimizer_tensor_overhead_s": float(f"{m.get('tensor_overhead', 0.0):.4g}")},
        "sources": [f"measured by mmgraph calibrate on {when} with torch {torch.__version__}"],
        "assumptions": [
            "peak FLOP/s = measured square-matmul rate per dtype; smaller matmuls reach the share of it "
            "measured on smaller square matmuls (matmul_efficiency, interpolated in log FLOPs)",
            "memory bandwidth from a large out-of-place add (2 reads + 1 write); cache bandwidth from the "
            "same add moving 3 MB, applied to ops that move at most cache_bytes",
            "fused attention reaches the share of peak measured on generic masked attention shapes "
            "(attention_efficiency); exp/log/sigmoid-class ops run at most at the measured exp rate",
            "every op pays the per-op overhead and reaches op_efficiency of its roofline, both fitted on two "
            "generic transformer-encoder training steps run as the runtime runs programs; views cost only "
            "the overhead",
            "weights stay in memory (no streaming); the optimizer (the runtime's, clipping included) runs "
            "after the backward: elements / update rate + gradient tensors x optimizer_tensor_overhead_s",
        ],
    }


def check_figures(m: dict) -> None:
    """The fitted figures ``measure`` returns, checked once more before anything is written."""
    problems = []
    if not OVERHEAD_RANGE[0] < m.get("overhead", 0.0) < OVERHEAD_RANGE[1]:
        problems.append(f"per-op overhead {m.get('overhead')!r} s is outside "
                        f"{OVERHEAD_RANGE[0]:g}..{OVERHEAD_RANGE[1]:g} s")
    if not EFFICIENCY_RANGE[0] < m.get("op_efficiency", 1.0) < EFFICIENCY_RANGE[1]:
        problems.append(f"op_efficiency {m.get('op_efficiency')!r} is not strictly between {EFFICIENCY_RANGE[0]:g} "
                        f"and {EFFICIENCY_RANGE[1]:g}")
    if not (m.get("update_rate", 0.0) > 0 and m.get("tensor_overhead", 0.0) > 0):
        problems.append("the optimizer's update rate and per-tensor cost must be positive")
    if problems:
        raise UserError(Problem(None, "calibrate", f"degenerate fit ({'; '.join(problems)}): nothing written, "
                                "run `mmgraph calibrate` again when the machine is idle"))


def run_calibrate(output: str | None, device: str, size: int) -> int:
    m = measure(device, size)
    check_figures(m)
    data = host_target(m, device)
    Target.model_validate(data)
    path = Path(output) if output else user_target_dir() / "host.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text("# Written by `mmgraph calibrate`: measured on this machine.\n" + yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    pf = data["compute"]["peak_flops"]
    print(f"matmul: fp32 {pf['fp32'] / 1e9:,.1f} GFLOP/s, bf16 {pf['bf16'] / 1e9:,.1f}, fp16 {pf['fp16'] / 1e9:,.1f}; "
          f"memory {data['memory']['bandwidth'] / 1e9:,.1f} GB/s (cache {data['memory']['cache_bandwidth'] / 1e9:,.1f} GB/s "
          f"up to {data['memory']['cache_bytes'] / 1e6:,.0f} MB); overhead {data['compute']['kernel_overhead_s'] * 1e6:.1f} us/op, "
          f"op efficiency {data['compute']['op_efficiency']:.2f}; AdamW {data['external_memory']['optimizer_update_rate'] / 1e6:,.0f} "
          f"M params/s + {data['external_memory']['optimizer_tensor_overhead_s'] * 1e6:.0f} us/tensor")
    print(f"wrote {path} (use --target host)")
    return 0
