"""Quick modes of the benchmark scripts and the report renderer, so they never rot (numbers
are not asserted: tiny sizes on a shared machine measure nothing). The quick runs that take about
a minute each (compile, remat, data parallel, startup) are marked slow: `make test-all` runs them;
their targets' logic is tested here without them."""

from __future__ import annotations

import json
import statistics
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks import report, targets, targets_runtime

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def _svgs_parse(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.glob("*.svg"))
    for name in names:
        ET.parse(folder / name)                       # well-formed XML
    return names


@pytest.mark.slow                  # about a minute: run by `make test-all`
def test_compile_benchmark_quick():
    from benchmarks.bench_compile import TINY, format_table, mlir_peer, run, torch_compile_peer

    result = run(TINY, [2, 3], repeats=1, warmup=False)
    assert [r["depth"] for r in result["rows"]] == [2, 3]
    assert all(r["seconds_median"] > 0 and r["peak_rss_gb_median"] > 0 for r in result["rows"])
    # The peers' plumbing: fresh processes, an empty Inductor cache, the MLIR import. Backend
    # "eager" (Dynamo only) keeps this to seconds; `make bench` runs Inductor.
    peer = torch_compile_peer(TINY, 1, 1, backend="eager", warmup=False)
    assert peer["torch_compile_first_call"]["median_s"] > 0 and peer["mmgraph_compile"]["median_s"] > 0
    assert peer["ratio"] > 0
    result["torch_compile"] = peer
    result["mlir"] = mlir_peer(TINY, 1)
    assert result["mlir"]["to_mlir"]["median_s"] > 0 and result["mlir"]["mlir_lines"] > 100
    table = format_table(result)
    assert "| 3 |" in table and "torch.compile first call" in table and "to_mlir / trace" in table
    assert "not a measurement" in table                # a non-Inductor backend says so
    assert set(report.plot_compile(result)) == {"compile_depth", "compile_peers"}


def test_simulator_benchmark_quick():
    from benchmarks.bench_simulator import format_table, run_rounds
    from mmgraph.core.target import load_target

    result = run_rounds(["tiny"], 1, 2, lambda: load_target("cs2"))   # any target runs; fidelity needs host
    assert len(result["ratio_rounds"]["tiny"]) == 2 and "Median of 2 rounds" in format_table(result)
    (row,) = result["rows"]
    assert row["eager"]["median_s"] > 0 and row["reference"]["median_s"] > 0 and row["predicted_s"] > 0
    assert row["ratio_vs_reference"] > 0 and row["ops"] > 0 and row["reference_program"]["median_s"] > 0
    assert "| tiny |" in format_table(result) and "predicted micro-step" in format_table(result)
    (tiny, small) = targets.simulator_targets(result)
    assert "reference executor" in tiny.measured and small.status == "not measured yet"
    report.plot_simulator(result)


def test_data_benchmark_quick():
    from benchmarks.bench_data import format_table, run as run_data

    result = run_data(40, workers=1, batches=2, steps=1, warmup=1, pre_repeats=1)
    assert result["preprocess_samples_per_s"] > 0 and result["loader_vs_step"] > 0
    assert "samples/s" in format_table(result)
    assert [t.status for t in targets.data_targets(result)] != ["not measured yet"] * 2


