"""The memory model of weight streaming (passes/memory.py): figures scale with the micro-batch from
one trace, each mechanism (pieces, offload) makes a step fit that does not fit without it, the
planner's estimate is the simulated peak, and ``micro_batch_size: explore`` prints its table."""

from __future__ import annotations

import json

import pytest
import yaml

from mmgraph.cli import main
from mmgraph.core.batchscale import BatchScaling
from mmgraph.core.config import load_params
from mmgraph.core.opcost import kernel_io_bytes
from mmgraph.core.target import Target, load_target
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import CONFIGS, TINY2


def _fused(params, m):
    return [s for s in compile_step(params, micro_batch_size=m, remat="none") if s.name == "fusion"][0].program


def test_figures_scale_with_the_micro_batch():
    """Bytes in and out of every kernel and its FLOPs at micro-batches 2 and 5, predicted from
    the program traced at 3, equal those of the programs traced at 2 and 5."""
    params = load_params(TINY2)
    at3 = _fused(params, 3)
    scaling = BatchScaling(at3)
    nodes3 = {n.name: n for n in at3.gm.graph.nodes}
    fb = params.precision.bytes
    assert scaling.fixed and any(not scaling.value(n, fb).fixed for n in at3.ops())   # both kinds exist
    for m in (2, 5):
        other = _fused(params, m)
        nodes = {n.name: n for n in other.gm.graph.nodes}
        kernels = {k.id: k for k in other.kernels}
        for k3 in at3.kernels:
            k = kernels[k3.id]
            assert scaling.kernel_io(k3, nodes3, fb).at(m) == pytest.approx(kernel_io_bytes(k, nodes, fb)), k.nodes
            assert scaling.kernel_flops(k3, nodes3).at(m) == pytest.approx(k.flops, rel=1e-3, abs=2), k.nodes


def _target(tmp_path, memory_bytes, pieces=True, offload=True, name="small"):
    raw = yaml.safe_load((CONFIGS / "targets" / "cs2.yaml").read_text())
    raw["memory"]["bytes"] = float(memory_bytes)
    raw["memory"]["weight_buffer_share"] = 1.0        # the tiny model's segments stay whole at any of these sizes
    raw["mechanisms"]["pieces"]["enabled"] = pieces
    raw["mechanisms"]["offload"]["enabled"] = offload
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_target(str(path))


def _compile(params, target, remat=None):
    return compile_step(params, target=target, remat=remat)[-1].program


@pytest.fixture(scope="module")
def peaks(tmp_path_factory):
    """The simulated peak of the tiny phase-2 step with full recomputation, and its parts."""
    params = load_params(TINY2)
    roomy = _target(tmp_path_factory.mktemp("t"), 40e9, pieces=False, offload=False)
    program = _compile(params, roomy, remat="full")
    return params, program


def test_pieces_make_a_step_fit_that_recompute_alone_does_not(tmp_path, peaks):
    params, full = peaks
    sched = full.schedule
    # room for everything kept, the buffers and a fraction of the largest working set
    mp = full.memory
    memory = mp.estimated_peak_bytes - 0.6 * mp.working_bytes
    without = _compile(params, _target(tmp_path, memory, pieces=False, offload=False))
    assert not without.schedule.fits
    program = _compile(params, _target(tmp_path, memory, pieces=True, offload=False, name="pieces"))
    plan, s = program.memory, program.schedule
    assert s.fits and plan.fits and "pieces" in plan.mechanisms and not plan.offloaded
    assert plan.segment_pieces and plan.piece_samples < program.batch_size
    assert any(seg.pieces > 1 for seg in program.segments) and s.piece_overhead_s > 0
    assert s.peak_memory_bytes < sched.peak_memory_bytes
    assert plan.estimated_peak_bytes == pytest.approx(s.peak_memory_bytes, rel=1e-6)


def _deeper(tmp_path, layers: int):
    """The tiny phase-2 model with more LLM layers: an offloaded layer comes back one segment
    before its backward, so offload saves memory at the top of the backward only below it."""
    raw = yaml.safe_load(TINY2.read_text())
    raw["model"]["text_model"]["num_hidden_layers"] = layers
    path = tmp_path / "deeper.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_offload_makes_a_step_fit_and_moves_the_earliest_layers(tmp_path):
    params = _deeper(tmp_path, 6)
    full = _compile(params, _target(tmp_path, 40e9, pieces=False, offload=False, name="roomy"), remat="full")
    memory = full.memory.estimated_peak_bytes * 0.97      # below the least recompute alone reaches
    without = _compile(params, _target(tmp_path, memory, pieces=False, offload=False))
    assert not without.schedule.fits
    program = _compile(params, _target(tmp_path, memory, pieces=False, offload=True, name="offload"), remat="full")
    plan, s = program.memory, program.schedule
    assert s.fits and plan.offloaded and "offload" in plan.mechanisms
    assert plan.offloaded == tuple(f"text_model.layers.{i}" for i in range(len(plan.offloaded)))   # earliest first
    out = sum(seg.offload_bytes for seg in program.segments if seg.phase == "forward")
    back = sum(seg.reload_bytes for seg in program.segments if seg.phase == "backward")
    assert out == back == plan.offload_bytes == s.offload_bytes > 0
    assert any(t.offload_s > 0 for t in s.times) and any(t.reload_s > 0 for t in s.times)
    assert plan.estimated_peak_bytes == pytest.approx(s.peak_memory_bytes, rel=1e-6)


