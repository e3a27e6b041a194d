"""``mmgraph compile``: the pipeline, the dumps, and a short table of what each pass did."""

from __future__ import annotations

import time

from mmgraph.config import load_params
from mmgraph.dump import write_dumps
from mmgraph.ir import Phase


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def run_compile(params_path: str, model_dir: str, mode: str, validate_only: bool, verify: bool) -> int:
    from mmgraph.pipeline import compile_step
    from mmgraph.trace import trace_step

    start = time.perf_counter()
    params = load_params(params_path, mode)
    if validate_only:
        program = trace_step(params, mode)
        print(f"{params_path}: valid; {mode} step traced to {len(program.ops())} ops "
              f"in {time.perf_counter() - start:.1f} s (nothing written)")
        return 0
    stages = compile_step(params, mode, verify=verify)
    where = write_dumps(stages, model_dir, params_path, params)
    print(f"{'pass':<14} {'ops':>7} {'kernels':>8} {'fwd FLOPs':>10} {'bwd FLOPs':>10} {'grads':>6} {'time':>7}")
    for stage in stages:
        p, rec = stage.program, stage.program.history[-1]
        grads = sum(1 for o in p.outputs if o.kind == "grad")
        kernels = len(p.kernels) if p.kernels is not None else "-"
        print(f"{stage.name:<14} {len(p.ops()):>7} {kernels:>8} {_human(p.flops(Phase.FORWARD)):>10} "
              f"{_human(p.flops(Phase.BACKWARD)):>10} {grads:>6} {rec.seconds:>6.2f}s")
    checked = " (verified after every pass)" if verify else ""
    print(f"\ncompiled in {time.perf_counter() - start:.1f} s{checked}; dumps in {where}/")
    return 0
