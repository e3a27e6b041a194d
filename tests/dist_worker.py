"""Run by torchrun in tests (not collected): one rank of a data-parallel check.

``dist_worker.py program OUT``: every rank runs the tiny phase-2 program compiled for 2 ranks on
its half of one batch; the gradients it outputs (sums over ranks) are written to OUT/rank{r}.pt,
with rank 0 also writing the plain program's gradients on each half (OUT/plain.pt).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from mmgraph.core.config import load_params
from mmgraph.models import build_model, random_batch
from mmgraph.core.ir import GRAD_WEIGHT, InputKind
from mmgraph.compiler.pipeline import compile_step, run_pass
from mmgraph.passes.data_parallel import make_data_parallel
from mmgraph.runtime.distributed import bind_group, from_env

ROOT = Path(__file__).resolve().parent.parent


def program_check(out: Path) -> None:
    ranks = from_env("cpu")
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    share = 2
    plain = compile_step(params, "train", micro_batch_size=share)[-1].program
    dp = run_pass("data_parallel", make_data_parallel(ranks.world_size, bucket_bytes=20_000), plain)
    bind_group(dp.gm, ranks.group)
    model, _ = build_model(params, seed=0)
    weights = dict(model.named_parameters())
    batch = random_batch(params.layout("train"), share * ranks.world_size, seed=1)

    def inputs(program, lo):
        return [weights[s.name].detach() if s.kind == InputKind.PARAM else torch.tensor(1.0) if s.name == GRAD_WEIGHT
                else batch[s.name][lo:lo + share] for s in program.inputs]

    with torch.no_grad():
        outs = dp.gm(*inputs(dp, ranks.rank * share))
    names = [s.target for s in dp.outputs if s.kind == "grad"]
    grads = dict(zip(names, outs[1:]))
    torch.save({"loss": outs[0], "grads": grads}, out / f"rank{ranks.rank}.pt")
    if ranks.main:
        with torch.no_grad():
            halves = [plain.gm(*inputs(plain, r * share)) for r in range(ranks.world_size)]
        summed = {n: sum(h[1 + i] for h in halves) for i, n in enumerate(names)}
        torch.save({"grads": summed}, out / "plain.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def accumulate_check(out: Path) -> None:
    """Two micro-batches a rank: the first through the plain program (no communication), the
    second through the accumulate variant; against the plain program's gradients on all four."""
    ranks = from_env("cpu")
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    share = 1
    plain = compile_step(params, "train", micro_batch_size=share)[-1].program
    acc = run_pass("data_parallel", make_data_parallel(ranks.world_size, bucket_bytes=20_000, accumulate=True), plain)
    bind_group(acc.gm, ranks.group)
    model, _ = build_model(params, seed=0)
    weights = dict(model.named_parameters())
    batch = random_batch(params.layout("train"), 2 * share * ranks.world_size, seed=1)
    names = [s.target for s in plain.outputs if s.kind == "grad"]

    def inputs(program, lo, grads=None):
        return [weights[s.name].detach() if s.kind == InputKind.PARAM else grads[s.name] if s.kind == InputKind.GRAD
                else torch.tensor(1.0) if s.name == GRAD_WEIGHT else batch[s.name][lo:lo + share]
                for s in program.inputs]

    rows = [2 * ranks.rank, 2 * ranks.rank + 1]          # this rank's two micro-batches
    with torch.no_grad():
        first = dict(zip(names, plain.gm(*inputs(plain, rows[0]))[1:]))
        outs = acc.gm(*inputs(acc, rows[1], first))
    torch.save({"grads": dict(zip(names, outs[1:]))}, out / f"acc{ranks.rank}.pt")
    if ranks.main:
        with torch.no_grad():
            each = [plain.gm(*inputs(plain, r))[1:] for r in range(2 * ranks.world_size)]
        torch.save({"grads": {n: sum(e[i] for e in each) for i, n in enumerate(names)}}, out / "plain_acc.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero2_check(out: Path) -> None:
    """Two steps of the tiny phase-2 program with reduce-scattered gradients and the ZeRO-2
    optimizer, against one process: the plain program on both halves, averaged, AdamW."""
    from mmgraph.runtime.optim import Optimizer
    from mmgraph.runtime.zero import GradShardOptimizer

    ranks = from_env("cpu")
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    share = 2
    plain = compile_step(params, "train", micro_batch_size=share)[-1].program
    dp = run_pass("data_parallel", make_data_parallel(ranks.world_size, bucket_bytes=20_000,
                                                      shard_gradients=True), plain)
    bind_group(dp.gm, ranks.group)
    model, _ = build_model(params, seed=0)
    mine = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = GradShardOptimizer(params.optimizer, mine, dp.collectives, ranks.rank, ranks.world_size)
    ref_opt = Optimizer(params.optimizer, ref)
    names = [s.target for s in plain.outputs if s.kind == "grad"]
    for step in range(2):
        batch = random_batch(params.layout("train"), share * ranks.world_size, seed=10 + step)

        def inputs(program, weights, lo):
            return [weights[s.name] if s.kind == InputKind.PARAM else torch.tensor(1 / ranks.world_size)
                    if s.name == GRAD_WEIGHT else batch[s.name][lo:lo + share] for s in program.inputs]

        with torch.no_grad():
            shards = dict(zip([s.target for s in dp.outputs[1:]], dp.gm(*inputs(dp, mine, ranks.rank * share))[1:]))
            halves = [plain.gm(*inputs(plain, ref, r * share))[1:] for r in range(ranks.world_size)]
        opt.clip(shards)
        opt.step(shards)
        grads = {n: sum(h[i] for h in halves) / ranks.world_size for i, n in enumerate(names)}
        ref_opt.clip(grads)
        ref_opt.step(grads)
    torch.save({"weights": mine, "ref": ref, "state": opt.state_dict(), "ref_state": ref_opt.state_dict(),
                "state_bytes": opt.state_bytes(),
                "ref_bytes": sum(t.numel() * t.element_size() for st in ref_opt.state.values() for t in st.values())},
               out / f"zero2_{ranks.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def zero_check(out: Path) -> None:
    """Three AdamW steps on random gradients: the ZeRO-1 optimizer on every rank against the
    plain one; weights, gathered state and the state each rank holds."""
    from mmgraph.runtime.optim import Optimizer
    from mmgraph.runtime.zero import ShardedOptimizer

    ranks = from_env("cpu")
    cfg = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train").optimizer
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (32, 32), "b": (30, 32), "c": (16, 4), "d": (64,), "e": (5,)}
    start = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    steps = [{n: torch.randn(s, generator=gen) for n, s in shapes.items()} for _ in range(3)]
    plain_w = {n: t.clone() for n, t in start.items()}
    shard_w = {n: t.clone() for n, t in start.items()}
    plain = Optimizer(cfg, plain_w)
    sharded = ShardedOptimizer(cfg, shard_w, list(shapes), ranks.rank, ranks.world_size)
    for grads in steps:
        plain.step({n: g.clone() for n, g in grads.items()})
        sharded.step({n: g.clone() for n, g in grads.items()})
    whole = sharded.state_dict()
    torch.save({"weights": shard_w, "plain_weights": plain_w, "state": whole, "plain_state": plain.state_dict(),
                "state_bytes": sharded.state_bytes(),
                "plain_bytes": sum(t.numel() * t.element_size() for st in plain.state.values() for t in st.values())},
               out / f"zero{ranks.rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


MODES = ("single", "ddp", "zero1", "zero2")


def resume_matrix(out: Path) -> None:
    """Every way a run can end and start again: a checkpoint saved by one process, DDP, ZeRO-1 or
    ZeRO-2, continued by each of the four, on resume (weights, optimizer state, step) and as
    ``--checkpoint_path`` initial weights (the model only); writes every result's weights and
    the references (one process throughout) to OUT/matrix.pt on rank 0."""
    import shutil

    from mmgraph.runtime.distributed import SINGLE
    from mmgraph.runtime.runner import Runner

    ranks = from_env("cpu")
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    share, first, then = 2, 2, 2                       # rows a rank, steps before / after the checkpoint
    layout = params.layout("train")
    single = compile_step(params, "train", micro_batch_size=share * ranks.world_size)[-1].program
    dp = {z: compile_step(params, "train", micro_batch_size=share, world_size=ranks.world_size, zero=z)[-1].program
          for z in (0, 2)}
    model, _ = build_model(params, seed=0)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def runner(mode: str, md: Path):
        if mode == "single":
            return Runner(params, md, single, weights={k: v.clone() for k, v in initial.items()}, ranks=SINGLE)
        zero = {"ddp": 0, "zero1": 1, "zero2": 2}[mode]
        return Runner(params, md, dp[2 if zero == 2 else 0], weights={k: v.clone() for k, v in initial.items()},
                      ranks=ranks, zero=zero)

    def train(r, mode: str, steps: int) -> None:
        for _ in range(steps):
            batch = random_batch(layout, share * ranks.world_size, seed=100 + r.step)
            lo, n = (0, share * ranks.world_size) if mode == "single" else (ranks.rank * share, share)
            r.train_step([{k: v[lo:lo + n] for k, v in batch.items()}])

    def run(mode: str, md: Path, steps: int, how=None, source: Path = None) -> dict:
        """``steps`` more steps of ``mode`` in ``md`` (started by ``how``); the weights after."""
        if mode == "single" and not ranks.main:
            torch.distributed.barrier()
            return {}
        r = runner(mode, md)
        if how == "resume":
            assert r.resume() is not None
        elif how == "initial":
            r.load_initial(str(source))
        train(r, mode, steps)
        r.save()
        weights = {k: v.clone() for k, v in r.weights.items()}
        if mode == "single":
            torch.distributed.barrier()
        return weights

    results: dict = {}
    root = out / "md"
    for src in MODES:                                   # the checkpoints at step ``first``
        run(src, root / src, first)
    torch.distributed.barrier()
    results["reference_resume"] = run("single", root / "ref_all", first + then)
    results["reference_initial"] = run("single", root / "ref_init", then, "initial", root / "single")
    for src in MODES:
        for dst in MODES:
            md = root / f"{src}-{dst}"
            if ranks.main:
                shutil.copytree(root / src, md)
            torch.distributed.barrier()
            results[f"resume {src}->{dst}"] = run(dst, md, then, "resume")
            results[f"initial {src}->{dst}"] = run(dst, root / f"init-{src}-{dst}", then, "initial", root / src)
    if ranks.main:
        torch.save(results, out / "matrix.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"program": program_check, "zero": zero_check, "accumulate": accumulate_check, "zero2": zero2_check,
     "resume_matrix": resume_matrix}[sys.argv[1]](Path(sys.argv[2]))
    from mmgraph.commands.run import leave

    leave(0)                      # without interpreter teardown, as `mmgraph run`'s ranks end
