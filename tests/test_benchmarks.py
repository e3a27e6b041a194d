"""Quick modes of the benchmark scripts, so they never rot (numbers are not asserted)."""

from __future__ import annotations

from benchmarks.bench_compile import TINY, format_table, run


def test_compile_benchmark_quick():
    result = run(TINY, [2, 3], repeats=1)
    assert [r["depth"] for r in result["rows"]] == [2, 3]
    assert all(r["seconds_median"] > 0 and r["peak_rss_gb_median"] > 0 for r in result["rows"])
    assert "| 3 |" in format_table(result)
