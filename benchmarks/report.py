"""Render BENCHMARKS.md from benchmarks/results/*.json: the machine, versions and date, the
targets (met, missed with the measured number and the reason, or not measured yet), a section
per script with its tables and the texts that explain them, and SVG plots under
benchmarks/plots/.

    python -m benchmarks.report                          # results/ -> BENCHMARKS.md, plots/
    python -m benchmarks.report --results DIR --out FILE --plots DIR

Every table comes from the script's own ``format_table`` (so the script's printout and the
document agree); the prose lives in benchmarks/report_text.py. BENCHMARKS.md is generated: edit
those, not it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

from benchmarks.report_text import INTRO, TITLES, notes
from benchmarks.svg import Bar, Line, hbar
from benchmarks.targets import BIG2, TARGETS, sim_measured, targets_table
from benchmarks.targets_runtime import runtime_runs

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PLOTS = ROOT / "benchmarks" / "plots"
OUT = ROOT / "BENCHMARKS.md"
ORDER = ("compile", "simulator", "runtime", "freeze", "remat", "memory", "gpu_cluster", "data", "convert", "generate",
         "packing", "data_parallel", "startup", "modelzoo", "legalize")
BENCH_MINUTES = 75      # `make bench` on 2 cores: 11 min 57 s measured on 2026-11-25, before bench_modelzoo (about 4 min with the Model Zoo, 2026-12-01), the simulator's 3 rounds (+40 s), bench_remat (+4 min, 2026-11-28), bench_packing (about 2 min), bench_legalize (about 12 min on a quiet machine, estimated; 26 min measured on a shared one, 2026-12-01), bench_memory (35 min on a loaded machine, 2026-12-02: 14 compiles of 7B and 13B steps, two explores) and bench_gpu_cluster (8 min); none timed within make bench


# -- plots ---------------------------------------------------------------------------------------
def _bar(label: str, s: dict, scale: float = 1.0, series: str = "", note: str = "") -> Bar:
    return Bar(label, s["median_s"] * scale, s.get("min_s", s["median_s"]) * scale,
               s.get("max_s", s["median_s"]) * scale, series, note)


def _runs(n: int) -> str:
    return f"({n} run{'' if n == 1 else 's'})"


def plot_compile(r: dict) -> dict[str, str]:
    out = {"compile_depth": hbar(
        f"mmgraph compile, {Path(r['params']).stem}: seconds by LLM depth",
        [Bar(f"{row['depth']} layers", row["seconds_median"], row["seconds_min"], row["seconds_max"])
         for row in r["rows"]], "seconds (fresh process, imports included)",
        (Line(30, "target: 30 s at 32 layers", "#c00000"),) if r.get("params") == BIG2 else ())}
    tc, ml = r.get("torch_compile"), r.get("mlir")
    if tc or ml:
        bars = []
        if tc:
            bars += [_bar("mmgraph compile", tc["mmgraph_compile"], series="vs torch.compile",
                          note=_runs(tc['mmgraph_compile']['repeats'])),
                     _bar("torch.compile first call", tc["torch_compile_first_call"], series="vs torch.compile",
                          note=_runs(tc['torch_compile_first_call']['repeats']))]
        if ml:
            bars += [_bar("trace_step", ml["trace"], series="vs torch-mlir"),
                     _bar("compile_step", ml["compile_step"], series="vs torch-mlir"),
                     _bar("to_mlir (torch-mlir import)", ml["to_mlir"], series="vs torch-mlir")]
        out["compile_peers"] = hbar("Compile peers, same run (median, min-max)", bars, "seconds")
    return out


def plot_simulator(r: dict) -> dict[str, str]:
    bars = []
    for row in r["rows"]:
        for key in ("reference", "eager"):
            m = sim_measured(row, key)
            if m:
                p = row["predicted_s"]
                bars.append(Bar(f"{row['config']}: predicted / {key}", p / m["median_s"], p / m["max_s"],
                                p / m["min_s"], series=key))
    return {"simulator": hbar("Simulator: predicted / measured step (whiskers: measured min-max)", bars,
                              "predicted / measured",
                              (Line(1.0, "exact"), Line(0.75, "target band: 0.75 to 1.25", "#c00000"),
                               Line(1.25, "", "#c00000")))}


def plot_runtime(r: dict) -> dict[str, str]:
    """One chart per (device, size) run: ``runtime`` for the small CPU run, ``runtime_DEVICE_SIZE`` else."""
    out = {}
    for x in runtime_runs(r):
        base = next(row for row in x["train"] if row["variant"] == "eager")["median_s"]
        bars = [Bar(f"train: {row['variant']}", row["ratio"], row["min_s"] / base, row["max_s"] / base,
                    "train step") for row in x["train"]]
        ebase = next(row for row in x["eval"] if row["variant"] == "eager")["median_s"]
        bars += [Bar(f"eval: {row['variant']}", row["ratio"], row["min_s"] / ebase, row["max_s"] / ebase,
                     "eval forward") for row in x["eval"]]
        bars += [Bar(f"memory: {row['variant']}", row["memory_ratio"], series="train peak memory")
                 for row in x["train"] if row.get("memory_ratio") is not None]
        where = "CUDA" if x["device"] == "cuda" else "CPU"
        stem = "runtime" if (x["device"], x["size"]) == ("cpu", "small") else f"runtime_{x['device']}_{x['size']}"
        out[stem] = hbar(f"Runtime, {x['size']} config, {where}: time and memory / eager PyTorch",
                         bars, "ratio to eager (lower is better)",
                         (Line(1.0, "eager (the peer)"), Line(1.05, "target: reference <= 1.05x", "#c00000"),
                          Line(0.8, "target: compiled <= 0.8x", "#c06000"),
                          Line(1.2, "target: memory <= 1.2x", "#800080")))
    return out


def plot_freeze(r: dict) -> dict[str, str]:
    ra = r["ratios"]
    bars = [Bar("measured program time (fwd + bwd)", ra["program_time"], series="measured"),
            Bar("measured step time", ra["step_time"], series="measured"),
            Bar("analytic total FLOPs", ra["flops_total"], series="analytic"),
            Bar("analytic backward FLOPs", ra["flops_backward"], series="analytic")]
    return {"freeze": hbar("Freezing: phase 1 / phase 2", bars, "ratio (phase 1 / phase 2)",
                           (Line(1.0, "phase 2 (the peer)"),))}


def plot_generate(r: dict) -> dict[str, str]:
    bars = [Bar(name, row["tokens_per_s"], row["tokens_per_s"] * row["median_s"] / row["max_s"],
                row["tokens_per_s"] * row["median_s"] / row["min_s"]) for name, row in r["rows"].items()]
    return {"generate": hbar("Generation: tokens/s (median, min-max)", bars, "tokens/s (higher is better)")}


PLOTTERS = {"compile": plot_compile, "simulator": plot_simulator, "runtime": plot_runtime,
            "freeze": plot_freeze, "generate": plot_generate}


# -- machine ---------------------------------------------------------------------------------------
def _machine_line(meta: dict) -> str:
    v = meta.get("versions", {})
    mem = f"{meta['memory_gb']:.0f} GB" if meta.get("memory_gb") else "memory unknown"
    gpu = meta["gpu"] if meta.get("gpu") else "no GPU"
    names = ", ".join(f"{k} {v[k]}" for k in ("torch", "torch-mlir", "onnx", "onnxruntime", "transformers")
                      if v.get(k))
    return (f"{meta.get('cpu', '?')}, {meta.get('cores', '?')} cores, {mem}, {gpu}; "
            f"{meta.get('torch_threads', '?')} torch threads; Python {meta.get('python', '?')}, {names}")


def _quick(r: Optional[dict]) -> bool:
    return bool(r) and "--quick" in (r.get("meta") or {}).get("argv", [])


def load_results(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")):
        out[path.stem] = json.loads(path.read_text())
    return out


def _table(name: str, r: dict) -> str:
    try:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        return module.format_table(r)
    except Exception as err:  # noqa: BLE001 - a broken section must not lose the others
        print(f"report: cannot format {name}: {err!r}", file=sys.stderr)
        scalars = {k: v for k, v in r.items() if isinstance(v, (int, float, str)) and k != "meta"}
        rows = "\n".join(f"| {k} | {v} |" for k, v in scalars.items())
        return f"(could not format with bench_{name}.format_table: {err!r})\n\n| key | value |\n|---|---|\n{rows}"


AREA_OF = {"convert": "conversion", "generate": "generation", "data_parallel": "data parallel",
           "startup": "start-up"}


def _preamble(data: dict, names: list[str], now: dict, results: Path) -> list[str]:
    """Where the figures come from: the machines, the dates, whether a GPU was there."""
    metas = {n: data[n].get("meta") for n in names}
    machines: dict[str, list[str]] = {}
    for n in names:
        line = _machine_line(metas[n]) if metas[n] else None
        if line:
            machines.setdefault(line, []).append(n)
    unrecorded = [n for n in names if not metas[n]]
    dates = sorted(m["date"][:10] for m in metas.values() if m)
    gpus = {m.get("gpu") for m in metas.values() if m} | ({now.get("gpu")} if unrecorded else set())

    where = os.path.relpath(results, ROOT) if results.resolve().is_relative_to(ROOT) else str(results)
    lines = ["# Benchmarks", "",
             f"Generated by `python -m benchmarks.report` from `{where}/*.json` (texts in "
             "`benchmarks/report_text.py`, `benchmarks/targets.py`, `benchmarks/targets_runtime.py`: edit there). "
             "Reproduce everything with `make bench` "
             f"(about {BENCH_MINUTES} minutes on 2 cores); each script also has a `--quick` mode that "
             "`tests/test_benchmarks.py` runs at tiny sizes.", ""]
    if len(machines) == 1 and not unrecorded:
        lines.append(f"**Machine**: {next(iter(machines))}.")
    else:
        for line, ns in machines.items():
            lines.append(f"- **Machine** ({', '.join(ns)}): {line}.")
        if unrecorded:
            lines.append(f"- ({', '.join(unrecorded)}: the result files do not record their machine, they "
                         f"predate that; rendered on: {_machine_line(now)}.)")
    lines.append("")
    if dates:
        span = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
        lines.append(f"**Date**: {span}" + (f" ({', '.join(unrecorded)}: not recorded)" if unrecorded else "") +
                     f"; rendered {now['date'][:10]}.")
    else:
        lines.append(f"**Date**: not recorded in the result files; rendered {now['date'][:10]}.")
    lines.append("")
    if not any(gpus):
        lines += ["**No GPU was available in this run** (`torch.cuda.is_available()` is False): every "
                  "figure is measured on the CPU, and the GPU paths (the runtime on CUDA, GPU weight "
                  "streaming) are not measured.", ""]
    lines += ["Every comparison is a ratio against its peer measured in the same run, with the peer "
              "named: the median of the repeats after warm-up, with min and max; absolute times are "
              "context. Where a figure has fewer than 5 repeats, its table says so.", ""]
    return lines


def _targets(data: dict) -> list:
    targets = []
    for area, fn in TARGETS.items():
        found = fn(data.get(area))
        if _quick(data.get(area)):
            for t in found:
                t.status, t.reason = "not measured yet", "only a `--quick` run (a plumbing check) is in the results"
        targets += found
    return targets


def _section(name: str, r: dict, targets: list, plots: Path, out: Path, written: set) -> list[str]:
    """One benchmark's section: how it was run, what it measures, its table, plots, notes, targets."""
    lines = [f"## {TITLES.get(name, name)}", ""]
    meta = r.get("meta")
    if meta:
        quick = " (**quick mode**: a plumbing check at tiny size, not a measurement)" if _quick(r) else ""
        lines += [f"Measured {meta['date'].replace('T', ' ')}; git {meta.get('git') or '?'}; "
                  f"`{' '.join(['python -m', 'benchmarks.bench_' + name] + meta.get('argv', []))}`{quick}.", ""]
    if name in INTRO:
        lines += [INTRO[name], ""]
    lines += [_table(name, r), ""]
    if name in PLOTTERS:
        try:
            charts = PLOTTERS[name](r)
        except (KeyError, StopIteration, TypeError, ZeroDivisionError) as err:
            print(f"report: no plot for {name}: {err!r}", file=sys.stderr)
            charts = {}
        for stem, svg in charts.items():
            path = plots / f"{stem}.svg"
            path.write_text(svg)
            written.add(path.name)
            lines += [f"![{stem}]({os.path.relpath(path, out.parent)})", ""]
    for text in notes(name, r):
        lines += [text, ""]
    area = [t for t in targets if t.area == AREA_OF.get(name, name)]
    if area:
        lines += [targets_table(area, full=False), ""]
    return lines