def test_step_ratios_are_paired_by_round():
    """A host that gets busy for a while: it slows rounds 2-4 of the variant timed second in a
    round (compiled) but rounds 3-4 only of the first (torch.compile, eager). The rounds' ratios
    (paired) keep the variant's true 0.9x where the ratio of the medians reads 1.44x; issue 31's
    target is judged on the paired ratio. Red when ``paired`` pairs across rounds or the target
    reads the medians."""
    from benchmarks.bench_runtime import paired
    from benchmarks.targets_runtime import speed_targets

    first, second = [1, 1, 1.6, 1.6, 1], [1, 1.6, 1.6, 1.6, 1]
    rounds = {"eager": [0.22 * k for k in first], "torch.compile": [0.2 * k for k in first],
              "compiled": [0.18 * k for k in second]}
    timed = {k: {"median_s": statistics.median(v), "rounds_s": v} for k, v in rounds.items()}
    got = paired(timed, "compiled")
    assert got["torch.compile"] == pytest.approx(0.9) and got["eager"] == pytest.approx(0.18 / 0.22)
    assert timed["compiled"]["median_s"] / timed["torch.compile"]["median_s"] == pytest.approx(1.44)
    rows = [{"variant": k, "median_s": v["median_s"], "ratio": v["median_s"] / timed["eager"]["median_s"],
             "first_call_s": 1.0, "paired": paired(timed, k)} for k, v in timed.items()]
    comp = speed_targets([{"size": "small", "train": rows}])[0]
    assert comp.measured == "0.90x" and comp.status == "met"


def test_runtime_benchmark_quick():
    from benchmarks.bench_runtime import cases, format_table, run as run_runtime

    # torch.compile variants are left to `make bench` (first calls take minutes); the compiled
    # executor itself is tested in test_runtime. Streaming on the CPU: the split, nothing copied.
    result = run_runtime("tiny", 1, memory=True, variants=("eager", "reference", "streaming"))
    assert result["device"] == "cpu" and result["batch"] >= 1
    assert [r["variant"] for r in result["train"]] == ["eager", "reference", "streaming"]
    # Tiny steps can fit in heap the compiler freed, so their peak above the baseline may be ~0.
    assert all(r["median_s"] > 0 and isinstance(r["peak_mb"], float) for r in result["train"])
    assert result["streaming_vs_in_memory"] > 0
    assert [r["variant"] for r in result["eval"]] == ["eager", "reference", "onnxruntime"]
    assert "| streaming |" in format_table(result) and "Weight streaming / in-memory" in format_table(result)
    found = targets.runtime_targets(result)
    (ref, compiled, _, stream), (gpu, gpu_stream) = found[:4], found[-2:]
    speed = [t for t in found if t.source == targets.SPEED]          # issue 31's: small and medium, not tiny
    assert len(speed) == 6 and all(t.status == "not measured yet" for t in speed)
    assert compiled.status == "not measured yet" and "tiny config" in ref.reason
    assert stream.status != "not measured yet" and "no GPU was available in this run" in gpu.reason
    assert gpu_stream.status == "not measured yet"
    assert set(report.plot_runtime(result)) == {"runtime_cpu_tiny"}
    # A file of several runs: the CPU targets from the small CPU run, the GPU ones from CUDA's.
    small, cuda = ({**result, "size": "small", "batch": 8}, {**result, "device": "cuda", "size": "medium", "batch": 8})
    ref, *_, gpu, gpu_stream = targets.runtime_targets({"runs": [small, cuda]})
    # judged from the small run (met or missed depends on one timed step: not asserted)
    assert ref.status in ("met", "missed") and "not small" not in ref.reason
    assert gpu.measured.startswith("medium config") and gpu_stream.status in ("met", "missed")
    assert set(report.plot_runtime({"runs": [small, cuda]})) == {"runtime", "runtime_cuda_medium"}
    assert "CUDA" in format_table({"runs": [small, cuda]})
    assert cases(None, None, True) == [("cpu", "tiny")] and cases("medium", "cpu", False) == [("cpu", "medium")]
    assert ("cpu", "small") in cases(None, None, False) and ("cpu", "medium") in cases(None, None, False)


def test_freeze_benchmark_quick():
    from benchmarks.bench_freeze import TINY, format_table, run

    result = run(TINY, 1, warmup=1)
    one, two = result["rows"]
    assert (one["phase"], two["phase"]) == ("phase1", "phase2")
    # Phase 1 freezes the LLM too: fewer gradients, less backward work, the same forward.
    assert one["gradient_outputs"] < two["gradient_outputs"] and one["gradient_bytes"] < two["gradient_bytes"]
    assert one["flops_backward"] < two["flops_backward"] and one["flops_forward"] == two["flops_forward"]
    assert one["step"]["median_s"] > 0 and two["program"]["median_s"] > 0
    assert "analytic total FLOPs" in format_table(result)
    report.plot_freeze(result)


