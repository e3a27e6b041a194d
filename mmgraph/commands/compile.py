"""``mmgraph compile``: the pipeline, the dumps, and a short table of what each pass did."""

from __future__ import annotations

import time
from typing import Optional

from mmgraph.compiler import artifact, cirh
from mmgraph.compiler.pipeline import compile_step, planner_workload
from mmgraph.compiler.scaling import scaling, world_report
from mmgraph.compiler.trace import trace_step
from mmgraph.core.config import load_params, micro_batch_search, rank_batch
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import Phase
from mmgraph.core.lock import model_dir_lock
from mmgraph.core.target import load_target
from mmgraph.passes.cost import peak_breakdown
from mmgraph.passes.memory_planner import choose
from mmgraph.report.dump import bottleneck_words, write_dumps
from mmgraph.report.fit import choose_micro_batch, human_gb, human_size, input_section
from mmgraph.report.formats import to_mlir


def _human(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _save_programs(params, mode: str, model_dir: str, stages, target, remat, world_size: int, zero: int,
                   update: bool, bucket_bytes, resolved: dict):
    """The artifact ``mmgraph run`` loads instead of tracing (MODEL_DIR/programs/MODE)."""

    wanted = artifact.fingerprint(params, mode, target=target.name, world_size=world_size, zero=zero,
                                  bucket_bytes=bucket_bytes, remat=remat, update=update)
    return artifact.save_stages(artifact.programs_dir(model_dir), mode, stages, wanted, resolved)


def _fit_numbers(s) -> str:
    return (f"activations and working set {human_gb(s.peak_memory_bytes - 2 * s.weight_buffer_bytes)} + "
            f"weight buffers {human_gb(2 * s.weight_buffer_bytes)} = {human_gb(s.peak_memory_bytes)} "
            f"> {human_gb(s.memory_bytes)} of device memory")


def run_compile(params_path: str, model_dir: str, mode: str, validate_only: bool, verify: bool,
                target_name: str = "cs2", remat=None, world_size: int = 1, zero: int = 0,
                bucket_bytes: Optional[int] = None, real_tokens: Optional[float] = None,
                optimizer_in_program: bool = False) -> int:
    start = time.perf_counter()
    params = load_params(params_path, mode)
    if world_size < 1:
        raise UserError(Problem(None, "--world_size", f"must be at least 1, not {world_size}"))
    target = load_target(target_name)
    data = params.input_for(mode)
    requested_remat = remat
    mbs = None
    search = micro_batch_search(data.micro_batch_size, data.batch_size) if data is not None else None
    if search is not None:
        mbs, remat = choose_micro_batch(params, mode, target, remat, search)
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
        seq = params.layout(mode).max_sequence_length
        share = min(1.0, real_tokens / seq) if real_tokens else None
        stages = compile_step(params, mode, verify=verify, target=target, micro_batch_size=mbs, remat=remat,
                              world_size=world_size, accumulate=accumulate, zero=zero, bucket_bytes=bucket_bytes,
                              real_share=share, optimizer_in_program=optimizer_in_program)
        mlir = to_mlir(stages[-1].program)
        check = vendor_check(stages, mlir, params_path, target)     # exit 2 when the tool refuses it
        world = world_report(stages[-1].program, target, params.precision, world_size, zero,
                             data.batch_size if data else 1, seq, stages[-1].program.schedule.real_token_share)
        try:
            where = write_dumps(stages, model_dir, params_path, params, target, world, mlir=mlir, cirh=check)
            saved = _save_programs(params, mode, model_dir, stages, target, requested_remat, world_size, zero, optimizer_in_program,
                                   bucket_bytes, {"micro_batch": mbs, "remat": remat})
        except OSError as err:              # a full disk: what compile is for could not be written
            raise UserError(Problem(str(model_dir), None, f"cannot write the dumps and the program "
                                    f"({err.strerror or err}); the previous ones are as they were")) from None
    _print_summary(stages, target, mode, check, world, world_size)
    checked = " (verified after every pass)" if verify else ""
    print(f"compiled in {time.perf_counter() - start:.1f} s{checked}; dumps in {where}/ (report.html); "
          f"program for `mmgraph run` in {saved}/")
    if not stages[-1].program.schedule.fits:
        _refuse_no_fit(stages, params, params_path, mode, target, remat)
    return 0


def _print_summary(stages, target, mode: str, check, world, world_size: int) -> None:
    """Compile's printout: a line per pass, the simulated step, the remat and memory plans, the
    vendor's check, scaling over systems and the world of ranks."""
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
          f"peak memory {human_gb(sched.peak_memory_bytes)} of {human_gb(sched.memory_bytes)}")
    print(remat_summary(stages[-1].program))
    if stages[-1].program.memory is not None:
        print(memory_summary(stages[-1].program, target))
    if check is not None:
        print(check.summary())
    if mode == "train":
        print(scaling_summary(stages[-1].program, target))
    if world is not None and (world_size > 1 or not target.stream_enabled):
        print(world_summary(world, target))