def test_planner_estimate_is_the_simulated_peak(tmp_path, peaks):
    """Exact: the planner counts what the passes count, with recomputed values fused into the
    backward kernels that read them (the wafer's attention keeps its scores: a recomputed softmax
    fused with its backward is the largest kernel) and, where layers differ in policy, a value
    outside the layers (the attention mask) kept until the last layer that reads it."""
    params, full = peaks
    for f in (1.5, 0.9, 0.7):
        memory = full.memory.estimated_peak_bytes * f
        program = _compile(params, _target(tmp_path, memory, name=f"m{int(memory)}"))
        assert program.memory.estimated_peak_bytes == pytest.approx(program.schedule.peak_memory_bytes, rel=1e-6), f
        assert program.memory.fits == program.schedule.fits
        assert program.memory.estimated_step_s == pytest.approx(program.schedule.micro_step_s, rel=0.05)


def test_target_without_mechanisms_offers_recompute_only(tmp_path):
    target = _target(tmp_path, 40e9, pieces=False, offload=False)
    assert target.mechanisms.names() == ("recompute",)
    raw = yaml.safe_load((CONFIGS / "targets" / "cs3.yaml").read_text())
    raw["mechanisms"]["pieces"]["overhead_s"] = -1
    with pytest.raises(Exception):
        Target.model_validate(raw)


def _params(tmp_path, mbs):
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"]["micro_batch_size"] = mbs
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_explore_prints_every_candidate_and_compiles_the_best(tmp_path, capsys, peaks):
    params, full = peaks
    target = tmp_path / "t.yaml"
    raw = yaml.safe_load((CONFIGS / "targets" / "cs2.yaml").read_text())
    raw["memory"]["bytes"] = float(full.memory.estimated_peak_bytes * 0.45)   # 4 needs a mechanism
    target.write_text(yaml.safe_dump(raw))
    path = _params(tmp_path, {"explore": {"min": 2, "max": 7}})
    assert main(["compile", "--params", str(path), "--model_dir", str(tmp_path / "md"), "--target", str(target)]) == 0
    out = capsys.readouterr().out
    table = out.split("micro_batch_size explore on cs2: 2 .. 7")[1].split("micro_batch_size explore: ")[0]
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    assert [int(r[0]) for r in rows] == [2, 3, 4, 5, 6, 7]
    best = int(out.split("micro_batch_size explore: ")[1].split()[0])
    marked = [r for r in rows if "<-" in r]
    assert len(marked) == 1 and int(marked[0][0]) == best
    report = json.loads((tmp_path / "md" / "compile" / "report.json").read_text())
    assert report["target"]["micro_batch_size"] == best and report["target"]["fits"]
    predicted = float(marked[0][-3])
    assert predicted == pytest.approx(report["target"]["samples_per_s"], rel=0.05)
    assert report["memory"]["mechanisms"] and "memory on cs2: fits" in out


@pytest.mark.parametrize("value,message", [
    ({"explore": {"min": 5, "max": 2}}, "explore.max (2) is below explore.min (5)"),
    ({"explore": {"least": 1}}, "explore: unknown key 'least'"),
    ({"explor": {}}, "must be a positive integer, auto, explore, none or {explore: {min: N, max: M}}"),
])
def test_explore_bounds_are_checked(tmp_path, capsys, value, message):
    path = _params(tmp_path, value)
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: train_input.micro_batch_size: {message}" in err


# -- GPU clusters with weights resident (passes/cluster.py) --------------------------------------
def test_zero_stages_partition_the_model_states():
    from mmgraph.core.ir import InputKind
    from mmgraph.passes.cluster import state_bytes

    params = load_params(TINY2)
    program = _fused(params, 2)
    specs = [s for s in program.inputs if s.kind == InputKind.PARAM]
    total, trainable = sum(s.numel for s in specs), sum(s.numel for s in specs if s.trainable)
    assert 0 < trainable < total
    bf16 = type(params.precision)("bf16")
    ddp = state_bytes(program, bf16, 8, 0)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (2 * total, 2 * trainable, 12 * trainable)  # ZeRO paper
    z1, z2, z3 = (state_bytes(program, bf16, 8, z) for z in (1, 2, 3))
    assert z1.optimizer * 8 == ddp.optimizer and z1.gradients == ddp.gradients
    assert z2.gradients * 8 == ddp.gradients and z2.weights == ddp.weights
    assert z3.weights * 8 == ddp.weights
    assert ddp.total > z1.total > z2.total > z3.total


def test_world_on_gpus_counts_collectives_and_states(tmp_path, capsys):
    out = {}
    for zero in (2, 3):
        md = tmp_path / f"z{zero}"
        assert main(["compile", "--params", str(TINY2), "--model_dir", str(md), "--target", "a100_80gb",
                     "--world_size", "8", "--zero", str(zero), "--real_tokens", "48"]) == 0
        out[zero] = json.loads((md / "compile" / "report.json").read_text())["world"]
    printed = capsys.readouterr().out
    assert "world of 8 on a100_80gb (resident weights, data parallel, ZeRO-3)" in printed
    z2, z3 = out[2], out[3]
    assert z2["world_size"] == 8 and z2["samples_per_s"] > 0 and z2["fits"]
    assert z3["gather_s"] > 0 == z2["gather_s"]                      # ZeRO-3 gathers weights per layer
    assert z3["weights_bytes"] * 8 == z2["weights_bytes"] and z3["gathered_bytes"] > 0
    assert z3["step_s"] >= z2["step_s"] - z2["optimizer_s"]          # more traffic, never less time
    assert z2["real_tokens_per_s"] == pytest.approx(z2["tokens_per_s"] * 48 / 96)   # tiny: 96 tokens a row
    assert 0 < z2["bus_bandwidth"] < 300e9                           # NVLink 3 x measured ring efficiency
