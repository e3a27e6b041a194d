"""``mmgraph compile``: the pipeline, the dumps, and a short table of what each pass did."""

from __future__ import annotations

import time
from typing import Optional

from mmgraph.core.config import load_params, rank_batch
from mmgraph.core.errors import Problem, UserError
from mmgraph.dump import write_dumps
from mmgraph.formats import to_mlir
from mmgraph.core.ir import Phase
from mmgraph.lock import model_dir_lock
from mmgraph.passes.cost import bottleneck_words


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def choose_micro_batch(params, mode: str, target, remat=None) -> tuple[int, str]:
    """``micro_batch_size: auto``: the (micro-batch, remat policy) with the best predicted
    throughput that fits (mmgraph.pipeline.choose_micro_batch)."""
    from mmgraph.pipeline import choose_micro_batch as choose

    choice = choose(params, mode, target, remat)
    if choice is None:
        raise UserError(Problem(params.path, f"{_section(mode)}.micro_batch_size",
                                f"auto: not even one sample fits on {target.name} with any recompute policy "
                                f"(compile with micro_batch_size: 1 for the arithmetic)"))
    tried = ", ".join(f"{m} ({p}{'' if ok else ', does not fit'}): {sps:,.1f} samples/s"
                      for m, p, sps, ok in choice.candidates)
    print(f"micro_batch_size auto: {choice.micro_batch_size} with remat {choice.policy} "
          f"(best predicted throughput on {target.name} of {tried})")
    return choice.micro_batch_size, choice.policy


def _save_programs(params, mode: str, model_dir: str, stages, target, remat, world_size: int, zero: int,
                   bucket_bytes, resolved: dict):
    """The artifact ``mmgraph run`` loads instead of tracing (MODEL_DIR/programs/MODE)."""
    from mmgraph import artifact

    wanted = artifact.fingerprint(params, mode, target=target.name, world_size=world_size, zero=zero,
                                  bucket_bytes=bucket_bytes, remat=remat)
    return artifact.save_stages(artifact.programs_dir(model_dir), mode, stages, wanted, resolved)


def _section(mode: str) -> str:
    return "eval_input" if mode == "eval" else "train_input"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _size(n: float) -> str:
    return _gb(n) if n >= 1e9 else f"{n / 1e6:.2f} MB"


def _fit_numbers(s) -> str:
    return (f"activations and working set {_gb(s.peak_memory_bytes - 2 * s.weight_buffer_bytes)} + "
            f"weight buffers {_gb(2 * s.weight_buffer_bytes)} = {_gb(s.peak_memory_bytes)} "
            f"> {_gb(s.memory_bytes)} of device memory")


def run_compile(params_path: str, model_dir: str, mode: str, validate_only: bool, verify: bool,
                target_name: str = "cs2", remat=None, world_size: int = 1, zero: int = 0,
                bucket_bytes: Optional[int] = None) -> int:
    from mmgraph.pipeline import compile_step
    from mmgraph.core.target import load_target
    from mmgraph.trace import trace_step

    start = time.perf_counter()
    params = load_params(params_path, mode)
    if world_size < 1:
        raise UserError(Problem(None, "--world_size", f"must be at least 1, not {world_size}"))
    target = load_target(target_name)
    data = params.input_for(mode)
    requested_remat = remat
    mbs = None
    if data is not None and data.micro_batch_size in ("auto", "explore"):
        mbs, remat = choose_micro_batch(params, mode, target, remat)
    if validate_only:
        program = trace_step(params, mode, mbs)
        print(f"{params_path}: valid; {mode} step traced to {len(program.ops())} ops "
              f"in {time.perf_counter() - start:.1f} s (nothing written)")
        return 0
    with model_dir_lock(model_dir, "compile"):       # one writer of MODEL_DIR/compile and programs
        if world_size > 1 and mode == "train" and mbs is None:     # as each rank of `mmgraph run` compiles it
            rb = rank_batch(data.batch_size, data.micro_batch_size, world_size)
            mbs, accumulate = rb.micro_batch, rb.micro_batches > 1
        else:
            accumulate = False
        stages = compile_step(params, mode, verify=verify, target=target, micro_batch_size=mbs, remat=remat,
                              world_size=world_size, accumulate=accumulate, zero=zero, bucket_bytes=bucket_bytes)
        mlir = to_mlir(stages[-1].program)
        check = vendor_check(stages, mlir, params_path, target)     # exit 2 when the tool refuses it
        try:
            where = write_dumps(stages, model_dir, params_path, params, target, mlir=mlir, cirh=check)
            saved = _save_programs(params, mode, model_dir, stages, target, requested_remat, world_size, zero,
                                   bucket_bytes, {"micro_batch": mbs, "remat": remat})
        except OSError as err:              # a full disk: what compile is for could not be written
            raise UserError(Problem(str(model_dir), None, f"cannot write the dumps and the program "
                                    f"({err.strerror or err}); the previous ones are as they were")) from None
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
    print(remat_summary(stages[-1].program))
    if check is not None:
        print(check.summary())
    if mode == "train":
        print(scaling_summary(stages[-1].program, target))
    checked = " (verified after every pass)" if verify else ""
    print(f"compiled in {time.perf_counter() - start:.1f} s{checked}; dumps in {where}/ (report.html); "
          f"program for `mmgraph run` in {saved}/")
    if not sched.fits:
        plan = stages[-1].program.remat
        if plan is not None and all(layer.policy == "full" for layer in plan.layers):
            raise UserError(Problem(params_path, f"{_section(mode)}.micro_batch_size",
                                    f"{sched.micro_batch_size} does not fit on {target.name}: not with any "
                                    f"recompute policy: {no_fit_arithmetic(stages[-1].program, params)}; the largest micro_batch_size "
                                    f"that fits is {sched.max_micro_batch_size}{_memory_source(target)}"))
        hint = "" if plan is None else "; or model.activation_checkpointing / --remat: auto or full"
        raise UserError(Problem(params_path, f"{_section(mode)}.micro_batch_size",
                                f"{sched.micro_batch_size} does not fit on {target.name}: {_fit_numbers(sched)}; "
                                f"the largest micro_batch_size that fits is {sched.max_micro_batch_size} "
                                f"(or set micro_batch_size: auto{hint})"))
    return 0