def _refuse_no_fit(stages, params, params_path: str, mode: str, target, remat) -> None:
    """Exit 2 for a step that does not fit: the arithmetic, and the largest micro-batch that does."""
    sched = stages[-1].program.schedule
    plan = stages[-1].program.remat
    largest = largest_fitting(stages, params, mode, target, remat)
    if plan is not None and all(layer.policy == "full" for layer in plan.layers):
        mechanisms = ", ".join(target.mechanisms.names()) if target.stream_enabled else "recompute"
        raise UserError(Problem(params_path, f"{input_section(mode)}.micro_batch_size",
                                f"{sched.micro_batch_size} does not fit on {target.name}: not with any "
                                f"recompute policy nor the target's other mechanisms ({mechanisms}): "
                                f"{no_fit_arithmetic(stages[-1].program, params)}; the largest micro_batch_size "
                                f"that fits is {largest}{_memory_source(target)}"))
    hint = "" if plan is None else "; or model.activation_checkpointing / --remat: auto or full"
    raise UserError(Problem(params_path, f"{input_section(mode)}.micro_batch_size",
                            f"{sched.micro_batch_size} does not fit on {target.name}: {_fit_numbers(sched)}; "
                            f"the largest micro_batch_size that fits is {largest} "
                            f"(or set micro_batch_size: auto{hint})"))


def vendor_check(stages, mlir: str, params_path: str, target):
    """The vendor's own lowering of the program (``mmgraph.compiler.cirh``), for targets it lowers: the
    last program, or with data parallelism the one before its collectives (the wafer reduces
    gradients in SwarmX, outside the program). None for other targets."""

    if not cirh.wants_check(target.ops):
        return None
    names = [s.name for s in stages]
    stage = stages[names.index("data_parallel") - 1] if "data_parallel" in names else stages[-1]
    if stage is stages[-1]:
        return cirh.check_program(stage.program, "program.mlir", mlir, params_path, target.name)
    return cirh.check_program(stage.program, f"program before data_parallel (after {stage.name})",
                              to_mlir(stage.program), params_path, target.name)


def largest_fitting(stages, params, mode: str, target, remat) -> int:
    """The largest micro-batch below the compiled one that fits with the target's mechanisms,
    from the compiled step's figures (scaled; passes/memory.py); 0 when not even one does."""

    fused = next((s.program for s in stages if s.name == "fusion"), None)
    if fused is None or fused.mode != "train":
        return stages[-1].program.schedule.max_micro_batch_size
    w = planner_workload(fused, params, mode, target)
    policy = remat or params.model.activation_checkpointing
    low, high = 0, fused.batch_size - 1          # fit shrinks with the micro-batch: bisect
    while low < high:
        mid = (low + high + 1) // 2
        if choose(w, mid, policy).fits:
            low = mid
        else:
            high = mid - 1
    return low