def test_convert_benchmark_quick():
    from benchmarks.bench_convert import format_table, run as run_convert

    result = run_convert("quick", "200KB")
    assert result["shards"] > 1 and result["output_shards"] > 1 and result["peak_rss_bytes"] > 0
    assert "largest tensor" in format_table(result)


# -- the report ----------------------------------------------------------------------------------
NOW = {"date": "2026-01-02T03:04:05+00:00", "cpu": "Test CPU", "cores": 2, "memory_gb": 8.0, "torch_threads": 2,
       "gpu": None, "python": "3.11.0", "versions": {"torch": "2.13.0+cpu", "torch-mlir": "1", "onnx": "1",
                                                      "onnxruntime": "1", "transformers": "5"},
       "git": "abc1234", "argv": []}


@pytest.mark.slow                  # about a minute: run by `make test-all`
def test_remat_benchmark_quick():
    from benchmarks.bench_remat import TINY, format_table, run

    result = run(TINY, TINY, 2, 1, 1, targets=("cs2",))
    rows = {row["policy"]: row for row in result["predicted"][0]["rows"]}
    assert rows["none"]["extra_flops_share"] == 0 < rows["selective"]["extra_flops_share"] < rows["full"]["extra_flops_share"]
    assert rows["full"]["peak_bytes"] < rows["none"]["peak_bytes"] and rows["auto"]["fits"]
    peaks = {row["variant"]: row["peak_bytes"] for row in result["measured"]["rows"]}
    assert peaks["full"] < peaks["none"] and peaks["eager+checkpoint"] < peaks["eager"]
    assert "full / none peak" in format_table(result)
    assert [t.status for t in targets.remat_targets(result)].count("not measured yet") == 0


def test_memory_benchmark_quick():
    from benchmarks.bench_memory import TINY, format_table, run

    result = run([("", TINY)], [("", TINY)], high=4)
    row = result["fits"][0]
    assert row["fits"] and row["estimated_peak_bytes"] == row["peak_bytes"]
    explore = result["explore"][0]
    assert [r["micro_batch_size"] for r in explore["rows"]] == [1, 2, 3, 4] and explore["best"] in (1, 2, 3, 4)
    assert "micro_batch_size: explore" in format_table(result)


def test_gpu_cluster_benchmark_quick():
    from benchmarks.bench_gpu_cluster import RECIPES, TINY, format_table, predict

    tiny = {**RECIPES[1], "name": "tiny", "params": TINY, "batch": 8, "per_gpu": 4, "mean_tokens": 48,
            "padded_tokens": None, "samples": 800}
    row = predict(tiny, world_size=2)
    assert row["world"]["samples_per_s"] > 0 and row["predicted_h"] == pytest.approx(800 / row["world"]["samples_per_s"] / 3600)
    assert "predicted / published" in format_table({"rows": [row]})


def test_report_renders_the_results_in_the_repository(tmp_path):
    results = sorted(p.stem for p in RESULTS.glob("*.json"))
    if not results:
        pytest.skip("no results in benchmarks/results")
    out = tmp_path / "BENCHMARKS.md"
    text = report.render(RESULTS, out, tmp_path / "plots", now=NOW)
    assert out.read_text() == text
    assert "could not format" not in text
    assert "## Targets" in text
    for name in results:
        if name in report.TITLES:
            assert f"## {report.TITLES[name]}" in text
    assert "cached generation tokens/s" in text          # listed, measured or not
    for name in _svgs_parse(tmp_path / "plots"):
        assert f"plots/{name}" in text


