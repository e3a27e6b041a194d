"""The data_parallel pass: collectives as graph nodes, bucketed, issued early, waited late; two
gloo ranks reduce to exactly the sum of the plain program's gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from mmgraph.core.config import load_params
from mmgraph.core.ir import InputKind, InputSpec, NodeInfo, OutputSpec, Phase, Program
from mmgraph.passes.data_parallel import ALL_REDUCE, WAIT, make_data_parallel, plan_buckets
from mmgraph.passes.verify import verify_structure
from mmgraph.compiler.pipeline import compile_step, run_pass
from mmgraph.runtime.data import ResumableSampler
from mmgraph.runtime.distributed import Ranks, RankSampler, bind_group

ROOT = Path(__file__).resolve().parent.parent


def _torchrun(check: str, out: Path, ranks: int = 2) -> None:
    """``tests/dist_worker.py CHECK OUT`` on ``ranks`` gloo ranks (one thread each, free port)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(ROOT / "tests" / "dist_worker.py"), check, str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def tiny_train():
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    return compile_step(params, "train")[-1].program


def _collectives(program: Program, target) -> list[fx.Node]:
    return [n for n in program.gm.graph.nodes if n.target == target]


def test_one_bucket_by_default_and_structure_holds(tiny_train):
    dp = run_pass("data_parallel", make_data_parallel(2), tiny_train)
    verify_structure(dp, "data_parallel")
    assert len(dp.collectives) == 1 and len(_collectives(dp, ALL_REDUCE)) == 1
    assert dp.world_size == 2
    assert set(dp.collectives[0].targets) == {s.target for s in tiny_train.outputs if s.kind == "grad"}
    assert [k.kind for k in dp.kernels].count("collective") == 2     # issue + wait


def test_buckets_capped_issued_after_last_gradient_and_waited_before_output(tiny_train):
    cap = 20_000
    dp = run_pass("data_parallel", make_data_parallel(2, bucket_bytes=cap), tiny_train)
    verify_structure(dp, "data_parallel")
    nodes = list(dp.gm.graph.nodes)
    order = {n.name: i for i, n in enumerate(nodes)}
    grads_in = [s.target for s in tiny_train.outputs if s.kind == "grad"]
    assert sorted(t for b in dp.collectives for t in b.targets) == sorted(grads_in)
    for b in dp.collectives:
        assert b.bytes <= cap or len(b.targets) == 1
        # issued right after the bucket's last gradient: only its flatten ops in between
        between = nodes[order[b.issue_after] + 1:order[b.collective]]
        assert all(n.target in (torch.ops.aten.reshape.default, torch.ops.aten.cat.default) for n in between)
    waits = _collectives(dp, WAIT)
    first_wait = min(order[w.name] for w in waits)
    last_issue = max(order[b.collective] for b in dp.collectives)
    assert first_wait > last_issue                      # every collective in flight before any wait
    assert all(n.op != "call_function" or n.target in (WAIT, torch.ops.aten.split_with_sizes.default,
                                                        torch.ops.aten.view.default) or "getitem" in str(n.target)
               for n in nodes[first_wait:])             # nothing but waits and splits after them
    # the bucket order follows the backward: issue points ascend
    issue_at = [order[b.collective] for b in dp.collectives]
    assert issue_at == sorted(issue_at) and len(issue_at) > 3


def test_world_size_one_and_eval_programs_unchanged(tiny_train):
    same = run_pass("data_parallel", make_data_parallel(1), tiny_train)
    assert not _collectives(same, ALL_REDUCE) and same.world_size == 1
    assert same.gm.code == tiny_train.gm.code and same.outputs == tiny_train.outputs
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "eval")
    evaluation = compile_step(params, "eval")[-1].program
    kept = run_pass("data_parallel", make_data_parallel(2), evaluation)      # nothing to reduce
    assert kept.gm.code == evaluation.gm.code and kept.outputs == evaluation.outputs
    assert not kept.collectives and kept.world_size == 1


