"""The training loop: steps of micro-batches from the loader through the Runner, logs,
checkpoints at ``checkpoint_steps``, evaluation at ``eval_steps``.

The data position is arithmetic on the step count (a prefetching loader's sampler runs ahead of
what was used): one process counts loader batches; data-parallel ranks count global batches, so
a run resumes at the same sample with any world size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mmgraph.core.config import Params, rank_batch
from mmgraph.core.errors import Problem, UserError
from mmgraph.runtime import checkpoint
from mmgraph.runtime.distributed import SINGLE, Ranks
from mmgraph.runtime.runner import Runner, pad_batch


def loader_batch(params: Params, ranks: Ranks) -> int:
    """This rank's loader batch: the largest size that divides both its part of the batch and
    its micro-batch, so a batch that is not a multiple of micro_batch_size (the Model Zoo's 7B
    phase 1: 220/24) is still a whole number of loader batches."""
    rb = rank_batch(params.train_input.batch_size, params.train_input.micro_batch_size, ranks.world_size)
    return math.gcd(rb.batch, rb.micro_batch)


def _position(sampler, loader_batches_per_epoch: int, batches_done: int) -> None:
    """Put the sampler where ``batches_done`` micro-batches of training leave it."""
    sampler.epoch = batches_done // loader_batches_per_epoch
    sampler.consumed = (batches_done % loader_batches_per_epoch) * sampler.batch_size


def _batches(loader):
    """Micro-batches forever, epoch after epoch (the sampler reshuffles per epoch)."""
    while True:
        for batch in loader:
            yield batch


def step_batches(stream, loader_batches: int, mbs: int) -> list[dict]:
    """One batch as micro-batches of ``mbs`` rows: loader batches joined and split, the last,
    short one padded with unsupervised rows (``rows``: how many are real)."""
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


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream is after ``step`` optimizer steps, saved in every checkpoint:
    ``batches_done`` (in one process's loader batches) and ``samples_done`` (global samples)."""

    first_step: int
    start: int                 # batches of ``unit`` samples done at first_step
    per_step: int              # such batches per step
    unit: int                  # samples per counted batch: a loader batch, or a global batch (data parallel)
    single: int                # one process's loader batch

    def at(self, step: int) -> dict:
        samples = (self.start + (step - self.first_step) * self.per_step) * self.unit
        return {"batches_done": samples // self.single, "samples_done": samples}


def place_data(params: Params, runner: Runner, sampler, ranks: Ranks) -> DataPosition:
    """Position the sampler where the resumed checkpoint left the data; the position saver."""
    data = params.train_input
    saved = runner.sampler_state or {}
    single = loader_batch(params, SINGLE)
    if ranks.world_size == 1:
        size = single
        per_step = data.batch_size // size
        per_epoch = len(sampler) // size if data.drop_last else math.ceil(len(sampler) / size)
        if per_epoch == 0:
            raise UserError(Problem(params.path, "train_input.batch_size", f"fewer samples ({len(sampler)}) "
                                    f"than one loader batch ({size})"))
        start = saved.get("batches_done", runner.step * per_step)   # where the checkpoint left the data
        _position(sampler, per_epoch, start)
        return DataPosition(runner.step, start, per_step, size, single)
    base, global_batch = sampler.base, data.batch_size
    per_epoch = base.n // global_batch                              # whole global batches only
    if per_epoch == 0:
        raise UserError(Problem(params.path, "train_input.batch_size", f"fewer samples ({base.n}) than one "
                                f"global batch ({global_batch})"))
    samples = saved.get("samples_done", saved.get("batches_done", runner.step * global_batch // single) * single)
    start = samples // global_batch
    base.epoch, base.consumed = start // per_epoch, (start % per_epoch) * global_batch
    return DataPosition(runner.step, start, 1, global_batch, single)


def train(params: Params, runner: Runner, train_loader, eval_loader, max_steps: Optional[int],
          ranks: Ranks, say: Callable[[str], None] = print) -> None:
    """Train to ``max_steps``, saving at ``checkpoint_steps`` and at the end; evaluate at
    ``eval_steps``. Rank 0 prints and logs."""
    if not max_steps:
        raise UserError(Problem(params.path, "runconfig.max_steps", "required to train (or pass --max_steps)"))
    loader, sampler = train_loader
    data = params.train_input
    rb = rank_batch(data.batch_size, data.micro_batch_size, ranks.world_size)
    per_step = rb.batch // loader_batch(params, ranks)
    position = place_data(params, runner, sampler, ranks)
    first = runner.step
    stream = _batches(loader)
    rc = params.runconfig
    tokens_per_sample = params.layout().max_sequence_length
    bar = None
    if sys.stderr.isatty() and ranks.main:
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=runner.step, desc="train", unit="step")
        say = bar.write
    window = time.perf_counter()
    saved_at = runner.step if checkpoint_is_at(runner) else None   # decided alike on every rank
    while runner.step < max_steps:
        result = _guarded(ranks, runner, lambda: runner.train_step(step_batches(stream, per_step, rb.micro_batch)))
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
            say(f"step {result.step}/{max_steps}  loss {result.loss:.4f}  lr {result.lr:.2e}  "
                f"{sps:.1f} samples/s  {record['tokens_per_s']:.0f} tokens/s "
                f"({record['real_tokens_per_s']:.0f} real)  eta {eta:.0f} s")
        if rc.checkpoint_steps and result.step % rc.checkpoint_steps == 0:
            _guarded(ranks, runner, lambda: runner.save(position.at(runner.step)))
            saved_at = result.step
        if eval_loader is not None and rc.eval_steps and result.step % rc.eval_steps == 0 and result.step < max_steps:
            metrics = _guarded(ranks, runner, lambda: runner.evaluate(list(eval_loader[0])))
            runner.log({"step": result.step, **metrics}, "eval")
            say(f"eval at step {result.step}: loss {metrics['eval_loss']:.4f}, "
                f"answer accuracy {metrics['answer_accuracy']:.3f}")
    if bar is not None:
        bar.close()
    if saved_at != runner.step:
        _guarded(ranks, runner, lambda: runner.save(position.at(runner.step)))


def _guarded(ranks: Ranks, runner: Runner, work: Callable):
    """``work()``; with several ranks, a collective that fails (a rank died, or did not answer
    within the process group's timeout) ends this rank with a message, not a hang."""
    if ranks.world_size == 1:
        return work()
    try:
        return work()
    except (RuntimeError, torch.distributed.DistError) as err:
        if not _is_communication(err):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        last = checkpoint.latest(runner.model_dir)
        raise UserError(Problem(None, f"rank {ranks.rank}", f"lost the other ranks during step {runner.step + 1} "
                                f"(a rank died or did not answer in time; torchrun names the rank that failed): "
                                f"{first}; last checkpoint: {last or 'none'}")) from None


def _is_communication(err: BaseException) -> bool:
    names = {type(err).__name__, *(c.__name__ for c in type(err).__mro__)}
    text = str(err).lower()
    return bool(names & {"DistError", "DistBackendError", "DistNetworkError"}) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))


