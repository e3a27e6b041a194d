"""Compile time and peak memory of `mmgraph compile`, and how they grow with LLM depth.

Each measurement runs in a fresh process (so peak RSS is that compile's alone): the params
file with ``text_model.num_hidden_layers`` set to each depth is compiled (train mode, dumps
written to a temporary folder), and the child reports its wall time and peak RSS. Median of
``--repeats`` runs, with min and max.

    python -m benchmarks.bench_compile                  # LLaVA-7B phase 2 at depths 8, 16, 32
    python -m benchmarks.bench_compile --quick          # tiny config at depths 2, 4, 8 (tests)

Targets (issue: compiler): 7B phase 2 at depth 32 in <= 30 s with peak RSS <= 3 GB; the
time at 32 layers <= 4.5x the time at 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import finish

ROOT = Path(__file__).resolve().parent.parent
BIG = ROOT / "configs" / "params_mm_llava_llama2_7b_phase2.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"

_CHILD = """
import json, re, sys, time
t = time.perf_counter()
from mmgraph.cli import main
code = main(["compile", "--params", sys.argv[1], "--model_dir", sys.argv[2]])
seconds = time.perf_counter() - t
print(json.dumps({"code": code, "seconds": seconds,
                  # VmHWM: ru_maxrss would carry the forking parent's peak
                  "peak_rss_gb": int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1e6}))
"""


def measure(params: Path, depth: int, workdir: Path) -> dict:
    raw = yaml.safe_load(params.read_text())
    raw["model"]["text_model"]["num_hidden_layers"] = depth
    path = workdir / f"depth{depth}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(workdir / f"md{depth}")],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"compile failed at depth {depth}: {out.stderr[-2000:]}")
    return result


def run(params: Path, depths: list[int], repeats: int) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for depth in depths:
            runs = [measure(params, depth, Path(tmp)) for _ in range(repeats)]
            secs = [r["seconds"] for r in runs]
            rss = [r["peak_rss_gb"] for r in runs]
            rows.append({"depth": depth, "seconds_median": statistics.median(secs), "seconds_min": min(secs),
                         "seconds_max": max(secs), "peak_rss_gb_median": statistics.median(rss),
                         "repeats": repeats})
    first, last = rows[0], rows[-1]
    return {
        "params": str(params.relative_to(ROOT)),
        "rows": rows,
        "time_ratio_deepest_vs_shallowest": last["seconds_median"] / first["seconds_median"],
        "depth_ratio": last["depth"] / first["depth"],
    }


def format_table(result: dict) -> str:
    lines = [f"compile of {result['params']} (train step, dumps written), median of "
             f"{result['rows'][0]['repeats']} runs", "",
             "| LLM layers | seconds (median) | min | max | peak RSS GB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['depth']} | {r['seconds_median']:.2f} | {r['seconds_min']:.2f} | "
                     f"{r['seconds_max']:.2f} | {r['peak_rss_gb_median']:.2f} |")
    lines.append("")
    lines.append(f"time at {result['rows'][-1]['depth']} layers / time at {result['rows'][0]['depth']}: "
                 f"{result['time_ratio_deepest_vs_shallowest']:.2f}x (depth ratio {result['depth_ratio']:.0f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, depths 2 4 8, one run each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        result = run(TINY, [2, 4, 8], 1)
    else:
        result = run(BIG, [8, 16, 32], args.repeats)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
