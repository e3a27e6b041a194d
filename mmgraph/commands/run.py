"""``mmgraph run``: train and evaluate the lowered program (the Model Zoo's run.py arguments)."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from mmgraph.compiler import artifact
from mmgraph.compiler.pipeline import compile_step
from mmgraph.convert.modelzoo import is_modelzoo_checkpoint, training_start
from mmgraph.core.config import load_params, micro_batch_search, rank_batch
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import Program
from mmgraph.core.lock import model_dir_lock
from mmgraph.core.target import load_target
from mmgraph.models import build_model, initial_weights
from mmgraph.models.anatomy import no_weight_decay
from mmgraph.report.dump import write_dumps
from mmgraph.report.fit import choose_micro_batch
from mmgraph.runtime.data import make_loader
from mmgraph.runtime.distributed import agree, from_env, rank_share
from mmgraph.runtime.regions import prepare
from mmgraph.runtime.runner import Runner
from mmgraph.runtime.train import check_memory, loader_batch, train
from mmgraph.runtime.zero import optimizer_state_bytes


def _device(name: Optional[str]) -> str:
    if name in (None, "CPU"):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(Problem(None, "GPU", "no CUDA device is available (use CPU)"))
    return "cuda"


def run(params_path: str, model_dir: str, mode: str, opts: "RunOptions") -> int:
    """Train and/or evaluate, holding the model_dir's lock (one run or compile at a time; of a
    data-parallel job, rank 0 holds it)."""
    if os.environ.get("RANK", "0") != "0":
        return _run(params_path, model_dir, mode, opts)
    with model_dir_lock(model_dir, "run"):
        return _run(params_path, model_dir, mode, opts)


def _silent(*_args, **_kwargs) -> None:
    return None


@dataclass(frozen=True)
class RunOptions:
    """The command line of ``mmgraph run`` past the params, mode and model_dir (built once, by
    the CLI; ``device`` as typed: CPU, GPU or None)."""

    device: Optional[str] = None
    checkpoint_path: Optional[str] = None
    max_steps: Optional[int] = None
    target: str = "cs2"
    executor: str = "reference"
    eval_executor: Optional[str] = None
    weight_streaming: bool = False
    remat: Optional[str] = None
    zero: int = 0
    bucket_bytes: Optional[int] = None
    program_dir: Optional[str] = None
    optimizer_in_program: bool = False


def _run(params_path: str, model_dir: str, mode: str, opts: RunOptions) -> int:
    params = load_params(params_path, mode)
    opts = replace(opts, device=_device(opts.device))
    ranks = from_env(opts.device)               # torchrun's ranks: joins the process group
    done = False
    try:
        rc = _run_ranks(params, params_path, model_dir, mode, ranks, opts)
        done = True
    finally:
        if ranks.world_size > 1 and torch.distributed.is_initialized():
            if done:                      # no rank tears its connections down while another still uses them
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    if ranks.world_size > 1:
        leave(rc)
    return rc


def leave(rc: int) -> None:
    """End a data-parallel rank now that everything is written: gloo's worker threads can still
    hold collective work at interpreter teardown, which aborts the process (SIGABRT, "terminate
    called without an active exception"; pytorch/pytorch#179291), so the rank exits without it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _run_ranks(params, params_path: str, model_dir: str, mode: str, ranks, opts: RunOptions) -> int:
    say = print if ranks.main else _silent
    train_mode = mode in ("train", "train_and_eval")
    original = params
    remat = opts.remat
    if train_mode:
        params, remat = _resolve_auto(params, model_dir, opts, ranks, say)
    if train_mode and ranks.world_size > 1:
        rank_share(params.train_input.batch_size, ranks, params.path, "train_input.batch_size")
    # Data first: a missing data_dir or image folder is reported before any compute.
    train_loader = (make_loader(params, "train", batch_size=loader_batch(params, ranks), ranks=ranks)
                    if train_mode else None)
    eval_loader = make_loader(params, "eval") if mode in ("eval", "train_and_eval") else None
    if ranks.world_size > 1:                    # before anything a difference could derail
        agree(ranks, _identity(original, params, mode, model_dir, opts, train_loader, eval_loader))
    if train_mode:
        check_memory(params, opts.device, ranks)

    for name in {opts.executor, opts.eval_executor or opts.executor}:
        prepare(name, torch.device(opts.device))     # the executor's own set-up overlaps the lowering
    programs = _programs(params, params_path, model_dir, opts, remat, ranks, train_mode, eval_loader is not None,
                         say, original)
    runner = Runner(params, model_dir, programs.train, programs.eval, opts.device, executor=opts.executor,
                    eval_executor=opts.eval_executor, weight_streaming=opts.weight_streaming,
                    weights=initial_weights(params), ranks=ranks, no_sync=programs.no_sync,
                    no_decay=no_weight_decay(build_model(params, device="meta")[0]),
                    zero=opts.zero if ranks.world_size > 1 else 0)
    if ranks.world_size > 1 and train_mode:
        say(_data_parallel_line(params, ranks, runner, opts.zero))
    elif opts.zero:
        say(f"--zero {opts.zero}: one process holds everything (ZeRO shards across torchrun's ranks)")
    _start_weights(params, runner, opts.checkpoint_path, say)
    if train_mode:
        train(params, runner, train_loader, eval_loader, opts.max_steps or params.runconfig.max_steps, ranks, say)
    if eval_loader is not None:
        metrics = runner.evaluate(list(eval_loader[0]))
        runner.log({"step": runner.step, **metrics}, "eval")
        say(f"eval at step {runner.step}: loss {metrics['eval_loss']:.4f}, perplexity "
            f"{metrics['perplexity']:.2f}, token accuracy {metrics['token_accuracy']:.3f}, answer accuracy "
            f"{metrics['answer_accuracy']:.3f} ({metrics['answers']} answers)")
    runner.close()
    say(f"model_dir {model_dir}: compile/ (dumps, report.html), checkpoints/, metrics.jsonl, "
        f"events/ (tensorboard --logdir {Path(model_dir) / 'events'})")
    return 0


def _identity(original, params, mode: str, model_dir: str, opts: RunOptions, train_loader, eval_loader) -> dict:
    """What every rank of a job must share, as flat keys: the program's fingerprint (the params
    that shape it), the optimizer and runconfig, the command line and the data each split reads."""

    out: dict = {}
    for m in ("train", "eval") if mode == "train_and_eval" else (mode,):
        stamp = artifact.fingerprint(original, m, target=opts.target, zero=opts.zero,
                                     bucket_bytes=opts.bucket_bytes, remat=opts.remat,
                                     update=opts.optimizer_in_program)
        out.update({f"program.{k}": v for k, v in stamp.pop("params").items()})
        out.update({f"program.{k}": v for k, v in stamp.items()})
    sections = {"optimizer": params.optimizer, "runconfig": params.runconfig}
    for name, section in sections.items():
        if section is not None:
            out.update({f"{name}.{k}": v for k, v in section.model_dump(mode="json").items()})
    out.update({f"option.{k}": v for k, v in asdict(opts).items()})
    out["model_dir"] = str(Path(model_dir).resolve())
    for split, loader in (("train", train_loader), ("eval", eval_loader)):
        if loader is not None:
            out.update({f"data.{split}.{k}": v for k, v in loader[0].dataset.identity().items()})
    return out


def _resolve_auto(params, model_dir: str, opts: RunOptions, ranks, say):
    """``micro_batch_size: auto`` (or ``explore``) decided once, as compile decides it: read from
    the matching saved program when there is one, else chosen now. Returns (params with the
    micro-batch resolved, remat policy)."""

    data = params.train_input
    if data is None or micro_batch_search(data.micro_batch_size, data.batch_size) is None:
        return params, opts.remat
    tgt = load_target(opts.target)
    store = Path(opts.program_dir) if opts.program_dir else artifact.programs_dir(model_dir)
    wanted = artifact.fingerprint(params, "train", target=tgt.name, world_size=ranks.world_size, zero=opts.zero,
                                  bucket_bytes=opts.bucket_bytes, remat=opts.remat, update=opts.optimizer_in_program)
    where, _ = artifact.find(store, "train", wanted)
    resolved = (artifact.read_fingerprint(where) or {}).get("resolved", {}) if where else {}
    if resolved.get("micro_batch"):
        say(f"micro_batch_size auto: {resolved['micro_batch']} with remat {resolved.get('remat')} "
            f"(as compiled, {where})")
        return params.with_micro_batch("train", resolved["micro_batch"]), opts.remat

    mbs, policy = choose_micro_batch(params, "train", tgt, opts.remat)
    return params.with_micro_batch("train", mbs), policy if opts.remat is None else opts.remat


@dataclass(frozen=True)
class Programs:
    train: Optional[Program]              # the last micro-step's program (data parallel: reduces)
    no_sync: Optional[Program]            # data parallel, several micro-steps: the ones before the last
    eval: Optional[Program]


def _programs(params, params_path, model_dir, opts: RunOptions, remat, ranks, train_mode: bool, evaluate: bool, say,
              original=None) -> Programs:
    """The programs the run executes: the saved artifacts (MODEL_DIR/programs, or ``--program``)
    when their fingerprints match, else compiled (dumps in MODEL_DIR/compile and the artifacts
    written by rank 0). ``remat``: the policy (``auto`` resolved); ``original``: the params
    before ``auto`` was resolved (fingerprints are of what the user wrote)."""
    target, zero, bucket_bytes = opts.target, opts.zero, opts.bucket_bytes
    program_dir, update = opts.program_dir, opts.optimizer_in_program

    t0 = time.perf_counter()
    tgt = load_target(target)
    store = Path(program_dir) if program_dir else artifact.programs_dir(model_dir)
    world = ranks.world_size
    train_program = eval_program = no_sync = None
    compiled: list[str] = []
    if train_mode:
        wanted = artifact.fingerprint(original or params, "train", target=tgt.name, world_size=world, zero=zero,
                                      bucket_bytes=bucket_bytes, remat=remat, update=update)
        rb = rank_batch(params.train_input.batch_size, params.train_input.micro_batch_size, world)
        names = ["train", "train.no_sync"] if world > 1 and rb.micro_batches > 1 else ["train"]
        found = _load_saved(store, names, wanted, program_dir, say)
        if found is None:
            stages = _compile_train(params, tgt, remat, world, zero, bucket_bytes, rb, update)
            if ranks.main:
                _write_cache(lambda: _dumps_and_program(stages, model_dir, params_path, tgt, store, wanted, {
                    "micro_batch": params.train_input.micro_batch_size, "remat": remat}))
            found = [stages[-1].program] + ([_before_data_parallel(stages)] if len(names) > 1 else [])
            compiled.append(f"train (dumps in {Path(model_dir) / 'compile'}/)")
        train_program, no_sync = found[0], (found[1] if len(found) > 1 else None)
    if evaluate:
        wanted = artifact.fingerprint(original or params, "eval", target=tgt.name)
        found = _load_saved(store, ["eval"], wanted, program_dir, say)
        if found is None:

            eval_stages = compile_step(params, "eval", target=tgt)
            eval_program = eval_stages[-1].program
            if ranks.main:
                _write_cache(lambda: artifact.save_stages(store, "eval", eval_stages, wanted))
            compiled.append("eval")
        else:
            eval_program = found[0]
    if compiled:
        say(f"compiled {' and '.join(compiled)} in {time.perf_counter() - t0:.1f} s; saved in {store}/")
    return Programs(train_program, no_sync, eval_program)


def _load_saved(store: Path, names: list[str], wanted: dict, program_dir, say) -> Optional[list]:
    """The saved programs ``names`` when all match ``wanted``; else None (saying why), or an
    error when the user named the folder (``--program``)."""

    found = []
    for name in names:
        where, why = artifact.find(store, name, wanted)
        if where is None:
            if program_dir:
                raise UserError(Problem(str(Path(program_dir) / name), "--program", f"does not match this run: {why}"))
            say(f"compiling {names[0]}: {why}")
            return None
        t0 = time.perf_counter()
        found.append(artifact.load(where))
        say(f"loaded program {where} in {time.perf_counter() - t0:.2f} s (nothing traced; program sha256 "
            f"{artifact.program_sha256(found[-1])[:12]})")
    return found


def _compile_train(params, tgt, remat, world, zero, bucket_bytes, rb, update: bool = False) -> list:
    return compile_step(params, "train", target=tgt, remat=remat, world_size=world,
                        micro_batch_size=rb.micro_batch if world > 1 else None,
                        accumulate=world > 1 and rb.micro_batches > 1, zero=zero, bucket_bytes=bucket_bytes,
                        optimizer_in_program=update)


def _before_data_parallel(stages) -> Program:
    """Earlier micro-steps of a data-parallel step: the program before the collectives."""
    return next(a.program for a, b in zip(stages, stages[1:]) if b.name == "data_parallel")


def _dumps_and_program(stages, model_dir, params_path, tgt, store: Path, wanted: dict, resolved: dict) -> None:
    write_dumps(stages, model_dir, params_path, None, tgt)
    artifact.save_stages(store, "train", stages, wanted, resolved)


def _write_cache(write) -> None:
    """The dumps and the saved programs are a cache of the compile: when they cannot be written
    (a full disk) the run says so and goes on with the programs it holds."""
    try:
        write()
    except OSError as err:
        print(f"mmgraph: warning: could not save the dumps or the compiled program ({err.strerror or err}); "
              f"training goes on, the next run compiles again", file=sys.stderr)


def _data_parallel_line(params, ranks, runner, zero: int) -> str:
    rb = rank_batch(params.train_input.batch_size, params.train_input.micro_batch_size, ranks.world_size)
    mine, whole = optimizer_state_bytes(runner.optimizer, runner.weights, runner.trainable)
    buckets = runner.train_program.collectives
    return (f"data parallel: {ranks.world_size} ranks, each {rb.batch} samples of the global batch "
            f"{params.train_input.batch_size} in {rb.micro_batches} micro-batch(es) of {rb.micro_batch}; "
            f"{len(buckets)} gradient bucket(s), {sum(b.bytes for b in buckets) / 1e6:.2f} MB reduced per step; "
            f"{'ZeRO-' + str(zero) if zero else 'no ZeRO'}: optimizer state {mine / 1e6:.2f} MB on rank 0 "
            f"(whole: {whole / 1e6:.2f} MB)")


def _start_weights(params, runner, checkpoint_path, say) -> None:
    """Resume from model_dir's checkpoints, else load the initial weights, if any (a Model Zoo
    .mdl: its weights, and its step and optimizer state as ``load_checkpoint_states`` asks)."""

    resumed = runner.resume()
    initial = checkpoint_path or params.runconfig.checkpoint_path
    if resumed:
        note = f"; initial weights {initial} not loaded: resuming" if initial else ""
        say(f"resumed from {resumed} (step {runner.step}){note}")
        runner.truncate_metrics()
    elif initial and is_modelzoo_checkpoint(initial):

        opt = params.optimizer.optimizer_type if params.optimizer else None
        start = training_start(Path(initial), params.model, params.runconfig.load_checkpoint_states,
                               runner.trainable, runner.no_decay, opt,
                               {k: tuple(v.shape) for k, v in runner.weights.items()})
        runner.load_initial(str(start.path), start.weights)
        for note in start.notes:
            say(f"note: {note}")
        if start.step:
            runner.start_at(start.step, start.optimizer)
            say(f"initial weights from {start.path} (the Model Zoo's .mdl), step {start.step}"
                + (", optimizer state" if start.optimizer else ""))
        else:
            say(f"initial weights from {start.path} (the Model Zoo's .mdl)")
    elif initial:
        states = params.runconfig.load_checkpoint_states
        if states is not None and {s.strip() for s in states.split(",")} - {"model"}:
            raise UserError(Problem(params.path, "runconfig.load_checkpoint_states", f"{states!r}: initial "
                                    "checkpoints load the model only (a run in the same model_dir resumes all)"))
        runner.load_initial(initial)
        say(f"initial weights from {initial}")