def checkpoint_is_at(runner: Runner) -> bool:
    last = checkpoint.latest(runner.model_dir)
    return last is not None and last.name == f"ckpt-{runner.step:06d}"


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


def check_memory(params: Params, device: str, ranks: Ranks) -> None:
    """Before anything is allocated: a step holds its (rank's) batch's tensors, a micro-batch at
    least one saved activation per layer; refuse sizes that cannot fit in the memory available
    (a lower bound: passing is no promise, failing is certain). Ranks on one machine share it."""
    data, lay, text = params.train_input, params.layout(), params.model.text_model
    rb = rank_batch(data.batch_size, data.micro_batch_size, ranks.world_size)
    seq, imgs = lay.max_sequence_length, lay.max_num_img
    sample = 8 * (5 * seq + imgs * lay.num_patches) + 4 * imgs * math.prod(lay.image_data_size)
    activation = 4 * seq * text.hidden_size * text.num_hidden_layers
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device == "cpu" else 1
    held, working = local * rb.batch * sample, local * rb.micro_batch * activation
    avail = _available_bytes(device)
    if held + working > avail:
        key = "batch_size" if held >= working else "micro_batch_size"
        raise UserError(Problem(params.path, f"train_input.{key}", f"a step needs at least "
                                f"{(held + working) / 1e9:,.1f} GB ({rb.batch} samples of {sample:,} bytes held "
                                f"for the step, {rb.micro_batch} x {activation:,} bytes of activations per "
                                f"micro-batch{f', x {local} ranks' if local > 1 else ''}); "
                                f"{avail / 1e9:,.1f} GB of {device} memory are available"))
