"""Where the time of a training step goes: bench_runtime's variants under torch.profiler, the
ops' self CPU time by class, and the step split into the program (or the module's forward and
backward) and the optimizer (clipping, AdamW, the divergence check).

    python -m benchmarks.profile_step                  # small config, 3 profiled steps a variant
    python -m benchmarks.profile_step --size medium --variants eager,compiled

Classes: matmul (mm, addmm, bmm, convolution), attention (CPU flash attention, forward and
backward), fused (Inductor's generated kernels), elementwise/reduction (the other ATen math),
copies/fills (copy_, fill_, zero_, cat, clone, ...), and not in an op: the step's wall time less
the ops' self time (Python, the autograd engine, the compiled code's guards and wrappers).
A profiled step is slower than a timed one; the shares are what the table is for.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.bench_runtime import TRAIN, Train, config_path
from mmgraph.core.config import load_params

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward",
          "aten::_convolution", "aten::linear")
COPIES = ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone", "aten::_to_copy",
          "aten::slice_backward", "aten::new_zeros", "aten::zeros", "aten::empty_like", "aten::contiguous")
CLASSES = ("matmul", "attention", "fused", "elementwise/reduction", "copies/fills", "not in an op")


def op_class(key: str) -> str | None:
    if key.startswith(("aten::", "cpp_fused", "graph_")) or "fused" in key:
        if key in MATMUL:
            return "matmul"
        if "scaled_dot_product" in key or "flash_attention" in key:
            return "attention"
        if "fused" in key:
            return "fused"
        if key in COPIES:
            return "copies/fills"
        return "elementwise/reduction"
    return None                 # framework events (record_function, autograd nodes): not ops


def _wrap(obj, attr: str, label: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a, **k):
        with record_function(label):
            return fn(*a, **k)
    setattr(obj, attr, wrapped)


def instrument(bench: Train) -> None:
    """Label the optimizer's part of each variant's step (``optimizer``) in the profile."""
    from mmgraph.runtime import checkpoint, runner as runner_mod

    for name, step in bench.steps.items():
        if name in ("eager", "torch.compile"):
            opt = step.__closure__[[c.cell_contents.__class__.__name__ for c in step.__closure__].index("Optimizer")] \
                .cell_contents
            _wrap(opt, "clip", "optimizer")
            _wrap(opt, "step", "optimizer")
        else:
            r = step.__defaults__[0]
            if r.optimizer is not None:
                _wrap(r.optimizer, "clip", "optimizer")
                _wrap(r.optimizer, "step", "optimizer")
    original = checkpoint.non_finite

    def non_finite(w):
        with record_function("optimizer"):
            return original(w)
    runner_mod.checkpoint.non_finite = non_finite


def profile_steps(bench: Train, steps: int) -> dict:
    out = {}
    for name, fn in bench.steps.items():
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            wall = (time.perf_counter() - start) / steps
        classes = dict.fromkeys(CLASSES, 0.0)
        optimizer = 0.0
        for e in prof.key_averages():
            if e.key == "optimizer":
                optimizer = e.cpu_time_total / steps / 1e6
            kind = op_class(e.key)
            if kind:
                classes[kind] += e.self_cpu_time_total / steps / 1e6
        classes["not in an op"] = max(wall - sum(classes.values()), 0.0)
        out[name] = {"wall_s": wall, "optimizer_s": optimizer, "classes_s": classes}
    return out


def table(res: dict) -> str:
    names = list(res)
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| profiled step ms | " + " | ".join(f"{res[n]['wall_s'] * 1e3:.0f}" for n in names) + " |",
             "| of which optimizer (clip, AdamW, checks) ms | "
             + " | ".join(f"{res[n]['optimizer_s'] * 1e3:.0f}" if res[n]['optimizer_s'] else "in the program"
                          for n in names) + " |"]
    for c in CLASSES:
        lines.append(f"| {c} | " + " | ".join(
            f"{res[n]['classes_s'][c] * 1e3:.0f} ({res[n]['classes_s'][c] / res[n]['wall_s']:.0%})" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    ap.add_argument("--variants", default="eager,torch.compile,reference,compiled")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v in TRAIN]
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(config_path(args.size, Path(tmp)))
        bench = Train(params, variants, torch.device("cpu"))
    instrument(bench)
    print(f"{args.size} config, {torch.get_num_threads()} threads, {args.steps} profiled steps a variant (ms, share "
          f"of the profiled step):\n")
    print(table(profile_steps(bench, args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