def render(results: Path = RESULTS, out: Path = OUT, plots: Path = PLOTS, now: Optional[dict] = None) -> str:
    """Write ``out`` (and the plots) from the result files in ``results``; returns the text."""
    data = load_results(results)
    if now is None:
        from benchmarks.common import environment
        now = environment()
    plots.mkdir(parents=True, exist_ok=True)
    names = [n for n in ORDER if n in data] + sorted(n for n in data if n not in ORDER)
    lines = _preamble(data, names, now, results)
    targets = _targets(data)
    lines += ["## Targets", "", targets_table(targets), ""]
    missed = [t for t in targets if t.status == "missed"]
    unmeasured = [t for t in targets if t.status == "not measured yet"]
    lines += [f"{sum(t.status == 'met' for t in targets)} met, {len(missed)} missed, "
              f"{len(unmeasured)} not measured yet.", ""]
    written: set = set()
    for name in names:
        lines += _section(name, data[name], targets, plots, out, written)
    if "generate" not in data:
        lines += [f"## {TITLES['generate']}", "", "Not measured yet: no `benchmarks/results/generate.json` "
                  "(`make bench` runs `benchmarks/bench_generate.py` when it exists).", ""]
    for stale in plots.glob("*.svg"):                 # plots of results no longer there
        if stale.name not in written:
            stale.unlink()
    text = "\n".join(lines).rstrip() + "\n"
    out.write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plots", type=Path, default=PLOTS)
    args = ap.parse_args(argv)
    render(args.results, args.out, args.plots)
    print(f"wrote {args.out} and {args.plots}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
