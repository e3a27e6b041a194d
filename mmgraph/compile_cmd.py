"""``mmgraph compile``: the pipeline, the dumps, and a short table of what each pass did."""

from __future__ import annotations

import time

from mmgraph.config import load_params
from mmgraph.errors import Problem, UserError
from mmgraph.dump import write_dumps
from mmgraph.ir import Phase


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def choose_micro_batch(params, mode: str, target) -> int:
    """``micro_batch_size: auto``: the largest divisor of batch_size whose activations fit."""
    from mmgraph.pipeline import compile_step

    data = params.input_for(mode)
    probe = compile_step(params, mode, target=target, micro_batch_size=1)[-1].program.schedule
    fitting = [m for m in range(1, data.batch_size + 1)
               if data.batch_size % m == 0 and m <= probe.max_micro_batch_size]
    if not fitting:
        raise UserError(Problem(params.path, f"{_section(mode)}.micro_batch_size",
                                f"auto: not even one sample fits on {target.name} ({_fit_numbers(probe)})"))
    return fitting[-1]


def _section(mode: str) -> str:
    return "eval_input" if mode == "eval" else "train_input"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _fit_numbers(s) -> str:
    return (f"activations and working set {_gb(s.peak_memory_bytes - 2 * s.weight_buffer_bytes)} + "
            f"weight buffers {_gb(2 * s.weight_buffer_bytes)} = {_gb(s.peak_memory_bytes)} "
            f"> {_gb(s.memory_bytes)} of device memory")


def run_compile(params_path: str, model_dir: str, mode: str, validate_only: bool, verify: bool,
                target_name: str = "cs2") -> int:
    from mmgraph.pipeline import compile_step
    from mmgraph.target import load_target
    from mmgraph.trace import trace_step

    start = time.perf_counter()
    params = load_params(params_path, mode)
    target = load_target(target_name)
    data = params.input_for(mode)
    mbs = None
    if data is not None and data.micro_batch_size in ("auto", "explore"):
        mbs = choose_micro_batch(params, mode, target)
        print(f"micro_batch_size auto: {mbs} (largest divisor of batch_size {data.batch_size} that fits on {target.name})")
    if validate_only:
        program = trace_step(params, mode, mbs)
        print(f"{params_path}: valid; {mode} step traced to {len(program.ops())} ops "
              f"in {time.perf_counter() - start:.1f} s (nothing written)")
        return 0
    stages = compile_step(params, mode, verify=verify, target=target, micro_batch_size=mbs)
    where = write_dumps(stages, model_dir, params_path, params, target)
    print(f"{'pass':<17} {'ops':>7} {'kernels':>8} {'fwd FLOPs':>10} {'bwd FLOPs':>10} {'grads':>6} {'time':>7}")
    for stage in stages:
        p, rec = stage.program, stage.program.history[-1]
        grads = sum(1 for o in p.outputs if o.kind == "grad")
        kernels = len(p.kernels) if p.kernels is not None else "-"
        print(f"{stage.name:<17} {len(p.ops()):>7} {kernels:>8} {_human(p.flops(Phase.FORWARD)):>10} "
              f"{_human(p.flops(Phase.BACKWARD)):>10} {grads:>6} {rec.seconds:>6.2f}s")
    sched = stages[-1].program.schedule
    print(f"\non {target.name} ({sched.precision}, micro-batch {sched.micro_batch_size} of {sched.batch_size}): "
          f"step {sched.step_s * 1e3:,.1f} ms, {sched.samples_per_s:,.1f} samples/s, "
          f"{sched.tokens_per_s:,.0f} tokens/s ({sched.real_tokens_per_s:,.0f} real, "
          f"{sched.real_token_share:.0%} of each row), utilization {sched.utilization:.1%}, "
          f"peak memory {_gb(sched.peak_memory_bytes)} of {_gb(sched.memory_bytes)}")
    checked = " (verified after every pass)" if verify else ""
    print(f"compiled in {time.perf_counter() - start:.1f} s{checked}; dumps in {where}/ (report.html)")
    if not sched.fits:
        raise UserError(Problem(params_path, f"{_section(mode)}.micro_batch_size",
                                f"{sched.micro_batch_size} does not fit on {target.name}: {_fit_numbers(sched)}; "
                                f"the largest micro_batch_size that fits is {sched.max_micro_batch_size} "
                                f"(or set micro_batch_size: auto)"))
    return 0
