"""Train and evaluate by executing the lowered program (not the nn.Module).

The parameter store holds every weight by name; each micro-step feeds the program its
parameters and the batch in the program's input order and gets back the loss and the
gradients of the trainable weights, which are accumulated over ``batch_size /
micro_batch_size`` micro-batches, clipped and applied by the optimizer.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mmgraph.core.config import Params, rank_batch
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import GRAD_WEIGHT, LOSS_SCALE, InputKind, Program
from mmgraph.core.rng import rng_inputs
from mmgraph.core.update import UpdateRule, step_scalars
from mmgraph.runtime import checkpoint
from mmgraph.runtime.distributed import SINGLE, Ranks, all_sum, bind_group
from mmgraph.runtime.executors import Executor, make_executor
from mmgraph.runtime.gradients import Claims, accumulate
from mmgraph.runtime.host_memory import keep_freed_memory
from mmgraph.runtime.optim import LossScaler, Optimizer, learning_rate
from mmgraph.runtime.zero import GradShardOptimizer, ShardedOptimizer


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float
    seconds: float
    samples: int
    tokens: int


class Runner:
    def __init__(self, params: Params, model_dir: str | Path, train: Optional[Program] = None,
                 eval_program: Optional[Program] = None, device: str = "cpu", executor: str = "reference",
                 eval_executor: Optional[str] = None, weight_streaming: bool = False, *,
                 weights: dict[str, torch.Tensor], ranks: Ranks = SINGLE, no_sync: Optional[Program] = None,
                 zero: int = 0, no_decay: frozenset[str] = frozenset()):
        """``weights``: every weight by name (the initializer's or a checkpoint's), taken over.
        ``no_decay``: the weights weight decay skips (the Model Zoo's rule: biases and norms).
        ``weight_streaming``: the parameter store (weights, optimizer state) stays in host
        memory and each segment's weights are streamed to ``device`` when it runs.
        Data parallel (``ranks``): ``train`` is the program compiled for the world size (its
        collectives reduce the gradients), run for the last micro-batch of a step; ``no_sync`` the
        plain program for the micro-batches before it; ``zero`` 1 or 2 shards the optimizer."""
        self.params, self.model_dir, self.device = params, Path(model_dir), torch.device(device)
        if self.device.type == "cpu":
            keep_freed_memory()              # the steps' activations are not unmapped and faulted in again
        self.ranks, self.zero, self.no_decay = ranks, zero, frozenset(no_decay)
        self.store_device = torch.device("cpu") if weight_streaming else self.device
        self.train_program, self.eval_program, self.no_sync = train, eval_program, no_sync
        if weight_streaming:
            executor = eval_executor = "streaming"
        if train is not None and train.world_size > 1:
            _check_data_parallel(train, ranks, executor, weight_streaming)
            if any(s.kind == InputKind.GRAD for s in train.inputs) != (no_sync is not None):
                raise ValueError("an accumulating data-parallel program runs with a no-sync program, and only then")
            bind_group(train.gm, ranks.group)
        self.train_exec: Optional[Executor] = make_executor(executor, train, params, self.device) if train else None
        self.no_sync_exec = make_executor(executor, no_sync, params, self.device) if no_sync else None
        self.eval_exec: Optional[Executor] = (make_executor(eval_executor or executor, eval_program, params, self.device)
                                              if eval_program else None)
        torch.manual_seed(rank_seed(params.runconfig.seed, ranks.rank))
        pin = weight_streaming and self.device.type == "cuda"
        self.weights = {k: (v.detach().pin_memory() if pin else v.detach().to(self.store_device))
                        for k, v in weights.items()}
        self.trainable = [s.name for s in (train.inputs if train else []) if s.kind == InputKind.PARAM and s.trainable]
        self._dropout = train is not None and any(s.kind == InputKind.RNG for s in train.inputs)
        self._update = train is not None and any(o.kind == "param_update" for o in train.outputs)
        self._rule = UpdateRule.of(params.optimizer) if self._update and params.optimizer else None
        if self._update and (train.world_size > 1 or weight_streaming or zero):
            raise UserError(Problem(None, "--optimizer_in_program", "runs in one process, without --zero and "
                                    "--weight_streaming (the update reads every weight at once)"))
        self.optimizer = self._optimizer() if params.optimizer else None
        scaled = train is not None and any(s.name == LOSS_SCALE for s in train.inputs)
        self.scaler: Optional[LossScaler] = LossScaler(params.optimizer) if scaled and params.optimizer else None
        self.step = 0
        self.sampler_state: Optional[dict] = None
        self.metrics_path = self.model_dir / "metrics.jsonl"
        self._events = None
        self._log_failed = False

    def _optimizer(self):
        """The whole optimizer, or this rank's shard of it (ZeRO-1: state; ZeRO-2: state and
        gradients, as the program's reduce-scatter hands them)."""
        cfg, ranks = self.params.optimizer, self.ranks
        decay = {n: False for n in self.no_decay}
        if self.zero == 1 and ranks.world_size > 1:
            return ShardedOptimizer(cfg, self.weights, self.trainable, ranks.rank, ranks.world_size, decay=decay)
        if self.zero == 2 and ranks.world_size > 1:
            return GradShardOptimizer(cfg, self.weights, self.train_program.collectives, ranks.rank, ranks.world_size,
                                      no_decay=self.no_decay)
        return Optimizer(cfg, self.weights, decay)

    # -- weights -------------------------------------------------------------------------
    def _expected(self) -> dict[str, tuple[tuple, torch.dtype]]:
        """Every weight the run holds (the program's parameters and the rest of the model)."""
        return {k: (tuple(v.shape), v.dtype) for k, v in self.weights.items()}

    def load_initial(self, path: str, loaded: Optional[dict[str, torch.Tensor]] = None) -> None:
        """Initial weights (the model only) from a checkpoint, model_dir or converted folder (or
        ``loaded``, read from ``path`` by the caller): every key and shape checked (floating
        dtypes are cast) before anything is copied."""
        loaded = checkpoint.load_weights(path) if loaded is None else loaded
        strict = not self.params.runconfig.disable_strict_checkpoint_loading
        expected = self._expected()
        problems = [p for p in checkpoint.check_tensors(path, loaded, expected, exact_dtype=False)
                    if p.message != "not in the program (unexpected)" and (strict or p.message != "missing")]
        if problems:
            hint = " (set runconfig.disable_strict_checkpoint_loading to allow missing weights)" if strict else ""
            raise UserError(problems + [Problem(path, None, f"initial weights refused{hint}")])
        for k, v in loaded.items():
            if k in self.weights:
                self.weights[k].copy_(v)

    def start_at(self, step: int, optimizer_state: Optional[dict] = None) -> None:
        """Continue another tool's run at ``step`` (the schedule and the data go on from there),
        with its optimizer state when given (``Optimizer.state_dict`` form, checked here)."""
        state = optimizer_state or {"step_count": torch.tensor(step)}
        expected = self._expected()
        problems = [Problem(None, k, "does not match a weight of the program") for k, v in state.items()
                    if k != "step_count" and (k.rpartition("::")[0] not in expected
                                              or tuple(v.shape) != expected[k.rpartition("::")[0]][0])]
        if problems:
            raise UserError(problems)
        self.step = step
        if self.optimizer is not None:
            self.optimizer.load_state_dict({k: (v if k == "step_count" else v.to(self.store_device))
                                            for k, v in state.items()})

    def resume(self) -> Optional[Path]:
        """Continue from the newest usable checkpoint in model_dir, if any (damaged newer ones
        are reported on stdout and set aside)."""
        if not self.ranks.main:          # rank 0 first: it sets damaged checkpoints aside
            torch.distributed.barrier()
        found = checkpoint.load_usable(self.model_dir, self._expected())
        if self.ranks.main and self.ranks.world_size > 1:
            torch.distributed.barrier()
        if found is None:
            return None
        for why in found.skipped if self.ranks.main else ():
            print(f"checkpoint damaged, not used: {why}")
        for k, v in found.weights.items():
            self.weights[k].copy_(v)
        if self.optimizer is not None:
            self.optimizer.load_state_dict(found.optimizer)
        state = found.state
        self.step = state["step"]
        if self.ranks.rank == 0:              # the saved state is rank 0's
            torch.set_rng_state(found.rng["torch"])
        else:
            torch.manual_seed(rank_seed(self.params.runconfig.seed, self.ranks.rank, self.step))
        self.sampler_state = state.get("sampler")
        if self.scaler and "loss_scale" in state:
            self.scaler.load_state_dict(state["loss_scale"])
        return found.path

    # -- execution -----------------------------------------------------------------------
    def _inputs(self, program: Program, batch: dict[str, torch.Tensor], share: float = 1.0,
                acc: Optional[dict[str, torch.Tensor]] = None) -> list[torch.Tensor]:
        for spec in program.inputs:
            if spec.kind == InputKind.BATCH \
                    and tuple(batch[spec.name].shape) != spec.shape:
                raise UserError(Problem(None, spec.name, f"batch shape {tuple(batch[spec.name].shape)} does not "
                                        f"match the compiled program's {spec.shape} (static shapes)"))
        return [self.weights[s.name] if s.kind == InputKind.PARAM else
                self._scalar(s.name, {GRAD_WEIGHT: share}) if s.kind == InputKind.SCALAR else
                acc[s.name] if s.kind == InputKind.GRAD else
                batch[s.name].to(self.device) for s in program.inputs]

    def _scalar(self, name: str, values: dict[str, float]) -> torch.Tensor:
        """A scalar input: the loss scale (float16), else from ``values`` (the micro-batch's share
        of the batch, the optimizer's step scalars)."""
        if name == LOSS_SCALE:
            return self.scaler.seed(self.device)
        return torch.tensor(values[name], dtype=torch.float32, device=self.device)

    def micro_step(self, batch: dict[str, torch.Tensor], share: float = 1.0,
                   acc: Optional[dict[str, torch.Tensor]] = None,
                   sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One micro-batch through the training program (``sync``; data parallel: it weighs the
        gradients by ``share``, adds ``acc`` and reduces across ranks) or the no-sync program."""
        program, run = (self.train_program, self.train_exec) if sync or self.no_sync is None else \
            (self.no_sync, self.no_sync_exec)
        outs = run(self._inputs(program, batch, share, acc))
        store = self.store_device
        grads = {spec.target: (g if g.device == store else g.to(store))      # back to the store
                 for spec, g in zip(program.outputs, outs) if spec.kind in ("grad", "grad_shard")}
        return outs[0], grads

    def _weights_of(self, micro_batches: list[dict[str, torch.Tensor]]) -> list[float]:
        """Each micro-batch's share of the (global) batch's loss: with ``num_tokens`` scaling its
        supervised tokens over the batch's, with ``batch_size`` scaling its (padded) rows over
        the batch's real rows; padded rows have loss_mask 0 and so contribute nothing. Data
        parallel: the totals are summed over the ranks."""
        if self.params.model.loss_scaling == "num_tokens":
            counts = [float(b["loss_mask"].sum()) for b in micro_batches]
            total = self._all_sum([sum(counts)])[0]
            return [c / total if total else 1.0 / (len(counts) * self.ranks.world_size) for c in counts]
        real = self._all_sum([float(sum(b.get("rows", b["labels"].shape[0]) for b in micro_batches))])[0]
        return [b["labels"].shape[0] / real for b in micro_batches]

    def _first_sample(self) -> int:
        """The stream position of this rank's first row in this step: ``step`` global batches
        done, then the ranks before this one (dropout's masks follow the sample, not the rank
        or the micro-batch: models/rng.py)."""
        data = self.params.train_input
        rb = rank_batch(data.batch_size, data.micro_batch_size, self.ranks.world_size)
        return self.step * data.batch_size + self.ranks.rank * rb.batch

    def _all_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.ranks, self.device)

    def _gradients(self, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, torch.Tensor]]:
        """The step's loss and gradients (the whole global batch's): each micro-batch weighted by
        its share; the last runs the synchronising program when data parallel."""
        total: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), dtype=torch.float64)
        owned = Claims([*self.weights.values(), *(v for b in micro_batches for v in b.values()
                                                  if isinstance(v, torch.Tensor))])
        shares = self._weights_of(micro_batches)
        dp = self.train_program.world_size > 1
        first = self._first_sample()
        for i, (batch, share) in enumerate(zip(micro_batches, shares)):
            batch = {k: v for k, v in batch.items() if k != "rows"}
            rows = batch["labels"].shape[0]
            if self._dropout:
                batch |= rng_inputs(self.params.runconfig.seed, first, rows, self.device)
            first += rows
            if dp and i == len(micro_batches) - 1:       # weighs, adds the rest, reduces: the global sum
                part, total = self.micro_step(batch, share, total if self.no_sync else None)
                loss += part.detach().double().cpu() * share
                break
            part, grads = self.micro_step(batch, sync=False)
            loss += part.detach().double().cpu() * share
            accumulate(total, grads, share, owned)
        return float(loss), total

    def _update_in_program(self, micro_batches: list[dict[str, torch.Tensor]], start: float) -> StepResult:
        """One step of a program that holds the update (``--optimizer_in_program``): weights,
        optimizer state, learning rate and step in; new weights and state out, written back."""
        program, opt = self.train_program, self.optimizer
        if len(micro_batches) != 1:
            raise UserError(Problem(None, "--optimizer_in_program", f"the program updates once per run, but this "
                                    f"step has {len(micro_batches)} micro-batches"))
        batch = {k: v for k, v in micro_batches[0].items() if k != "rows"}
        rows = batch["labels"].shape[0]
        if self._dropout:
            batch |= rng_inputs(self.params.runconfig.seed, self._first_sample(), rows, self.device)
        lr = learning_rate(opt.cfg, opt.step_count)
        scalars = step_scalars(self._rule, lr, opt.step_count, self.scaler.scale if self.scaler else 1.0)
        args = []
        for s in program.inputs:
            if s.kind == InputKind.STATE:
                name, _, key = s.name.rpartition("::")
                st = opt.state.setdefault(name, {})
                if key not in st:
                    st[key] = torch.zeros_like(self.weights[name])
                args.append(st[key])
            elif s.kind == InputKind.SCALAR:
                args.append(self._scalar(s.name, scalars))
            elif s.kind == InputKind.PARAM:
                args.append(self.weights[s.name])
            else:
                args.append(batch[s.name].to(self.device))
        outs = self.train_exec(args)
        loss = float(outs[0])
        if not math.isfinite(loss):
            self._diverged(f"loss is {loss}")
        found = {o.kind: v for o, v in zip(program.outputs, outs) if o.kind in ("grad_norm", "finite")}
        finite = bool(found["finite"]) if "finite" in found else True
        norm = float(found["grad_norm"]) if finite else math.inf
        if finite and not math.isfinite(norm):
            self._diverged(f"gradients are not finite (global norm {norm})")
        with torch.no_grad():
            for o, v in zip(program.outputs, outs):
                if o.kind == "param_update" and v is not self.weights[o.target]:   # in place already: no copy
                    self.weights[o.target].copy_(v)
                elif o.kind == "state_update":
                    name, _, key = o.target.rpartition("::")
                    opt.state[name][key] = v
        if finite:
            opt.step_count += 1
            bad = checkpoint.non_finite({k: self.weights[k] for k in self.trainable})
            if bad:
                self._diverged(f"the update made {len(bad)} weights non-finite (e.g. {bad[0]}; learning rate {lr:.3g})")
        else:
            lr = learning_rate(opt.cfg, opt.step_count)
        if self.scaler:
            self.scaler.update(finite)
        self.step += 1
        tokens = int((1 - batch["key_padding_mask"]).sum())
        return StepResult(self.step, loss, lr, norm, time.perf_counter() - start,
                          int(micro_batches[0].get("rows", rows)), tokens)

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]) -> StepResult:
        """One optimizer step over the micro-batches of one batch (this rank's part of it): loss
        and gradients equal the whole global batch's at once (see ``_weights_of``)."""
        start = time.perf_counter()
        if self._update:
            return self._update_in_program(micro_batches, start)
        loss, total = self._gradients(micro_batches)
        samples = sum(b.get("rows", b["labels"].shape[0]) for b in micro_batches)
        tokens = int(sum((1 - b["key_padding_mask"]).sum() for b in micro_batches))
        loss, samples, tokens = self._all_sum([loss, samples, tokens])
        if not math.isfinite(loss):
            self._diverged(f"loss is {loss}")
        finite = self.scaler.unscale(total) if self.scaler else True
        if self.scaler and self.zero == 2:          # each rank holds other shards: agree
            finite = self._all_sum([float(not finite)])[0] == 0
        if finite:
            norm = self.optimizer.clip(total)
            if not math.isfinite(norm):       # fp16 overflows were caught above: this is divergence
                self._diverged(f"gradients are not finite (global norm {norm})")
            lr = self.optimizer.step(total)
            bad = checkpoint.non_finite({k: self.weights[k] for k in self.trainable})
            if bad:
                self._diverged(f"the update made {len(bad)} weights non-finite (e.g. {bad[0]}; learning rate {lr:.3g})")
        else:                        # float16 overflow: the step is skipped, the scale lowered
            norm, lr = math.inf, learning_rate(self.optimizer.cfg, self.optimizer.step_count)
        if self.scaler:
            self.scaler.update(finite)
        self.step += 1
        return StepResult(self.step, loss, lr, norm, time.perf_counter() - start, int(samples), int(tokens))

    def _diverged(self, what: str) -> None:
        """Stop: nothing non-finite is ever saved, so the latest checkpoint is a good one."""
        last = checkpoint.latest(self.model_dir)
        raise UserError(Problem(None, f"step {self.step + 1}", f"{what}; training stopped "
                                f"(last good checkpoint: {last or 'none'})"))

    def evaluate(self, batches) -> dict:
        """Loss (mean cross entropy over supervised tokens), perplexity and token accuracy.
        A last, smaller batch is padded to the program's static size with unsupervised rows.
        Data parallel: each rank evaluates every world-size-th batch; the sums are combined."""
        program = self.eval_program
        size = program.batch_size
        total_loss = total_tokens = correct = 0.0
        answers = answers_right = 0
        for batch in list(batches)[self.ranks.rank::self.ranks.world_size]:
            batch = pad_batch(batch, size)
            logits = self.eval_exec(self._inputs(program, batch))[1]
            labels = batch["labels"].to(self.device)
            mask = batch["loss_mask"].to(self.device).bool()
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
            total_loss += float(ce[mask.flatten()].sum())
            total_tokens += float(mask.sum())
            hit = (logits.argmax(-1) == labels) & mask
            correct += float(hit.sum())
            a, r = answer_hits(mask.cpu(), hit.cpu())
            answers, answers_right = answers + a, answers_right + r
        total_loss, total_tokens, correct, answers, answers_right = self._all_sum(
            [total_loss, total_tokens, correct, answers, answers_right])
        answers, answers_right = int(answers), int(answers_right)
        mean = total_loss / max(total_tokens, 1.0)
        return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0)),
                "token_accuracy": correct / max(total_tokens, 1.0), "eval_tokens": int(total_tokens),
                "answer_accuracy": answers_right / max(answers, 1), "answers": answers}

    # -- bookkeeping ---------------------------------------------------------------------
    def save(self, sampler_state: Optional[dict] = None) -> Optional[Path]:
        """One checkpoint: every rank gathers the (sharded) optimizer state, rank 0 writes."""
        state = {"step": self.step, "sampler": sampler_state, "world_size": self.ranks.world_size}
        if self.scaler:
            state["loss_scale"] = self.scaler.state_dict()
        opt = self.optimizer.state_dict() if self.optimizer else {}
        if not self.ranks.main:
            return None
        return checkpoint.save(self.model_dir, self.step, self.weights, opt, state,
                               self.params.runconfig.max_checkpoints)

    def truncate_metrics(self) -> None:
        """After a resume: drop the records of steps past the checkpoint's (they are redone),
        so metrics.jsonl continues without repeated steps."""
        if not self.ranks.main or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        keep = [line for line in lines if _step_of_record(line) <= self.step]
        if len(keep) == len(lines):
            return
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(self.metrics_path)

    def log(self, record: dict, split: str = "train") -> None:
        """A record in metrics.jsonl and its scalars as TensorBoard events (MODEL_DIR/events,
        tags ``train/loss``, ``eval/answer_accuracy``, ...). Rank 0 only; each record carries
        the world size."""
        if not self.ranks.main:
            return
        record = {**record, "world_size": self.ranks.world_size}
        try:
            self.model_dir.mkdir(parents=True, exist_ok=True)
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"split": split, **record}) + "\n")
            if self._events is None:
                from torch.utils.tensorboard import SummaryWriter
                self._events = SummaryWriter(str(self.model_dir / "events"))
            for k, v in record.items():
                if k not in ("step", "world_size") and isinstance(v, (int, float)):
                    self._events.add_scalar(f"{split}/{k}", v, record["step"])
            self._events.flush()
        except OSError as err:          # a full disk: the log is lost, training (and checkpoints) go on
            if not self._log_failed:
                print(f"mmgraph: warning: cannot write {self.metrics_path} or the TensorBoard events "
                      f"({err.strerror or err}); training goes on, later records may be missing", file=sys.stderr)
            self._log_failed = True

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of torch's generator on ``rank``, from ``step`` on. Rank 0 keeps the run's seed
    (one process and rank 0 draw alike); the other ranks draw other numbers, so a wafer program's
    own random numbers (dropout legalized to ``rand``) differ across ranks as they do across
    systems. Counter-based masks (host programs) do not use it: they follow the sample."""
    if rank == 0 and step == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}:{rank}:{step}".encode()).digest()[:7], "little")


def _check_data_parallel(program: Program, ranks: Ranks, executor: str, weight_streaming: bool) -> None:
    if program.world_size != ranks.world_size:
        raise UserError(Problem(None, "WORLD_SIZE", f"the program is compiled for {program.world_size} ranks; "
                                f"this job has {ranks.world_size}"))
    if weight_streaming:                   # other executors refuse collectives themselves (make_executor)
        raise UserError(Problem(None, "--weight_streaming", "not supported with data parallel (world size > 1): "
                                "the host store streams one rank's weights"))


def _step_of_record(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError, TypeError):
        return 1 << 62                                # a torn last line from a kill: dropped


def answer_hits(mask: torch.Tensor, hit: torch.Tensor) -> tuple[int, int]:
    """Answers (runs of supervised positions) and how many have every token before their
    final one (the end-of-turn token) predicted right."""
    total = right = 0
    for m, h in zip(mask.tolist(), hit.tolist()):
        t = 0
        while t < len(m):
            if not m[t]:
                t += 1
                continue
            end = t
            while end < len(m) and m[end]:
                end += 1
            span = h[t:end - 1] if end - t > 1 else h[t:end]
            total += 1
            right += int(all(span))
            t = end
    return total, right


def pad_batch(batch: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    n = batch["labels"].shape[0]
    if n == size:
        return batch
    out = {}
    for k, v in batch.items():
        extra = v[:1].expand(size - n, *v.shape[1:]).clone()
        if k == "loss_mask":
            extra.zero_()
        out[k] = torch.cat([v, extra])
    return out
