"""``mmgraph run``: train and evaluate the lowered program (the Model Zoo's run.py arguments)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mmgraph.config import load_params
from mmgraph.errors import Problem, UserError


def _device(name: Optional[str]) -> str:
    if name in (None, "CPU"):
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(Problem(None, "GPU", "no CUDA device is available (use CPU)"))
    return "cuda"


def _position(sampler, loader_batches_per_epoch: int, batches_done: int) -> None:
    """Put the sampler where ``batches_done`` micro-batches of training leave it."""
    sampler.epoch = batches_done // loader_batches_per_epoch
    sampler.consumed = (batches_done % loader_batches_per_epoch) * sampler.batch_size


def _batches(loader):
    """Micro-batches forever, epoch after epoch (the sampler reshuffles per epoch)."""
    while True:
        for batch in loader:
            yield batch


def run(params_path: str, model_dir: str, mode: str, device: Optional[str] = None,
        checkpoint_path: Optional[str] = None, max_steps: Optional[int] = None, target: str = "cs2",
        executor: str = "reference", eval_executor: Optional[str] = None, weight_streaming: bool = False) -> int:
    from mmgraph.dump import write_dumps
    from mmgraph.pipeline import compile_step
    from mmgraph.runtime.data import make_loader
    from mmgraph.runtime.runner import Runner
    from mmgraph.target import load_target

    params = load_params(params_path, mode)
    dev = _device(device)
    train_mode = mode in ("train", "train_and_eval")

    # Data first: a missing data_dir or image folder is reported before any compute.
    train_loader = make_loader(params, "train") if train_mode else None
    eval_loader = make_loader(params, "eval") if mode in ("eval", "train_and_eval") else None

    t0 = time.perf_counter()
    tgt = load_target(target)
    train_program = eval_program = None
    if train_mode:
        stages = compile_step(params, "train", target=tgt)
        write_dumps(stages, model_dir, params_path, None, tgt)
        train_program = stages[-1].program
    if eval_loader is not None:
        eval_program = compile_step(params, "eval", target=tgt if weight_streaming else None)[-1].program
    print(f"compiled in {time.perf_counter() - t0:.1f} s; dumps in {Path(model_dir) / 'compile'}/")

    runner = Runner(params, model_dir, train_program, eval_program, dev, executor=executor,
                    eval_executor=eval_executor, weight_streaming=weight_streaming)
    resumed = runner.resume()
    initial = checkpoint_path or params.runconfig.checkpoint_path
    if resumed:
        note = f"; initial weights {initial} not loaded: resuming" if initial else ""
        print(f"resumed from {resumed} (step {runner.step}){note}")
    elif initial:
        states = params.runconfig.load_checkpoint_states
        if states is not None and {s.strip() for s in states.split(",")} - {"model"}:
            raise UserError(Problem(params.path, "runconfig.load_checkpoint_states", f"{states!r}: initial "
                                    "checkpoints load the model only (a run in the same model_dir resumes all)"))
        runner.load_initial(initial)
        print(f"initial weights from {initial}")

    if train_mode:
        _train(params, runner, train_loader, eval_loader, max_steps or params.runconfig.max_steps, mode)
    if eval_loader is not None:
        metrics = runner.evaluate(list(eval_loader[0]))
        runner.log({"step": runner.step, **metrics}, "eval")
        print(f"eval at step {runner.step}: loss {metrics['eval_loss']:.4f}, perplexity "
              f"{metrics['perplexity']:.2f}, token accuracy {metrics['token_accuracy']:.3f}, answer accuracy "
              f"{metrics['answer_accuracy']:.3f} ({metrics['answers']} answers)")
    runner.close()
    print(f"model_dir {model_dir}: compile/ (dumps, report.html), checkpoints/, metrics.jsonl, "
          f"events/ (tensorboard --logdir {Path(model_dir) / 'events'})")
    return 0


def _train(params, runner, train_loader, eval_loader, max_steps: Optional[int], mode: str) -> None:
    if not max_steps:
        raise UserError(Problem(params.path, "runconfig.max_steps", "required to train (or pass --max_steps)"))
    loader, sampler = train_loader
    data = params.train_input
    mbs = data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size
    n_micro = data.batch_size // mbs
    per_epoch = len(sampler) // mbs if data.drop_last else math.ceil(len(sampler) / mbs)
    if per_epoch == 0:
        raise UserError(Problem(params.path, "train_input.batch_size", f"fewer samples ({len(sampler)}) "
                                f"than one micro-batch ({mbs})"))
    _position(sampler, per_epoch, runner.step * n_micro)
    stream = _batches(loader)
    rc = params.runconfig
    tokens_per_sample = params.layout().max_sequence_length
    show_bar = sys.stderr.isatty()
    bar = None
    if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=runner.step, desc="train", unit="step")
    first = runner.step
    window = time.perf_counter()
    while runner.step < max_steps:
        result = runner.train_step([next(stream) for _ in range(n_micro)])
        sps = result.samples / result.seconds
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", samples_s=f"{sps:.1f}")
        if result.step % rc.log_steps == 0 or result.step == max_steps:
            record = {"step": result.step, "loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                      "samples_per_s": sps, "tokens_per_s": result.samples * tokens_per_sample / result.seconds,
                      "real_tokens_per_s": result.tokens / result.seconds}       # non-pad tokens
            runner.log(record)
            elapsed = time.perf_counter() - window
            eta = elapsed / max(result.step - first, 1) * (max_steps - result.step)
            line = (f"step {result.step}/{max_steps}  loss {result.loss:.4f}  lr {result.lr:.2e}  "
                    f"{sps:.1f} samples/s  {record['tokens_per_s']:.0f} tokens/s "
                    f"({record['real_tokens_per_s']:.0f} real)  eta {eta:.0f} s")
            (bar.write if bar is not None else print)(line)
        if rc.checkpoint_steps and result.step % rc.checkpoint_steps == 0:
            runner.save({"batches_done": runner.step * n_micro})
        if eval_loader is not None and rc.eval_steps and result.step % rc.eval_steps == 0 and result.step < max_steps:
            metrics = runner.evaluate(list(eval_loader[0]))
            runner.log({"step": result.step, **metrics}, "eval")
            (bar.write if bar is not None else print)(
                f"eval at step {result.step}: loss {metrics['eval_loss']:.4f}, answer accuracy {metrics['answer_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    if not checkpoint_is_at(runner):
        runner.save({"batches_done": runner.step * n_micro})


def checkpoint_is_at(runner) -> bool:
    from mmgraph.runtime import checkpoint

    last = checkpoint.latest(runner.model_dir)
    return last is not None and last.name == f"ckpt-{runner.step:06d}"
