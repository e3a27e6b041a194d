"""The simulated target: closed-form schedules on hand-built segments, target files, fit
checks, micro_batch_size auto, and complete 7B reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmgraph.cli import main
from mmgraph.core.ir import Segment
from mmgraph.passes.cost import op_time, simulate
from mmgraph.core.precision import Precision
from mmgraph.core.target import Target, load_target, shipped_targets
from tests.conftest import TINY1, TINY2, small_memory_target

DATA = Path(__file__).parent / "data" / "broken_targets"
BF16 = Precision("bf16")


def hand_target(**changes) -> Target:
    raw = {
        "name": "hand", "kind": "wafer",
        "compute": {"cores": 1, "peak_flops": {"fp16": 1e12, "bf16": 1e12, "fp32": 5e11}, "efficiency": 0.5},
        "memory": {"bytes": 1e9, "bandwidth": 1e11, "weight_buffer_share": 0.5},
        "stream": {"bandwidth": 1e9, "weight_share": 0.5, "latency_s": 0.001},
        "external_memory": {"bytes": 1e12, "optimizer_update_rate": 1e6},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        raw[section][field] = value
    return Target.model_validate(raw)


def seg(i, weight=0, grad=0, grad_params=0, saved=0, freed=0, working=0, phase="forward") -> Segment:
    return Segment(i, phase, (f"l{i}",), (i,), ("w",) if weight else (), weight, ("w",) if grad else (),
                   grad, grad_params, 0, saved, freed, working)


def run(segments, compute, target, mbs=1, batch=1):
    return simulate(segments, compute, target, mbs, batch, 10, 10**12, BF16,
                    max(s.weight_bytes for s in segments), 0)


def test_op_time_is_the_roofline_plus_overhead():
    t = hand_target(compute__kernel_overhead_s=1e-6)
    assert op_time(10**12, 0, True, t, BF16) == pytest.approx(2.0 + 1e-6)      # 1e12 / (1e12 x 0.5)
    assert op_time(10**12, 0, False, t, BF16) == pytest.approx(1.0 + 1e-6)     # efficiency is for matmuls
    assert op_time(10, 10**11, False, t, BF16) == pytest.approx(1.0 + 1e-6)    # memory-bound


def test_op_efficiency_stretches_the_roofline_not_the_overhead():
    t = hand_target(compute__kernel_overhead_s=1e-6, compute__op_efficiency=0.5)
    assert op_time(10, 10**11, False, t, BF16) == pytest.approx(2.0 + 1e-6)


def test_op_by_op_views_cost_the_overhead_and_copies_their_bytes():
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from mmgraph.passes.cost import node_time

    gm = make_fx(lambda x: x.t().clone(), tracing_mode="fake")(torch.zeros(1000, 250))
    t = hand_target(compute__kernel_overhead_s=1e-6)
    times = {n.target.__name__.split(".")[0]: node_time(n, t, Precision("fp32")) for n in gm.graph.nodes
             if n.op == "call_function"}
    assert times["t"] == pytest.approx(1e-6)
    assert times["clone"] == pytest.approx(2 * 4 * 250_000 / 1e11 + 1e-6)      # read + write at 1e11 B/s


def test_optimizer_pays_per_gradient_tensor():
    # 1e3 params at 1e6/s = 1 ms, plus one gradient tensor at 0.5 ms: on a host (no streaming)
    # the whole update is the tail after the micro-step.
    t = hand_target(external_memory__optimizer_tensor_overhead_s=5e-4, stream__enabled=False)
    sch = run([seg(0, grad=4000, grad_params=1000, phase="backward")], [0.001], t)
    assert sch.optimizer_tail_s == pytest.approx(0.0015)


def test_stream_bound_segments():
    # stream-in = 1e6 B / (1e9 x 0.5) + 1 ms = 3 ms; compute 1 ms: the link sets the pace.
    t = hand_target()
    sch = run([seg(i, weight=10**6) for i in range(4)], [0.001] * 4, t)
    assert sch.micro_step_s == pytest.approx(4 * 0.003 + 0.001)
    assert [x.bottleneck for x in sch.times] == ["stream-in"] * 4
    assert [x.start for x in sch.times] == pytest.approx([0.003, 0.006, 0.009, 0.012])


def test_compute_bound_segments_with_double_buffering():
    # compute 5 ms > stream-in 3 ms: after the first stream, compute runs back to back; the
    # third stream waits for the first buffer (segment 0 done at 8 ms).
    t = hand_target()
    sch = run([seg(i, weight=10**6) for i in range(4)], [0.005] * 4, t)
    assert sch.micro_step_s == pytest.approx(0.003 + 4 * 0.005)
    assert sch.times[2].in_start == pytest.approx(0.008)
    assert all(x.bottleneck == "compute" for x in sch.times)


def test_gradients_and_optimizer_tail():
    # last segment: gradients 2e6 B -> 4 ms + 1 ms latency after compute; optimizer 1e3 params
    # at 1e6/s = 1 ms after that; batch of 4 in micro-batches of 2 -> two micro-steps + tail.
    t = hand_target()
    segs = [seg(0, weight=10**6), seg(1, weight=10**6, grad=2 * 10**6, grad_params=1000, phase="backward")]
    sch = run(segs, [0.001, 0.001], t, mbs=2, batch=4)
    compute_end = 0.003 + 0.003 + 0.001
    assert sch.micro_step_s == pytest.approx(compute_end + 0.005)
    assert sch.optimizer_tail_s == pytest.approx(0.001)
    assert sch.step_s == pytest.approx(2 * sch.micro_step_s + 0.001)
    assert sch.samples_per_s == pytest.approx(4 / sch.step_s)
    assert sch.grad_bytes_out == 2 * 10**6 and sch.weight_bytes_in == 2 * 10**6


def test_memory_peak_and_largest_micro_batch():
    # kept activations: +100, +50, then freed; working sets 10; buffers 2 x 1e6.
    t = hand_target()
    segs = [seg(0, weight=10**6, saved=100, working=10), seg(1, weight=10**6, saved=50, working=10),
            seg(2, weight=10**6, freed=150, working=10, phase="backward")]
    sch = run(segs, [0.001] * 3, t, mbs=2, batch=2)
    assert sch.peak_memory_bytes == 150 + 10 + 2 * 10**6
    assert sch.fits
    assert sch.max_micro_batch_size == int((1e9 - 2 * 10**6) // (160 / 2))


def test_without_streaming_weights_stay_resident():
    t = hand_target(stream__enabled=False)
    sch = simulate([seg(0, weight=10**6)], [0.002], t, 1, 1, 10, 10**9, BF16, 10**6, 5 * 10**6)
    assert sch.micro_step_s == pytest.approx(0.002) and sch.weight_bytes_in == 0
    assert sch.peak_memory_bytes == 5 * 10**6


@pytest.mark.parametrize("name", shipped_targets())
def test_shipped_targets_load_and_cite_sources(name):
    t = load_target(name)
    assert t.sources and t.assumptions


EXPECTED = {
    "bad_range.yaml": "stream.weight_share: must be less than or equal to 1 (got 1.5)",
    "missing_key.yaml": "stream.bandwidth: required key is missing",
    "unknown_key.yaml": "compute.efficency: unknown key (did you mean 'efficiency'?)",
    "wrong_type.yaml": "memory.bytes: must be a valid number, unable to parse string as a number (got 'forty GB')",
    "yaml_syntax.yaml": "line 11, column 5: YAML syntax error: expected ',' or ']', but got '<scalar>' "
                        "(while parsing a flow sequence started at line 10, column 11)",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_target_files(name, capsys, tmp_path):
    path = DATA / name
    assert main(["compile", "--params", str(TINY1), "--model_dir", str(tmp_path), "--target", str(path)]) == 2
    assert capsys.readouterr().err == f"mmgraph: error: {path}: {EXPECTED[name]}\n"


def test_unknown_target_name(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MMGRAPH_HOME", str(tmp_path))
    assert main(["compile", "--params", str(TINY1), "--target", "cs4"]) == 2
    assert "unknown target 'cs4' (did you mean 'cs3'?)" in capsys.readouterr().err
    assert main(["compile", "--params", str(TINY1), "--target", "host"]) == 2
    assert "no host target yet: run `mmgraph calibrate`" in capsys.readouterr().err


def test_fit_failure_names_the_largest_micro_batch(tmp_path, capsys):
    target = small_memory_target(tmp_path, 6e6, mechanisms=False)
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path), "--target", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"mmgraph: error: {TINY2}: train_input.micro_batch_size: 8 does not fit on cs2: " in err
    assert "the largest micro_batch_size that fits is" in err
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    assert report["target"]["fits"] is False  # the dumps are still there to inspect


def test_micro_batch_size_auto_picks_the_largest_divisor_that_fits(tmp_path, capsys):
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"]["micro_batch_size"] = "auto"
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    target = small_memory_target(tmp_path, 6e6)
    assert main(["compile", "--params", str(params), "--model_dir", str(tmp_path), "--target", str(target)]) == 0
    out = capsys.readouterr().out
    chosen = int(out.split("micro_batch_size auto: ")[1].split()[0])
    report = json.loads((tmp_path / "compile" / "report.json").read_text())["target"]
    assert report["fits"] and report["micro_batch_size"] == chosen and 8 % chosen == 0
    assert chosen * 2 > report["max_micro_batch_size"] or chosen == 8  # the next divisor would not fit


def test_phase1_streams_fewer_gradient_bytes_than_phase2(tmp_path):
    reports = {}
    for path in (TINY1, TINY2):
        assert main(["compile", "--params", str(path), "--model_dir", str(tmp_path / path.stem)]) == 0
        reports[path] = json.loads((tmp_path / path.stem / "compile" / "report.json").read_text())["target"]
    assert 0 < reports[TINY1]["gradient_bytes_out_per_micro_step"] < reports[TINY2]["gradient_bytes_out_per_micro_step"]
    assert reports[TINY1]["weight_bytes_in_per_micro_step"] == reports[TINY2]["weight_bytes_in_per_micro_step"]