def _synthetic() -> dict[str, dict]:
    meta = {**NOW, "argv": ["--out", "x.json"]}
    s = {"median_s": 1.0, "min_s": 0.9, "max_s": 1.2, "repeats": 5}
    rows = [{"depth": d, "seconds_median": t, "seconds_min": t, "seconds_max": t, "peak_rss_gb_median": 0.5,
             "repeats": 5} for d, t in ((8, 9.0), (16, 11.0), (32, 31.0))]
    return {
        "compile": {"params": report.BIG2, "rows": rows, "time_ratio_deepest_vs_shallowest": 31 / 9,
                    "depth_ratio": 4.0, "meta": meta,
                    "torch_compile": {"params": "configs/params_mm_llava_small.yaml", "backend": "inductor",
                                      "mmgraph_compile": {**s, "process_s_median": 2.0, "peak_rss_gb_median": 0.5},
                                      "torch_compile_first_call": {**s, "median_s": 30.0, "repeats": 3,
                                                                   "steady_step_s_median": 0.15,
                                                                   "setup_s_median": 3.0, "peak_rss_gb_median": 0.6},
                                      "ratio": 1 / 30},
                    "mlir": {"params": "configs/params_mm_llava_small.yaml", "trace": s, "compile_step": s,
                             "to_mlir": {**s, "median_s": 0.05}, "ops": 900, "mlir_chars": 1000, "mlir_lines": 2000,
                             "trace_first_call_s": 2.0, "to_mlir_first_call_s": 0.4, "ratio_vs_trace": 0.05,
                             "ratio_vs_compile_step": 0.05}},
        "simulator": {"target": "host", "target_figures": {"overhead_s": 5e-6}, "meta": meta, "rows": [
            {"config": "tiny", "eager": s, "reference": {**s, "median_s": 0.5}, "predicted_s": 0.7,
             "reference_program": {**s, "median_s": 0.4},
             "ratio_vs_reference": 1.4, "ratio_vs_eager": 0.7, "repeats": 5, "predicted_micro_step_s": 0.6,
             "predicted_optimizer_s": 0.1, "ops": 600, "predicted_overhead_s": 0.003},
            {"config": "small", "eager": s, "reference": s, "predicted_s": 1.1, "ratio_vs_reference": 1.1,
             "ratio_vs_eager": 1.1, "repeats": 5, "predicted_micro_step_s": 1.0, "predicted_optimizer_s": 0.1,
             "ops": 600, "predicted_overhead_s": 0.003}]},
        "runtime": {"size": "small", "batch": 8, "threads": 2, "repeats": 7, "compiler_residue_mb": 100.0,
                    "meta": meta, "versions": {}, "eval": [{"variant": "eager", **s, "ratio": 1.0}],
                    "train": [{"variant": v, **s, "median_s": m, "ratio": m, "first_call_s": 1.0,
                               "peak_mb": 100.0 * m, "memory_ratio": m}
                              for v, m in (("eager", 1.0), ("torch.compile", 0.9), ("reference", 1.0),
                                           ("compiled", 0.92))]},
        "data": {"samples": 4000, "workers": 2, "preprocess_samples_per_s": 900.0, "loader_batch_s_median": 0.01,
                 "train_step_s_median": 0.15, "loader_vs_step": 15.0, "meta": {**meta, "argv": ["--quick"]}},
        "generate": {"config": "small.yaml", "prompt_tokens": 40, "new_tokens": 64, "repeats": 7, "threads": 2,
                     "tokens_agree": 64, "ratio": 1.3, "meta": meta,
                     "rows": {"mmgraph": {**s, "tokens_per_s": 64.0}, "transformers": {**s, "tokens_per_s": 49.0}}},
    }


