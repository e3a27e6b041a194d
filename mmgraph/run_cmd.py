"""``mmgraph run``: train and evaluate the lowered program (the Model Zoo's run.py arguments)."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mmgraph.config import load_params
from mmgraph.errors import Problem, UserError
from mmgraph.lock import model_dir_lock


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


def run(params_path: str, model_dir: str, *args, **kwargs) -> int:
    """Train and/or evaluate, holding the model_dir's lock (one run or compile at a time)."""
    with model_dir_lock(model_dir, "run"):
        return _run(params_path, model_dir, *args, **kwargs)


def _run(params_path: str, model_dir: str, mode: str, device: Optional[str] = None,
        checkpoint_path: Optional[str] = None, max_steps: Optional[int] = None, target: str = "cs2",
        executor: str = "reference", eval_executor: Optional[str] = None, weight_streaming: bool = False,
        remat: Optional[str] = None) -> int:
    from mmgraph.dump import write_dumps
    from mmgraph.pipeline import compile_step
    from mmgraph.runtime.data import make_loader
    from mmgraph.runtime.runner import Runner
    from mmgraph.target import load_target

    params = load_params(params_path, mode)
    dev = _device(device)
    train_mode = mode in ("train", "train_and_eval")

    # Data first: a missing data_dir or image folder is reported before any compute.
    train_loader = make_loader(params, "train", batch_size=_loader_batch(params.train_input)) if train_mode else None
    eval_loader = make_loader(params, "eval") if mode in ("eval", "train_and_eval") else None
    if train_mode:
        check_memory(params, dev)

    t0 = time.perf_counter()
    tgt = load_target(target)
    train_program = eval_program = None
    if train_mode:
        stages = compile_step(params, "train", target=tgt, remat=remat)
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
        runner.truncate_metrics()
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


def _loader_batch(data) -> int:
    """The loader's batch: the largest size that divides both batch_size and micro_batch_size,
    so a batch that is not a multiple of micro_batch_size (the Model Zoo's 7B phase 1: 220/24)
    is still a whole number of loader batches."""
    mbs = data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size
    return math.gcd(data.batch_size, mbs)


def _available_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_memory(params, device: str) -> None:
    """Before anything is allocated: a step holds its whole batch's tensors, a micro-batch at
    least one saved activation per layer; refuse sizes that cannot fit in the memory available
    (a lower bound: passing is no promise, failing is certain)."""
    data, lay, text = params.train_input, params.layout(), params.model.text_model
    mbs = data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size
    seq, imgs = lay.max_sequence_length, lay.max_num_img
    sample = 8 * (5 * seq + imgs * lay.num_patches) + 4 * imgs * math.prod(lay.image_data_size)
    activation = 4 * seq * text.hidden_size * text.num_hidden_layers
    held, working = data.batch_size * sample, mbs * activation
    avail = _available_bytes(device)
    if held + working > avail:
        key = "batch_size" if held >= working else "micro_batch_size"
        raise UserError(Problem(params.path, f"train_input.{key}", f"a step needs at least "
                                f"{(held + working) / 1e9:,.1f} GB ({data.batch_size} samples of {sample:,} bytes held "
                                f"for the step, {mbs} x {activation:,} bytes of activations per micro-batch); "
                                f"{avail / 1e9:,.1f} GB of {device} memory are available"))


def _step_batches(stream, loader_batches: int, mbs: int) -> list[dict]:
    """One batch as micro-batches of ``mbs`` rows: loader batches joined and split, the last,
    short one padded with unsupervised rows (``rows``: how many are real)."""
    from mmgraph.runtime.runner import pad_batch

    parts = [next(stream) for _ in range(loader_batches)]
    if all(p["labels"].shape[0] == mbs for p in parts):
        return parts
    whole = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    n = whole["labels"].shape[0]
    out = []
    for start in range(0, n, mbs):
        chunk = {k: v[start:start + mbs] for k, v in whole.items()}
        rows = chunk["labels"].shape[0]
        out.append({**pad_batch(chunk, mbs), "rows": rows})
    return out


def _train(params, runner, train_loader, eval_loader, max_steps: Optional[int], mode: str) -> None:
    if not max_steps:
        raise UserError(Problem(params.path, "runconfig.max_steps", "required to train (or pass --max_steps)"))
    loader, sampler = train_loader
    data = params.train_input
    mbs = data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size
    size = _loader_batch(data)
    per_step = data.batch_size // size
    per_epoch = len(sampler) // size if data.drop_last else math.ceil(len(sampler) / size)
    if per_epoch == 0:
        raise UserError(Problem(params.path, "train_input.batch_size", f"fewer samples ({len(sampler)}) "
                                f"than one loader batch ({size})"))
    first = runner.step
    start = (runner.sampler_state or {}).get("batches_done", first * per_step)   # where the checkpoint left the data
    _position(sampler, per_epoch, start)
    stream = _batches(loader)
    rc = params.runconfig
    tokens_per_sample = params.layout().max_sequence_length
    show_bar = sys.stderr.isatty()
    bar = None
    if show_bar:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=runner.step, desc="train", unit="step")
    window = time.perf_counter()
    position = {"batches_done": start}
    while runner.step < max_steps:
        result = runner.train_step(_step_batches(stream, per_step, mbs))
        position = {"batches_done": start + (runner.step - first) * per_step}
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
            runner.save(position)
        if eval_loader is not None and rc.eval_steps and result.step % rc.eval_steps == 0 and result.step < max_steps:
            metrics = runner.evaluate(list(eval_loader[0]))
            runner.log({"step": result.step, **metrics}, "eval")
            (bar.write if bar is not None else print)(
                f"eval at step {result.step}: loss {metrics['eval_loss']:.4f}, answer accuracy {metrics['answer_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    if not checkpoint_is_at(runner):
        runner.save(position)


def checkpoint_is_at(runner) -> bool:
    from mmgraph.runtime import checkpoint

    last = checkpoint.latest(runner.model_dir)
    return last is not None and last.name == f"ckpt-{runner.step:06d}"
