"""The compile pipeline: one function that lists the passes in order.

Each pass is a pure function ``Program -> (Program, notes)``; the pipeline times it,
records it in the program's history, and (with ``verify``) checks structure after every
pass and, on configs small enough to run, numerics against eager PyTorch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

from mmgraph.compiler.trace import trace_step
from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import Contract, InputKind, PassRecord, Program
from mmgraph.core.ops import is_random
from mmgraph.core.packing import real_token_share
from mmgraph.core.target import Target
from mmgraph.core.update import UpdateRule
from mmgraph.models import build_model, random_batch
from mmgraph.models.anatomy import no_weight_decay
from mmgraph.models.rng import rng_inputs
from mmgraph.passes import (
    cleanup as c,
    cost,
    data_parallel,
    freeze_masks as fm,
    fusion as fu,
    legalize,
    optimizer,
    remat,
    weight_streaming,
)
from mmgraph.passes.cleanup import cleanup
from mmgraph.passes.cluster import resident_bytes
from mmgraph.passes.cost import make_cost
from mmgraph.passes.data_parallel import DEFAULT_BUCKET_BYTES, make_data_parallel, solo_group
from mmgraph.passes.freeze_masks import freeze_masks
from mmgraph.passes.fusion import fusion
from mmgraph.passes.legalize import make_legalize
from mmgraph.passes.memory_planner import explore
from mmgraph.passes.optimizer import make_optimizer_in_program
from mmgraph.passes.remat import make_remat, verify_plan, workload
from mmgraph.passes.verify import NumericReport, program_inputs, verify_numerics, verify_structure
from mmgraph.passes.weight_streaming import make_weight_streaming

Pass = Callable[[Program], "tuple[Program, dict]"]

# Largest model (parameters) whose numerics --verify checks by running it on the CPU.
NUMERIC_VERIFY_LIMIT = 50_000_000


@dataclass(frozen=True)
class Stage:
    """One intermediate program, kept so every stage can be dumped and diffed."""

    name: str
    program: Program


def _contracts() -> dict[str, Contract]:
    """Each pass's contract, as its module declares it (``CONTRACT``)."""

    mods = {"freeze_masks": fm, "cleanup": c, "legalize": legalize, "fusion": fu, "remat": remat, "fuse_recomputed": fu,
            "data_parallel": data_parallel, "weight_streaming": weight_streaming, "cost": cost, "optimizer": optimizer}
    return {name: m.CONTRACT for name, m in mods.items()}


CONTRACTS = _contracts()


def run_pass(name: str, fn: Pass, program: Program, contract: Optional[Contract] = None) -> Program:
    """Run one pass under its contract (``CONTRACTS[name]`` unless given): refused when an
    annotation it requires is missing; afterwards what it provides must be there, and what it
    invalidates without providing again is cleared."""
    contract = contract if contract is not None else CONTRACTS.get(name, Contract())
    missing = [a for a in contract.requires if getattr(program, a) is None]
    if missing:
        raise ValueError(f"pass {name} requires {', '.join(missing)}, which no earlier pass provided")
    start = time.perf_counter()
    before = len(program.ops())
    new, notes = fn(program)
    absent = [a for a in contract.provides if getattr(new, a) is None]
    if absent:
        raise ValueError(f"pass {name} did not provide {', '.join(absent)}")
    stale = {a: None for a in contract.invalidates if a not in contract.provides and getattr(new, a) is not None}
    if stale:
        new = replace(new, **stale)
    record = PassRecord(name, time.perf_counter() - start, before, len(new.ops()), notes)
    return new.recorded(record)