def test_report_renders_synthetic_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for name, r in _synthetic().items():
        (results / f"{name}.json").write_text(json.dumps(r))
    text = report.render(results, tmp_path / "B.md", tmp_path / "plots", now=NOW)
    assert "could not format" not in text
    assert "**Machine**: Test CPU, 2 cores, 8 GB, no GPU" in text and "**Date**: 2026-01-02" in text
    rows = {line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and line.count(" | ") >= 5}
    assert "**missed**" in rows["7B phase-2 compile <= 30 s"] and "31.00 s" in rows["7B phase-2 compile <= 30 s"]
    assert "| met |" in rows["32 layers <= 4.5x the time of 8"]
    tiny = rows["tiny: host-target prediction within 25% of the measured step"]
    assert "1.40: 40% high, against the reference executor" in tiny and "**missed**" in tiny and "700.0 ms" in tiny
    assert "the program alone (forward + backward) measured 400.0 ms against a predicted micro-step of 600.0" in tiny
    compiled = rows["`compiled` executor step <= 0.8x eager"]
    assert "**missed**" in compiled and "0.92x" in compiled and "Inductor" in compiled
    assert "| met |" in rows["`reference` executor step <= 1.05x eager"]
    # a quick run is not a measurement; a missing file is not measured
    assert "not measured yet" in rows["preprocessing >= 1,000 caption samples/s on 2 cores"]
    assert "not measured yet" in rows["peak memory < 2x the largest tensor above the fixed overhead"]
    assert "| met |" in rows["cached generation tokens/s >= 1.0x transformers `generate`"]
    assert "mmgraph compile / torch.compile first call: **0.03x**" in text
    assert "No GPU was available in this run" in text
    assert _svgs_parse(tmp_path / "plots") == ["compile_depth.svg", "compile_peers.svg", "generate.svg",
                                               "runtime.svg", "simulator.svg"]
    # With a GPU recorded, the no-GPU statement goes.
    for name in ("compile", "simulator"):
        r = json.loads((results / f"{name}.json").read_text())
        r["meta"]["gpu"] = "Some GPU"
        (results / f"{name}.json").write_text(json.dumps(r))
    for name in ("runtime", "data", "generate"):
        (results / f"{name}.json").unlink()
    text = report.render(results, tmp_path / "B.md", tmp_path / "plots", now=NOW)
    assert "No GPU was available" not in text and "Some GPU" in text
    assert _svgs_parse(tmp_path / "plots") == ["compile_depth.svg", "compile_peers.svg", "simulator.svg"]
    assert "Not measured yet: no `benchmarks/results/generate.json`" in text


