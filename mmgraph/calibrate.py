"""``mmgraph calibrate``: measure this machine and write the ``host`` target.

Measured with PyTorch on the CPU (or a GPU with ``--device cuda``), median of repeats:
- matmul FLOP/s per dtype (square matmuls of ``--size``), taken as the peak, and the share of it
  that smaller square matmuls reach;
- memory bandwidth (a large out-of-place add: two reads and one write), and the cache's
  bandwidth with the largest traffic that keeps most of it;
- per-op overhead (a generic network of tiny Linear/GELU/LayerNorm blocks, forward and
  backward, divided by the ATen ops it dispatches);
- fused attention's share of the peak at generic shapes, and the rate of ``exp`` (elements/s);
- optimizer update rate (AdamW steps over a 4M-parameter tensor).
The host runs eager PyTorch op by op with weights in memory: ``granularity: op``, no streaming.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from mmgraph.target import Target, user_target_dir


def _median_time(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    times = []
    for _ in range(repeats):
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
    overhead = _op_overhead(device, repeats, sync)
    param = torch.nn.Parameter(torch.randn(4 * 1024 * 1024, device=device))
    param.grad = torch.randn_like(param)
    opt = torch.optim.AdamW([param], lr=1e-3)
    update_rate = param.numel() / _median_time(opt.step, repeats, sync)
    return {"peak_flops": flops, "matmul_efficiency": curve, "attention_efficiency": attention,
            "transcendental_rate": transcendental, "bandwidth": bandwidth, "cache_bandwidth": cache_bw, "cache_bytes": cache_bytes,
            "overhead": overhead, "update_rate": update_rate}


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


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _op_overhead(device: str, repeats: int, sync) -> float:
    """Seconds per ATen op of a training step whose ops are all tiny: a generic 40-block
    network (Linear, GELU, LayerNorm, residual) at width 8, forward + backward, timed and
    divided by the ops it dispatches."""
    torch.manual_seed(0)
    blocks = [torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU())
              for _ in range(40)]
    net = torch.nn.ModuleList(blocks).to(device)
    x = torch.randn(4, 8, device=device)

    def step():
        h = x
        for block in net:
            h = h + block(h)
        h.sum().backward()
    counter = _CountOps()
    with counter:
        step()
    return _median_time(step, repeats, sync) / counter.count


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
            "granularity": "op",
        },
        "memory": {"bytes": float(total_memory), "bandwidth": float(f"{m['bandwidth']:.4g}"),
                   "cache_bytes": m["cache_bytes"], "cache_bandwidth": float(f"{m['cache_bandwidth']:.4g}"),
                   "weight_buffer_share": 0.25},
        "stream": {"enabled": False, "bandwidth": float(f"{m['bandwidth']:.4g}"), "weight_share": 1.0,
                   "latency_s": 0.0},
        "external_memory": {"bytes": float(total_memory),
                            "optimizer_update_rate": float(f"{m['update_rate']:.4g}")},
        "sources": [f"measured by mmgraph calibrate on {when} with torch {torch.__version__}"],
        "assumptions": [
            "peak FLOP/s = measured square-matmul rate per dtype; smaller matmuls reach the share of it "
            "measured on smaller square matmuls (matmul_efficiency, interpolated in log FLOPs)",
            "memory bandwidth from a large out-of-place add (2 reads + 1 write); cache bandwidth from the "
            "same add moving 3 MB, applied to ops that move at most cache_bytes",
            "fused attention reaches the share of peak measured on generic masked attention shapes "
            "(attention_efficiency); exp/log/sigmoid-class ops run at most at the measured exp rate",
            "every op pays the per-op overhead measured on a generic tiny network; views cost only that",
            "weights stay in memory (no streaming); the optimizer runs after the backward",
        ],
    }


def run_calibrate(output: str | None, device: str, size: int) -> int:
    m = measure(device, size)
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
          f"up to {data['memory']['cache_bytes'] / 1e6:,.0f} MB); overhead {data['compute']['kernel_overhead_s'] * 1e6:.1f} us/op; "
          f"AdamW {data['external_memory']['optimizer_update_rate'] / 1e6:,.0f} M params/s")
    print(f"wrote {path} (use --target host)")
    return 0