def _toy_program(dtypes: list[torch.dtype]) -> Program:
    """A graph whose outputs are gradients of the given dtypes, 1000 elements each."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    graph = fx.Graph()
    outs, inputs, info = [], [], {}
    for i, dt in enumerate(dtypes):
        x = graph.placeholder(f"w{i}")
        with mode:
            x.meta["val"] = torch.empty(1000, dtype=dt)
        g = graph.call_function(torch.ops.aten.neg.default, (x,))
        g.meta["val"] = x.meta["val"]
        outs.append(g)
        inputs.append(InputSpec(f"w{i}", InputKind.PARAM, True, (1000,), dt))
        for n in (x, g):
            info[n.name] = NodeInfo((1000,), dt, "", f"layers.{i}", Phase.BACKWARD, 0, 0)
    loss = graph.call_function(torch.ops.aten.sum.default, (outs[0],))
    loss.meta["val"] = outs[0].meta["val"].sum()
    info[loss.name] = NodeInfo((), dtypes[0], "", "top", Phase.FORWARD, 0, 0)
    graph.output((loss, *outs))
    specs = (OutputSpec("loss"),) + tuple(OutputSpec("grad", f"w{i}") for i in range(len(dtypes)))
    return Program(fx.GraphModule(torch.nn.Module(), graph), tuple(inputs), specs, info, "train")


def test_buckets_never_mix_dtypes():
    program = _toy_program([torch.float32, torch.bfloat16, torch.float32, torch.bfloat16])
    buckets = plan_buckets(program, bucket_bytes=1 << 20)
    kinds = [{program.outputs[i].target for i in b} for b in buckets]
    assert sorted(map(sorted, kinds)) == [["w0", "w2"], ["w1", "w3"]]
    dp = run_pass("data_parallel", make_data_parallel(4, bucket_bytes=1 << 20), program)
    assert {b.dtype for b in dp.collectives} == {torch.float32, torch.bfloat16}


def test_bind_group_renames_the_collectives(tiny_train):
    dp = run_pass("data_parallel", make_data_parallel(2), tiny_train)
    gm = bind_group(dp.gm, "7")
    assert all(n.args[-1] == "7" for n in _collectives(dp, ALL_REDUCE))
    assert "'7'" in gm.code


@pytest.mark.parametrize("world", [2, 4])
def test_rank_samplers_split_every_global_batch(world):
    n, global_batch = 37, 8
    parts = []
    for rank in range(world):
        base = ResumableSampler(n, global_batch // world, shuffle=True, seed=3, drop_last=False)
        parts.append(list(RankSampler(base, global_batch, Ranks(rank, world, rank, "0"))))
        assert len(parts[-1]) == len(RankSampler(ResumableSampler(n, 2, True, 3, False), global_batch,
                                                 Ranks(rank, world, rank, "0")))
    order = list(ResumableSampler(n, 1, shuffle=True, seed=3, drop_last=False))
    flat = sorted(i for p in parts for i in p)
    assert flat == sorted(order)                         # every sample once, on exactly one rank
    share = global_batch // world
    for k in range(n // global_batch):                   # each global batch is the ranks' parts together
        together = [i for p in parts for i in p[k * share:(k + 1) * share]]
        assert together == order[k * global_batch:(k + 1) * global_batch]


def test_two_gloo_ranks_reduce_to_the_sum_of_the_plain_program(tmp_path):
    _torchrun("program", tmp_path)
    plain = torch.load(tmp_path / "plain.pt")["grads"]
    ranks = [torch.load(tmp_path / f"rank{r}.pt")["grads"] for r in range(2)]
    assert len(plain) == 25
    for name, want in plain.items():
        for got in ranks:
            assert torch.equal(got[name], want), name    # the same additions in the same order


def test_zero1_partition_is_balanced_and_covers_every_parameter():
    from mmgraph.runtime.zero import partition

    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 1}
    owner = partition(sizes, 2)
    assert set(owner) == set(sizes)
    load = [sum(sizes[n] for n, r in owner.items() if r == k) for k in range(2)]
    assert max(load) - min(load) <= max(sizes.values())
    assert partition(sizes, 2) == owner                  # the same on every rank


def test_zero1_two_ranks_update_like_one_optimizer_with_half_the_state(tmp_path):
    _torchrun("zero", tmp_path)
    results = [torch.load(tmp_path / f"zero{r}.pt") for r in range(2)]
    for res in results:
        for name, want in res["plain_weights"].items():
            assert torch.equal(res["weights"][name], want), name
        assert res["state"].keys() == res["plain_state"].keys()
        for key, want in res["plain_state"].items():
            assert torch.equal(res["state"][key], want), key
    held = [r["state_bytes"] for r in results]
    assert sum(held) == results[0]["plain_bytes"]
    assert max(held) <= 0.55 * results[0]["plain_bytes"]    # the issue's ZeRO-1 memory target


def _toy(backward_s: float):
    """A program stub: global batch 8 at micro-batch 1, 0.1 s per micro-step, 0.05 s optimizer
    tail, two segments (the backward one computing ``backward_s``)."""
    from types import SimpleNamespace as NS

    sched = NS(batch_size=8, micro_batch_size=1, micro_step_s=0.1, optimizer_tail_s=0.05, grad_bytes_out=0,
               times=(NS(compute_s=0.03), NS(compute_s=backward_s)))
    return NS(schedule=sched, segments=(NS(phase="forward"), NS(phase="backward")))


def test_simulated_systems_scale_with_the_interconnect_by_hand():
    """Scaling against figures worked out by hand from the model in docs/distributed.md (not
    from the code): 100 MB of gradients on a 10 GB/s ring with 10 us per step; the last 25 MiB
    bucket is exposed, the rest hides under a long enough backward."""
    from types import SimpleNamespace as NS

    from mmgraph.compiler.scaling import scaling

    ring = NS(interconnect=NS(topology="ring", latency_s=1e-5, ring_bandwidth=lambda n: 10e9))
    one, two, four = scaling(_toy(0.06), ring, systems=(1, 2, 4), grad_bytes=100_000_000)
    assert (one.micro_steps, two.micro_steps, four.micro_steps) == (8, 4, 2)
    assert one.step_s == pytest.approx(0.85) and one.comm_s == 0 and one.efficiency == pytest.approx(1.0)
    # 2 systems: ring 1 x 100 MB / 10 GB/s + 2 x 10 us = 10.02 ms; last bucket 26,214,400 B: 2.62144 ms
    assert two.comm_s == pytest.approx(0.00262144) and two.hidden_s == pytest.approx(0.00739856)
    assert two.step_s == pytest.approx(0.45262144)
    assert two.samples_per_s == pytest.approx(17.674815, rel=1e-6) and two.efficiency == pytest.approx(0.938975, rel=1e-5)
    # 4 systems: ring 1.5 x 10 ms + 6 x 10 us = 15.06 ms; last bucket 1.5 x 2.62144 ms
    assert four.comm_s == pytest.approx(0.00393216) and four.hidden_s == pytest.approx(0.01112784)
    assert four.step_s == pytest.approx(0.25393216)
    # a backward of 5 ms hides only 5 ms of the 10.02 ms ring
    short = scaling(_toy(0.005), ring, systems=(2,), grad_bytes=100_000_000)[0]
    assert short.hidden_s == pytest.approx(0.005) and short.comm_s == pytest.approx(0.00502)
    # SwarmX: a tree reduction per streamed segment and micro-step, 10 us per hop: 4 systems,
    # 2 hops, 2 segments, 2 micro-steps = 80 us, none hidden
    swarm = NS(interconnect=NS(topology="swarmx", latency_s=1e-5))
    p = scaling(_toy(0.06), swarm, systems=(4,), grad_bytes=100_000_000)[0]
    assert p.comm_s == pytest.approx(8e-5) and p.hidden_s == 0 and p.step_s == pytest.approx(0.25008)


@pytest.mark.parametrize("target_name", ["cs2", "h100"])
def test_simulated_systems_scale_on_the_real_targets(target_name):
    """On a compiled program and the shipped targets: fewer micro-steps per system, efficiency
    in (0, 1], and a step no shorter than its share of the work."""
    from mmgraph.compiler.scaling import scaling
    from mmgraph.core.target import load_target

    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    target = load_target(target_name)
    program = compile_step(params, "train", target=target, micro_batch_size=1)[-1].program
    points = scaling(program, target, systems=(1, 2, 4))
    assert points[0].efficiency == pytest.approx(1.0) and points[0].comm_s == 0.0
    assert [p.micro_steps for p in points] == [params.train_input.batch_size // n for n in (1, 2, 4)]
    for p in points[1:]:
        assert 0 < p.efficiency <= 1.0 and p.comm_s > 0
        assert p.step_s >= p.micro_steps * program.schedule.micro_step_s + p.comm_s


def test_accumulate_variant_takes_the_summed_gradients_as_inputs(tiny_train):
    from mmgraph.core.ir import InputKind

    acc = run_pass("data_parallel", make_data_parallel(2, accumulate=True), tiny_train)
    verify_structure(acc, "data_parallel")
    grads = [s for s in acc.inputs if s.kind == InputKind.GRAD]
    assert [g.name for g in grads] == [s.target for s in tiny_train.outputs if s.kind == "grad"]
    assert len(_collectives(acc, ALL_REDUCE)) == 1


def test_two_ranks_two_micro_batches_communicate_once_and_equal_the_plain_sum(tmp_path):
    _torchrun("accumulate", tmp_path)
    want = torch.load(tmp_path / "plain_acc.pt")["grads"]
    for r in range(2):
        got = torch.load(tmp_path / f"acc{r}.pt")["grads"]
        for name, w in want.items():    # the same sums in another order: relative to the tensor's scale
            assert float((got[name] - w).abs().max() / w.abs().max().clamp(min=1e-12)) <= 1e-6, name


def test_zero2_program_outputs_one_gradient_shard_per_bucket(tiny_train):
    from mmgraph.passes.data_parallel import REDUCE_SCATTER

    dp = run_pass("data_parallel", make_data_parallel(4, bucket_bytes=20_000, shard_gradients=True), tiny_train)
    verify_structure(dp, "data_parallel")
    assert [s.kind for s in dp.outputs] == ["loss"] + ["grad_shard"] * len(dp.collectives)
    assert len(_collectives(dp, REDUCE_SCATTER)) == len(dp.collectives)
    for b, node in zip(dp.collectives, list(dp.gm.graph.output_node().args[0])[1:]):
        assert b.numel % 4 == 0 and node.meta["val"].numel() == b.numel // 4


def test_zero2_two_ranks_train_like_one_process(tmp_path):
    _torchrun("zero2", tmp_path)
    for r in range(2):
        res = torch.load(tmp_path / f"zero2_{r}.pt")
        for name, want in res["ref"].items():
            got = res["weights"][name]
            assert float((got - want).abs().max() / want.abs().max().clamp(min=1e-12)) <= 1e-5, name
        assert res["state"].keys() == res["ref_state"].keys()
        for key, want in res["ref_state"].items():
            assert float((res["state"][key].float() - want.float()).abs().max()
                         / want.float().abs().max().clamp(min=1e-12)) <= 1e-5, key
        assert res["state_bytes"] <= 0.55 * res["ref_bytes"]


def test_compile_world_size_dumps_collectives_and_reports_scaling(tmp_path, capsys):
    import json

    from mmgraph.cli import main

    rc = main(["compile", "--params", str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"),
               "--model_dir", str(tmp_path), "--world_size", "2", "--target", "h100", "--verify"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "data_parallel" in out and "data parallel on h100 systems (ring)" in out
    dumps = tmp_path / "compile"
    assert "_c10d_functional.all_reduce" in (dumps / "program.py").read_text()
    assert "_c10d_functional.all_reduce" in (dumps / "07-data_parallel.txt").read_text()
    assert "all_reduce" in (dumps / "program.mlir").read_text()
    report = json.loads((dumps / "report.json").read_text())
    assert [p["systems"] for p in report["scaling"]["points"]] == [1, 2, 4, 8, 16]
    assert "Data parallel on N systems" in (dumps / "report.html").read_text()


def test_executors_declare_what_they_run(tiny_train):
    """The registry's classes in the executors' declarations: collectives only in the reference."""
    from mmgraph.core.errors import UserError
    from mmgraph.runtime.executors import make_executor

    dp = run_pass("data_parallel", make_data_parallel(2), tiny_train)
    params = load_params(str(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"), "train")
    with pytest.raises(UserError, match=r"compiled does not run _c10d_functional.all_reduce.default \(node %all_reduce"):
        make_executor("compiled", dp, params, torch.device("cpu"))
    assert make_executor("reference", dp, params, torch.device("cpu")) is not None


def _max_rel(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[n] - w).abs().max() / w.abs().max().clamp(min=1e-12)) for n, w in want.items())


def _norm_rel(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max(float((got[n] - w).norm() / w.norm().clamp(min=1e-12)) for n, w in want.items())


def test_resume_and_initial_weights_in_every_direction(tmp_path):
    """{one process, DDP, ZeRO-1, ZeRO-2} -> the same four, resumed (weights, optimizer state,
    step) and from ``--checkpoint_path`` (weights only). ZeRO-2 once kept shards cloned before
    the load and gathered them back (0.18 and 0.50 away)."""
    _torchrun("resume_matrix", tmp_path)
    res = torch.load(tmp_path / "matrix.pt")
    cases = [k for k in res if not k.startswith("reference")]
    assert len(cases) == 32
    far = {}
    for case in cases:
        how, pair = case.split(" ")
        src, dst = pair.split("->")
        # what the move itself does: the same checkpoint continued by one process
        moved = _max_rel(res[case], res[f"{how} {src}->single"])
        # and against one process throughout (the source's own data-parallel rounding included)
        whole = _norm_rel(res[case], res["reference_resume" if how == "resume" else "reference_initial"])
        if moved > 1e-5 or whole > 1e-5:
            far[case] = (moved, whole)
    assert not far, far
