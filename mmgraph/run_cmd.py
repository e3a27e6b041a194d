"""``mmgraph run``: train and evaluate the lowered program (the Model Zoo's run.py arguments)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mmgraph.core.config import load_params, rank_batch
from mmgraph.core.ir import Program
from mmgraph.core.errors import Problem, UserError
from mmgraph.lock import model_dir_lock


def _device(name: Optional[str]) -> str:
    if name in (None, "CPU"):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(Problem(None, "GPU", "no CUDA device is available (use CPU)"))
    return "cuda"


def run(params_path: str, model_dir: str, *args, **kwargs) -> int:
    """Train and/or evaluate, holding the model_dir's lock (one run or compile at a time; of a
    data-parallel job, rank 0 holds it)."""
    if os.environ.get("RANK", "0") != "0":
        return _run(params_path, model_dir, *args, **kwargs)
    with model_dir_lock(model_dir, "run"):
        return _run(params_path, model_dir, *args, **kwargs)


def _silent(*_args, **_kwargs) -> None:
    return None


def _run(params_path: str, model_dir: str, mode: str, device: Optional[str] = None,
         checkpoint_path: Optional[str] = None, max_steps: Optional[int] = None, target: str = "cs2",
         executor: str = "reference", eval_executor: Optional[str] = None, weight_streaming: bool = False,
         remat: Optional[str] = None, zero: int = 0, bucket_bytes: Optional[int] = None) -> int:
    from mmgraph.runtime.distributed import from_env

    params = load_params(params_path, mode)
    dev = _device(device)
    ranks = from_env(dev)                       # torchrun's ranks: joins the process group
    try:
        return _run_ranks(params, params_path, model_dir, mode, dev, ranks, checkpoint_path, max_steps, target,
                          executor, eval_executor, weight_streaming, remat, zero, bucket_bytes)
    finally:
        if ranks.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _run_ranks(params, params_path, model_dir, mode, dev, ranks, checkpoint_path, max_steps, target, executor,
               eval_executor, weight_streaming, remat, zero, bucket_bytes) -> int:
    from mmgraph.models import initial_weights
    from mmgraph.runtime.data import make_loader
    from mmgraph.runtime.distributed import rank_share
    from mmgraph.runtime.runner import Runner
    from mmgraph.runtime.train import check_memory, loader_batch, train

    say = print if ranks.main else _silent
    train_mode = mode in ("train", "train_and_eval")
    if train_mode and ranks.world_size > 1:
        rank_share(params.train_input.batch_size, ranks, params.path, "train_input.batch_size")
    # Data first: a missing data_dir or image folder is reported before any compute.
    train_loader = (make_loader(params, "train", batch_size=loader_batch(params, ranks), ranks=ranks)
                    if train_mode else None)
    eval_loader = make_loader(params, "eval") if mode in ("eval", "train_and_eval") else None
    if train_mode:
        check_memory(params, dev, ranks)

    programs = _programs(params, params_path, model_dir, target, remat, ranks, zero, bucket_bytes, weight_streaming,
                         train_mode, eval_loader is not None, say)
    runner = Runner(params, model_dir, programs.train, programs.eval, dev, executor=executor,
                    eval_executor=eval_executor, weight_streaming=weight_streaming,
                    weights=initial_weights(params), ranks=ranks, no_sync=programs.no_sync,
                    zero=zero if ranks.world_size > 1 else 0)
    if ranks.world_size > 1 and train_mode:
        say(_data_parallel_line(params, ranks, runner, zero))
    _start_weights(params, runner, checkpoint_path, say)
    if train_mode:
        train(params, runner, train_loader, eval_loader, max_steps or params.runconfig.max_steps, ranks, say)
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


@dataclass(frozen=True)
class Programs:
    train: Optional[Program]              # the last micro-step's program (data parallel: reduces)
    no_sync: Optional[Program]            # data parallel, several micro-steps: the ones before the last
    eval: Optional[Program]


def _programs(params, params_path, model_dir, target, remat, ranks, zero, bucket_bytes, weight_streaming,
              train_mode, evaluate, say) -> Programs:
    """Compile what the run executes (dumps in MODEL_DIR/compile, written by rank 0)."""
    from mmgraph.dump import write_dumps
    from mmgraph.pipeline import compile_step
    from mmgraph.core.target import load_target

    t0 = time.perf_counter()
    tgt = load_target(target)
    train_program = eval_program = no_sync = None
    if train_mode:
        world = ranks.world_size
        rb = rank_batch(params.train_input.batch_size, params.train_input.micro_batch_size, world)
        stages = compile_step(params, "train", target=tgt, remat=remat, world_size=world,
                              micro_batch_size=rb.micro_batch if world > 1 else None,
                              accumulate=world > 1 and rb.micro_batches > 1, zero=zero, bucket_bytes=bucket_bytes)
        if ranks.main:
            write_dumps(stages, model_dir, params_path, None, tgt)
        train_program = stages[-1].program
        if world > 1 and rb.micro_batches > 1:          # earlier micro-steps: the program before the collectives
            no_sync = next(a.program for a, b in zip(stages, stages[1:]) if b.name == "data_parallel")
    if evaluate:
        eval_program = compile_step(params, "eval", target=tgt if weight_streaming else None)[-1].program
    say(f"compiled in {time.perf_counter() - t0:.1f} s; dumps in {Path(model_dir) / 'compile'}/")
    return Programs(train_program, no_sync, eval_program)


def _data_parallel_line(params, ranks, runner, zero: int) -> str:
    from mmgraph.runtime.zero import optimizer_state_bytes

    rb = rank_batch(params.train_input.batch_size, params.train_input.micro_batch_size, ranks.world_size)
    mine, whole = optimizer_state_bytes(runner.optimizer, runner.weights, runner.trainable)
    buckets = runner.train_program.collectives
    return (f"data parallel: {ranks.world_size} ranks, each {rb.batch} samples of the global batch "
            f"{params.train_input.batch_size} in {rb.micro_batches} micro-batch(es) of {rb.micro_batch}; "
            f"{len(buckets)} gradient bucket(s), {sum(b.bytes for b in buckets) / 1e6:.2f} MB reduced per step; "
            f"{'ZeRO-' + str(zero) if zero else 'no ZeRO'}: optimizer state {mine / 1e6:.2f} MB on rank 0 "
            f"(whole: {whole / 1e6:.2f} MB)")


def _start_weights(params, runner, checkpoint_path, say) -> None:
    """Resume from model_dir's checkpoints, else load the initial weights, if any."""
    resumed = runner.resume()
    initial = checkpoint_path or params.runconfig.checkpoint_path
    if resumed:
        note = f"; initial weights {initial} not loaded: resuming" if initial else ""
        say(f"resumed from {resumed} (step {runner.step}){note}")
        runner.truncate_metrics()
    elif initial:
        states = params.runconfig.load_checkpoint_states
        if states is not None and {s.strip() for s in states.split(",")} - {"model"}:
            raise UserError(Problem(params.path, "runconfig.load_checkpoint_states", f"{states!r}: initial "
                                    "checkpoints load the model only (a run in the same model_dir resumes all)"))
        runner.load_initial(initial)
        say(f"initial weights from {initial}")