def compile_step(params: Params, mode: str = "train", verify: bool = False,
                 on_stage: Optional[Callable[[Stage], None]] = None, target: Optional[Target] = None,
                 micro_batch_size: Optional[int] = None, remat: Optional[str] = None,
                 world_size: int = 1, accumulate: bool = False, zero: int = 0,
                 bucket_bytes: Optional[int] = None, real_share: Optional[float] = None,
                 optimizer_in_program: bool = False) -> list[Stage]:
    """Trace the step of ``params`` and lower it (for ``target``, when given: segments and a
    simulated schedule); returns every stage, first to last. ``remat`` overrides the params'
    ``model.activation_checkpointing``; ``world_size`` > 1 compiles a training step for that many
    data-parallel ranks (gradient reduction in the graph): ``accumulate``, the variant for the
    last of several micro-steps (earlier ones run the stage before ``data_parallel``: no
    communication); ``zero`` 2, gradients reduce-scattered (ZeRO-2); ``bucket_bytes``, the
    gradient buckets' cap (default 25 MB, as DDP's)."""
    start = time.perf_counter()
    program = trace_step(params, mode, micro_batch_size)     # 00: one static ATen graph
    program = program.recorded(PassRecord("trace", time.perf_counter() - start, 0, len(program.ops())))
    stages = [Stage("trace", program)]
    passes: list[tuple[str, Pass]] = [
        ("freeze_masks", freeze_masks),                      # 01: drop frozen weights' backward
        ("cleanup", cleanup),                                # 02: no-ops, CSE, dead code
    ]
    if target is not None:
        passes.append(("legalize", make_legalize(target)))  # 03: the ops the target lowers
    passes.append(("fusion", fusion))                        # 04: ops -> kernels (op classes)
    precision = params.precision
    policy = remat or params.model.activation_checkpointing
    data = params.input_for(mode)
    batch = data.batch_size if data else 1
    seq = params.layout(mode).max_sequence_length
    if target is not None or policy not in ("none", "auto"):     # auto without a target: none
        passes.append(("remat", make_remat(policy, target, precision, fusion, batch, seq,    # 05: kept vs
                                           world_size, zero)))                       #     recomputed; the memory plan
        passes.append(("fuse_recomputed", fusion))               # 06: the recomputed ops into the backward's kernels
    if mode == "train" and world_size > 1:
        passes.append(("data_parallel", make_data_parallel(                  # 07: collectives
            world_size, bucket_bytes or DEFAULT_BUCKET_BYTES, accumulate=accumulate, shard_gradients=zero >= 2)))
    if target is not None:
        passes += [
            ("weight_streaming", make_weight_streaming(target, precision)),   # 08: segments
            ("cost", make_cost(target, precision, batch, seq, real_share or _real_share(params, mode),  # 09: schedule
                               lambda p: resident_bytes(p, precision, target, world_size, zero))),
        ]
    if optimizer_in_program and mode == "train":
        if world_size > 1:
            raise UserError(Problem(params.path, "--optimizer_in_program", "holds the update of one rank; "
                                    "data parallelism reduces gradients outside it (run without --world_size)"))
        if program.batch_size != batch:
            raise UserError(Problem(params.path, "train_input.micro_batch_size",
                                    f"--optimizer_in_program updates once per program run: micro_batch_size "
                                    f"{program.batch_size} must equal batch_size {batch} (one micro-step per step)"))
        passes.append(("optimizer", _optimizer_pass(params, target)))          # 10: the update, in the program
    numeric = verify and sum(s.numel for s in program.inputs if s.kind.value == "param") <= NUMERIC_VERIFY_LIMIT
    _check(stages[-1], params, verify, numeric, on_stage)
    for name, fn in passes:
        before = program
        try:
            program = run_pass(name, fn, program)
        except UserError as err:
            raise UserError([replace(p, file=p.file or params.path) for p in err.problems]) from err
        stages.append(Stage(name, program))
        # numerics again only when the pass changed the graph (a pass that only annotates,
        # or found nothing to do, computes what the stage before it did)
        changed = program.gm is not before.gm and program.gm.code != before.gm.code
        _check(stages[-1], params, verify, numeric and changed, on_stage)
    return stages


def _optimizer_pass(params: Params, target: Optional[Target]) -> Pass:
    """The update spliced into the program (passes/optimizer.py), with the model's weight-decay
    rule; legalized again for a target with an op set."""

    if params.optimizer is None:
        raise UserError(Problem(params.path, "optimizer", "--optimizer_in_program needs an optimizer section"))
    no_decay = no_weight_decay(build_model(params, device="meta")[0])
    legalize = make_legalize(target) if target is not None and target.ops else None
    runs_on = ("MemoryX (weight streaming; costed by the cost pass at the target's optimizer_update_rate)"
               if target is not None and target.stream_enabled else "the device, after the backward")
    return make_optimizer_in_program(UpdateRule.of(params.optimizer), no_decay, legalize, runs_on)