def vendor_check(stages, mlir: str, params_path: str, target):
    """The vendor's own lowering of the program (``mmgraph.cirh``), for targets it lowers: the
    last program, or with data parallelism the one before its collectives (the wafer reduces
    gradients in SwarmX, outside the program). None for other targets."""
    from mmgraph import cirh

    if not cirh.wants_check(target.ops):
        return None
    names = [s.name for s in stages]
    stage = stages[names.index("data_parallel") - 1] if "data_parallel" in names else stages[-1]
    if stage is stages[-1]:
        return cirh.check_program(stage.program, "program.mlir", mlir, params_path, target.name)
    return cirh.check_program(stage.program, f"program before data_parallel (after {stage.name})",
                              to_mlir(stage.program), params_path, target.name)


def scaling_summary(program, target) -> str:
    """Data parallelism on 1..16 systems, simulated (passes/scaling.py), in one line."""
    from mmgraph.passes.scaling import scaling

    if target.interconnect is None:
        return f"data parallel: {target.name} names no interconnect; not simulated"
    points = scaling(program, target)
    cells = ", ".join(f"{p.systems}: {p.samples_per_s:,.1f} samples/s ({p.efficiency:.0%})" for p in points)
    return f"data parallel on {target.name} systems ({target.interconnect.topology}): {cells}"


def remat_summary(program) -> str:
    """Which recompute policy the step uses, per layer counts, memory kept and extra FLOPs."""
    plan, sched = program.remat, program.schedule
    if plan is None:
        return "activation recomputation: none (no backward or no target)"
    counts = {}
    for layer in plan.layers:
        counts[layer.policy] = counts.get(layer.policy, 0) + 1
    layers = ", ".join(f"{n} layers {p}" for p, n in counts.items())
    model = program.flops() - (sched.recompute_flops if sched else plan.extra_flops)
    share = plan.extra_flops / model if model else 0.0
    fit = ""
    if sched is not None:
        fit = (f"; it {'fits' if sched.fits else 'does not fit'}: peak {_size(sched.peak_memory_bytes)} of "
               f"{_size(sched.memory_bytes)}; step {bottleneck_words(sched)}")
    saved = sum(layer.saved_bytes for layer in plan.layers)
    return (f"activation recomputation {plan.policy}: {layers}; activations kept {_size(plan.kept_bytes)} "
            f"(saves {_size(saved)}), recomputed {_human(plan.extra_flops)}FLOPs (+{share:.1%}){fit}")


def _memory_source(target) -> str:
    """The target's sourced figure for its memory, as a closing note."""
    source = next((s for s in target.sources if "GB" in s or "memory" in s.lower()), None)
    return f" ({target.name}'s memory, from its sources: {source})" if source else ""


def no_fit_arithmetic(program, params) -> str:
    """The smallest peak (everything recomputed), what it is made of, where it occurs."""
    from mmgraph.passes.cost import peak_breakdown

    sched, plan = program.schedule, program.remat
    b = peak_breakdown(program, params.precision)
    return (f"the smallest peak any policy reaches (full) is {_size(sched.peak_memory_bytes)}, in segment "
            f"'{b['segment']}': kept activations {_size(b['kept'])} + one layer's working set "
            f"{_size(b['recomputed'] + b['working'])} (recomputed values {_size(b['recomputed'])}, largest kernel "
            f"{_size(b['working'])}; attention scores {_size(plan.attention_scores_bytes)}) + weight buffers "
            f"{_size(b['buffers'])} > {_size(sched.memory_bytes)} of device memory")
