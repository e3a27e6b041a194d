"""Quick modes of the benchmark scripts, so they never rot (numbers are not asserted)."""

from __future__ import annotations

from benchmarks.bench_compile import TINY, format_table, run


def test_compile_benchmark_quick():
    result = run(TINY, [2, 3], repeats=1)
    assert [r["depth"] for r in result["rows"]] == [2, 3]
    assert all(r["seconds_median"] > 0 and r["peak_rss_gb_median"] > 0 for r in result["rows"])
    assert "| 3 |" in format_table(result)


def test_simulator_benchmark_quick():
    from benchmarks.bench_simulator import format_table
    from benchmarks.bench_simulator import run as run_sim
    from mmgraph.target import load_target

    result = run_sim(["tiny"], 1, load_target("cs2"))   # any target runs; fidelity needs host
    (row,) = result["rows"]
    assert row["measured_s_median"] > 0 and row["predicted_s"] > 0
    assert "| tiny |" in format_table(result)


def test_calibrate_writes_a_valid_host_target(tmp_path, monkeypatch):
    from mmgraph.calibrate import host_target, measure
    from mmgraph.cli import main
    from mmgraph.target import Target, load_target

    figures = measure(size=128, repeats=1)
    target = Target.model_validate(host_target(figures))
    assert target.compute.granularity == "op" and not target.stream.enabled
    assert 0 < target.matmul_share(1e3) <= 1 and target.compute.transcendental_rate > 0
    monkeypatch.setenv("MMGRAPH_HOME", str(tmp_path))
    monkeypatch.setattr("mmgraph.calibrate.measure", lambda device, size: figures)
    assert main(["calibrate"]) == 0
    assert load_target("host").name == "host"


def test_data_benchmark_quick():
    from benchmarks.bench_data import format_table
    from benchmarks.bench_data import run as run_data

    result = run_data(40, workers=1, batches=2)
    assert result["preprocess_samples_per_s"] > 0 and result["loader_vs_step"] > 0
    assert "samples/s" in format_table(result)


def test_runtime_benchmark_quick():
    from benchmarks.bench_runtime import format_table
    from benchmarks.bench_runtime import run as run_runtime

    # torch.compile variants are left to `make bench` (first calls take minutes); the compiled
    # executor itself is tested in test_runtime.
    result = run_runtime("tiny", 1, memory=True, variants=("eager", "reference"))
    assert [r["variant"] for r in result["train"]] == ["eager", "reference"]
    assert all(r["median_s"] > 0 and r["peak_mb"] > 0 for r in result["train"])
    assert [r["variant"] for r in result["eval"]] == ["eager", "reference", "onnxruntime"]
    assert "| reference |" in format_table(result)


def test_convert_benchmark_quick():
    from benchmarks.bench_convert import format_table
    from benchmarks.bench_convert import run as run_convert

    result = run_convert("quick", "200KB")
    assert result["shards"] > 1 and result["output_shards"] > 1 and result["peak_rss_bytes"] > 0
    assert "largest tensor" in format_table(result)