def _check(stage: Stage, params: Params, verify: bool, numeric: bool, on_stage) -> None:
    if verify:
        verify_structure(stage.program, stage.name)
        if stage.program.remat is not None:
            verify_plan(stage.program, stage.name)          # remat's own post-condition: the kept set
        # A program that draws the target's own random numbers (the wafer's dropout, after
        # legalize) has no eager twin: its structure is checked, its numerics were before.
        # The update (--optimizer_in_program) is checked by running it against the runtime's
        # optimizer (tests/test_optimizer_in_program.py), not against eager autograd.
        if numeric and not any(is_random(n) for n in stage.program.ops()) and stage.name != "optimizer":
            # A data-parallel program runs in a group of one: its sums over ranks are the local
            # gradients, which eager PyTorch gives.
            with solo_group(stage.program):
                verify_against_eager(stage.program, params, stage.name)
    if on_stage is not None:
        on_stage(stage)


def reference(program: Program, params: Params, seed: int = 0):
    """The eager model (seeded weights) and a random batch of the program's size: what the
    numeric verifier compares a program with."""

    model, _ = build_model(params, seed=seed)
    model.train(program.mode == "train")
    batch = random_batch(params.layout(program.mode), program.batch_size, seed=seed + 1)
    if any(s.kind == InputKind.RNG for s in program.inputs):      # dropout: the same masks in both
        batch |= rng_inputs(seed + 7, 1000 * seed + 3, program.batch_size)
    return model, batch


def reference_inputs(program: Program, params: Params, seed: int = 0):
    """(eager model, batch, the program's inputs from them)."""
    model, batch = reference(program, params, seed)
    return model, batch, program_inputs(program, model, batch)


def verify_against_eager(program: Program, params: Params, after: str, seed: int = 0,
                         rtol: float = 1e-5) -> NumericReport:
    return verify_numerics(program, *reference(program, params, seed), after, rtol)


@dataclass(frozen=True)
class Choice:
    """``micro_batch_size: auto`` or ``explore``: the micro-batch with the best predicted
    throughput that fits, and every candidate's plan (passes/memory.py)."""

    micro_batch_size: int
    policy: str                                # the remat policy the chosen one compiles with
    candidates: tuple                          # memory.Plan per micro-batch evaluated
    probe: int                                 # the micro-batch traced (the others are scaled from it)


def planner_workload(fused: Program, params: Params, mode: str, target: Target):
    """The memory planner's view of ``fused`` (a program after fusion) at the params' batch and
    sequence, with the pipeline's fusion to see the kernels a recomputation would get."""
    data = params.input_for(mode)
    return workload(fused, target, params.precision, data.batch_size, params.layout(mode).max_sequence_length,
                    fusion)[0]


def plan_micro_batches(params: Params, mode: str, target: Target, sizes: list[int],
                       remat: Optional[str] = None) -> tuple[list, int]:
    """The memory planner's choice (fit, recompute per layer, pieces, offload, predicted
    samples/s) at every micro-batch in ``sizes``, from one program traced at a small micro-batch
    (figures scale with the micro-batch: mmgraph/core/batchscale.py)."""

    data = params.input_for(mode)
    probe = min(2, data.batch_size)
    # traced for the target: legalization decides the kernels (the wafer's attention keeps scores)
    fused = compile_step(params, mode, micro_batch_size=probe, remat="none", target=target)[-1].program
    w = planner_workload(fused, params, mode, target)
    policy = remat if remat not in (None, "auto") else params.model.activation_checkpointing
    return explore(w, sizes, policy), probe


def choose_micro_batch(params: Params, mode: str, target: Target, remat: Optional[str] = None,
                       sizes: Optional[list[int]] = None) -> Optional[Choice]:
    """Among ``sizes`` (default: the divisors of batch_size), the micro-batch whose plan fits with
    the best predicted samples/s (ties: the smaller). None when none fits."""
    batch = params.input_for(mode).batch_size
    sizes = sizes or [m for m in range(1, batch + 1) if batch % m == 0]
    plans, probe = plan_micro_batches(params, mode, target, sizes, remat)
    fits = [p for p in plans if p.fits]
    if not fits:
        return None
    best = max(fits, key=lambda p: (round(p.samples_per_s, 6), -p.micro_batch_size))
    return Choice(best.micro_batch_size, remat or params.model.activation_checkpointing, tuple(plans), probe)


def _real_share(params: Params, mode: str) -> float:
    """Non-pad share of each row from the data's statistics (``stats.json``), else 1."""

    data = params.input_for(mode)
    share = real_token_share(data.data_dir, params.layout(mode).max_sequence_length) if data else None
    return share if share is not None else 1.0