def memory_summary(program, target) -> str:
    """How the step fits the device: the mechanisms chosen and what each costs (passes/memory.py)."""
    mp, sched = program.memory, program.schedule
    parts = []
    plan = program.remat
    if plan is not None and any(x.policy != "none" for x in plan.layers):
        counts: dict = {}
        for x in plan.layers:
            counts[x.policy] = counts.get(x.policy, 0) + 1
        cost = f" (+{sched.recompute_s * 1e3:,.1f} ms compute)" if sched is not None else ""
        parts.append("recompute: " + ", ".join(f"{n} layers {p}" for p, n in counts.items()) + cost)
    if mp.segment_pieces:
        layers = sorted({lay for lay, _, _ in mp.segment_pieces})
        cost = f" (+{sched.piece_overhead_s * 1e3:,.1f} ms overhead)" if sched is not None else ""
        parts.append(f"pieces: {len(mp.segment_pieces)} segments of {len(layers)} layers run their micro-batch in "
                     f"pieces, down to {mp.pieces} pieces of {mp.piece_samples} samples{cost}")
    if mp.offloaded:
        parts.append(f"offload: the kept activations of {len(mp.offloaded)} layers ({mp.offloaded[0]} .. "
                     f"{mp.offloaded[-1]}), {mp.offload_bytes / 1e9:.2f} GB out in the forward and back in the "
                     f"backward ({mp.offload_s * 1e3:,.1f} ms of link time)")
    fit = "fits" if (sched.fits if sched else mp.fits) else "does not fit"
    peak = sched.peak_memory_bytes if sched else mp.estimated_peak_bytes
    return (f"memory on {target.name}: {fit} (peak {human_gb(peak)} of {human_gb(mp.memory_bytes)}) with "
            f"{'; '.join(parts) or 'no mechanism'}; mechanisms available: {', '.join(mp.available) or 'none'}")


def world_summary(w: dict, target) -> str:
    """report.json's ``world`` in one line: all ranks together."""
    line = (f"world of {w['world_size']} on {target.name} ({w['model']}): {w['samples_per_s']:,.1f} samples/s, "
            f"{w['real_tokens_per_s']:,.0f} real tokens/s, step {w['step_s'] * 1e3:,.1f} ms in {w['micro_steps']} "
            f"micro-steps of {w['micro_batch_size']}")
    if "weights_bytes" in w:
        line += (f"; per GPU {human_size(w['peak_bytes'])} of {human_size(w['memory_bytes'])} "
                 f"({'fits' if w['fits'] else 'does NOT fit'}): weights {human_size(w['weights_bytes'])}, gradients "
                 f"{human_size(w['gradients_bytes'])}, optimizer {human_size(w['optimizer_bytes'])}, activations "
                 f"{human_size(w['activations_bytes'])}" + (f", gathered weights {human_size(w['gathered_bytes'])}"
                                                     if w['gathered_bytes'] else "")
                 + f"; communication exposed {w['exposed_s'] * 1e3:,.1f} ms, optimizer {w['optimizer_s'] * 1e3:,.1f} ms")
    return line


def scaling_summary(program, target) -> str:
    """Data parallelism on 1..16 systems, simulated (passes/scaling.py), in one line."""

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
        fit = (f"; it {'fits' if sched.fits else 'does not fit'}: peak {human_size(sched.peak_memory_bytes)} of "
               f"{human_size(sched.memory_bytes)}; step {bottleneck_words(sched)}")
    saved = sum(layer.saved_bytes for layer in plan.layers)
    return (f"activation recomputation {plan.policy}: {layers}; activations kept {human_size(plan.kept_bytes)} "
            f"(saves {human_size(saved)}), recomputed {_human(plan.extra_flops)}FLOPs (+{share:.1%}){fit}")


def _memory_source(target) -> str:
    """The target's sourced figure for its memory, as a closing note."""
    source = next((s for s in target.sources if "GB" in s or "memory" in s.lower()), None)
    return f" ({target.name}'s memory, from its sources: {source})" if source else ""


def no_fit_arithmetic(program, params) -> str:
    """The smallest peak (everything recomputed), what it is made of, where it occurs."""

    sched, plan = program.schedule, program.remat
    b = peak_breakdown(program, params.precision)
    return (f"the smallest peak any policy reaches (full) is {human_size(sched.peak_memory_bytes)}, in segment "
            f"'{b['segment']}': kept activations {human_size(b['kept'])} + one layer's working set "
            f"{human_size(b['recomputed'] + b['working'])} (recomputed values {human_size(b['recomputed'])}, largest kernel "
            f"{human_size(b['working'])}; attention scores {human_size(plan.attention_scores_bytes)}) + weight buffers "
            f"{human_size(b['buffers'])} > {human_size(sched.memory_bytes)} of device memory")
