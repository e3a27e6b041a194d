"""Where the time of a training step goes: bench_runtime's variants, the step split into the
forward + backward (the program, or the module under autograd) and the rest (optimizer, runner),
timed interleaved; and the forward + backward's ops' self CPU time by class under torch.profiler.

    python -m benchmarks.profile_step                  # small config, 3 profiled steps a variant
    python -m benchmarks.profile_step --size medium --variants eager,compiled

Classes: matmul (mm, addmm, bmm, convolution, oneDNN's linear: the kernels under the compiled
executor's mmgraph::gemm, whose own Python is not in an op), attention (CPU flash attention,
forward and backward), fused (Inductor's generated kernels), elementwise/reduction (the other
ATen math), copies/fills (copy_, fill_, zero_, cat, clone, ...), and not in an op: the step's
wall time less the ops' self time (Python, the autograd engine, the compiled code's guards and
wrappers).
A profiled run is slower than a timed one: from the profile only the shares are used.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_runtime import TRAIN, Train, config_path, time_steps
from mmgraph.core.config import load_params

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::mkldnn_convolution", "aten::convolution_backward",
          "aten::_convolution", "aten::linear", "mkldnn::_linear_pointwise")
COPIES = ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone", "aten::_to_copy",
          "aten::slice_backward", "aten::new_zeros", "aten::zeros", "aten::empty_like", "aten::contiguous")
CLASSES = ("matmul", "attention", "fused", "elementwise/reduction", "copies/fills", "not in an op")


def op_class(key: str) -> str | None:
    if key.startswith(("aten::", "mkldnn::", "cpp_fused", "graph_")) or "fused" in key:
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


def parts(bench: Train) -> dict:
    """Per variant: (the whole step, its forward + backward or program run alone). The step less
    the second is the optimizer (clipping, AdamW, the divergence check) and the runner's own
    work; for ``compiled`` the program holds the update, so its program run is the whole step."""
    out = {}
    for name, step in bench.steps.items():
        if name in ("eager", "torch.compile"):
            cells = dict(zip(step.__code__.co_freevars, (c.cell_contents for c in step.__closure__)))
            fn, named, train = cells["fn"], cells["named"], cells["train"]      # Train._eager_step's

            def program(fn=fn, named=named, train=train):
                loss = fn(**bench.batch)
                return torch.autograd.grad(loss, [named[k] for k in train])
        else:
            r = step.__defaults__[0]

            def program(r=r):
                if r._update:
                    return r.train_step([bench.batch])
                return r.train_exec(r._inputs(r.train_program, bench.batch))
        out[name] = (step, program)
    return out


def measure(bench: Train, repeats: int, steps: int) -> dict:
    fns = parts(bench)
    timed = time_steps({f"{k}|{w}": f for k, pair in fns.items() for w, f in zip(("step", "program"), pair)}, repeats)
    out = {}
    for name, (_, program) in fns.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                program()
            wall = (time.perf_counter() - start) / steps
        classes = dict.fromkeys(CLASSES, 0.0)
        for e in prof.key_averages():
            kind = op_class(e.key)
            if kind:
                classes[kind] += e.self_cpu_time_total / steps / 1e6
        classes["not in an op"] = max(wall - sum(classes.values()), 0.0)
        out[name] = {"step_s": timed[f"{name}|step"]["median_s"], "program_s": timed[f"{name}|program"]["median_s"],
                     "profiled_s": wall, "classes_s": classes}
    return out


def table(res: dict) -> str:
    names = list(res)
    step = {n: res[n]["step_s"] for n in names}
    prog = {n: res[n]["program_s"] for n in names}
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| step ms (median) | " + " | ".join(f"{step[n] * 1e3:.0f}" for n in names) + " |",
             "| forward + backward (program) ms | " + " | ".join(
                 f"{prog[n] * 1e3:.0f}" if n != "compiled" else f"{prog[n] * 1e3:.0f} (with the update)"
                 for n in names) + " |",
             "| optimizer + runner ms (step less the above) | " + " | ".join(
                 f"{max(step[n] - prog[n], 0) * 1e3:.0f}" if n != "compiled" else "in the program" for n in names) + " |",
             "| op time in the profiled forward + backward: | " + " | ".join("" for _ in names) + " |"]
    for c in CLASSES:
        lines.append(f"| {c} | " + " | ".join(
            f"{res[n]['classes_s'][c] / res[n]['profiled_s']:.0%}" for n in names) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    ap.add_argument("--variants", default="eager,torch.compile,reference,compiled")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v in TRAIN]
    torch._inductor.config.cpp.enable_kernel_profile = True      # Inductor's kernels named in the profile
    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(config_path(args.size, Path(tmp)))
        bench = Train(params, variants, torch.device("cpu"))
    print(f"{args.size} config, {torch.get_num_threads()} threads: step and forward + backward timed interleaved, "
          f"median of {args.repeats}; op classes: share of {args.steps} profiled forward + backward runs:\n")
    print(table(measure(bench, args.repeats, args.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