def test_generate_benchmark_quick():
    from benchmarks.bench_generate import ROOT, format_table, run as run_generate

    result = run_generate(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml", 4, 1)
    assert result["tokens_agree"] == 4                 # same weights, greedy: transformers' tokens
    assert all(r["tokens_per_s"] > 0 for r in result["rows"].values())
    assert "tokens/s" in format_table(result) and result["device"] == "cpu"
    # Where CUDA is present the GPU run sits under "cuda": its table and target row follow.
    both = {**result, "cuda": {**result, "device": "cuda", "gpu": "a GPU"}}
    assert "CUDA (a GPU)" in format_table(both)
    assert [t.area for t in targets.generate_targets(both)] == ["generation", "generation (GPU)"]


def test_packing_benchmark_quick(capsys):
    from benchmarks.bench_packing import main as bench_packing

    assert bench_packing(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| phase1 |" in out and "| phase2 |" in out
    row = {"real_share": 0.9, "min_s": 1.0, "max_s": 2.0}
    result = {"phase1": {"ratio": 3.0}, "phase2": {"ratio": 1.2, "packed": row, "unpacked": {**row, "real_share": 0.45}}}
    found = targets.packing_targets(result)
    assert [t.status for t in found] == ["met", "missed"] and "real-share ratio 2.00x" in found[1].reason


@pytest.mark.slow                  # about a minute (gloo ranks): run by `make test-all`
def test_data_parallel_benchmark_quick(capsys):
    from benchmarks.bench_data_parallel import main as bench_dp

    assert bench_dp(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| 2 ranks x 1 thread (DDP) |" in out and "hidden share" in out and "ZeRO-1 state" in out


def test_data_parallel_targets():
    found = targets.data_parallel_targets({"hidden_share": 0.8, "zero1_state_ratio": 0.6})
    assert [t.status for t in found] == ["met", "missed", "met"]
    overlap = {"comm_cpu_share": 0.6, **{k: {"median_s": 0.1} for k in ("dp_s", "plain_s", "comm_s")}}
    found = targets.data_parallel_targets({"hidden_share": 0.1, "zero1_state_ratio": 0.5,
                                           "ddp": [{"overlap": overlap}, {"overlap": overlap}]})
    # the alternative: gloo's CPU share shows the CPU cannot hide half
    assert found[2].status == "met" and "60%" in found[2].reason and "at most 40%" in found[2].reason
    assert found[2].measured == "10% (at most 40% possible)"
    overlap = dict(overlap, comm_cpu_share=0.3)                   # room to hide half: not reached
    found = targets.data_parallel_targets({"hidden_share": 0.1, "zero1_state_ratio": 0.5,
                                           "ddp": [{"overlap": overlap}, {"overlap": overlap}]})
    assert found[2].status == "missed" and "at most 70%" in found[2].reason


@pytest.mark.slow                  # about a minute (fresh processes): run by `make test-all`
def test_startup_benchmark_quick(capsys):
    from benchmarks.bench_startup import main as bench_startup

    assert bench_startup(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| loaded from the artifact |" in out and "| traced and lowered |" in out


def test_startup_targets():
    found = targets.startup_targets({"ratio": 0.5, "artifact": {"median_s": 2.0}, "traced": {"median_s": 4.0}})
    assert found[0].status == "missed" and "tracing adds 2.0 s" in found[0].reason


def test_legalize_benchmark_quick():
    from benchmarks import report
    from benchmarks.bench_legalize import format_table, run

    result = run(quick=True, repeats=2)
    table = format_table(result)
    assert "legalized (cirh-2.10.0)" in table and "host/GPU (h100)" in table
    rows = {r["program"]: r for r in result["step"]["rows"]}
    # the three programs compute the same loss (the legalized one within rounding)
    assert abs(rows["cs2 legalized"]["loss"] - rows["cs2 not legalized"]["loss"]) < 1e-4
    assert rows["cs2 legalized"]["ops"] > rows["cs2 not legalized"]["ops"]
    assert all(r["ok"] is not False for r in result["lowering"]["rows"])
    assert all(t.status == "not measured yet" for t in report.TARGETS["legalize"](result))   # quick: not judged


def test_modelzoo_benchmark_quick(capsys):
    from benchmarks.bench_modelzoo import main as bench_modelzoo

    assert bench_modelzoo(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "| mmgraph (`mmgraph run`, reference executor) |" in out and "skipped: not asked (--quick)" in out


def test_the_memory_target_says_what_compiling_left_where_measured():
    """The compiled executor over the memory limit with the reference within it: the reason splits
    its peak into what the process holds between steps and the steps' rise (red when the split is
    dropped); without ``held_mb`` the target stays unexplained."""
    rows = [{"variant": "eager", "ratio": 1.0, "memory_ratio": 1.0, "peak_mb": 200, "held_mb": 160},
            {"variant": "reference", "ratio": 1.0, "memory_ratio": 0.9, "peak_mb": 180, "held_mb": 100},
            {"variant": "compiled", "ratio": 0.9, "memory_ratio": 1.3, "peak_mb": 260, "held_mb": 200}]
    mem = targets_runtime.cpu_runtime_targets({"size": "small", "train": rows})[2]
    assert mem.status == "missed" and "holds 200 MB" in mem.reason and "rise 60 MB" in mem.reason
    for row in rows:
        del row["held_mb"]
    mem = targets_runtime.cpu_runtime_targets({"size": "small", "train": rows})[2]
    assert mem.reason == targets.NOT_ANALYSED
