"""Compile time and peak memory of `mmgraph compile`, how they grow with LLM depth, and two
peers measured in the same run: torch.compile's first call and torch-mlir's import.

Depth scaling: each measurement runs in a fresh process (so peak RSS is that compile's alone):
the params file with ``text_model.num_hidden_layers`` set to each depth is compiled (train mode,
default target, every dump written to a temporary folder), and the child reports its wall time
(Python start-up and imports included) and peak RSS. One untimed warm-up run first (file cache),
then median of ``--repeats`` runs, with min and max.

Peers, on the small config (``--peer-params``):

- torch.compile: the same training step (the nn.Module from ``build_model``, one micro-batch
  from ``random_batch``, ``loss = model(**batch)``, ``torch.autograd.grad`` over the trainable
  parameters), the first call of ``torch.compile(model)`` forward + backward, in a fresh process
  with a fresh, empty Inductor cache folder and the FX-graph and AOT-autograd caches off (so no
  cache hides the compile). Timed from after imports, model build and one eager step; the
  steady compiled step after it is reported as context. Against: ``mmgraph compile`` of the same
  params in a fresh process, timed from after ``import torch`` and mmgraph's modules (trace, all
  passes and every dump, report.html included). The two alternate; ratio of medians.
- torch-mlir: ``mmgraph.report.formats.to_mlir`` of the lowered program (torch-mlir's FX importer into
  the torch dialect) against our own trace (``trace_step``) and the whole ``compile_step``, in
  this process after one warm-up of each (the first call, torch-mlir's import included, is
  reported as context); the three alternate, ratio of medians.

    python -m benchmarks.bench_compile                  # LLaVA-7B phase 2 at depths 8, 16, 32 (5 runs each);
                                                        # peers on small (torch.compile 3 runs, the rest 5)
    python -m benchmarks.bench_compile --quick          # tiny config, one run each; torch.compile with
                                                        # backend aot_eager (plumbing only, not a measurement)

Targets (issue: compiler): 7B phase 2 at depth 32 in <= 30 s with peak RSS <= 3 GB; the
time at 32 layers <= 4.5x the time at 8.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import yaml

from benchmarks.common import finish, rel, summary

ROOT = Path(__file__).resolve().parent.parent
BIG = ROOT / "configs" / "params_mm_llava_llama2_7b_phase2.yaml"
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"

_PEAK = 'int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1e6'

_CHILD = """
import json, re, sys, time
t = time.perf_counter()
import torch
import mmgraph.commands.compile, mmgraph.models, mmgraph.compiler.pipeline
from mmgraph.cli import main
imported = time.perf_counter()
code = main(["compile", "--params", sys.argv[1], "--model_dir", sys.argv[2]])
end = time.perf_counter()
print(json.dumps({"code": code, "seconds": end - t, "compile_s": end - imported,
                  # VmHWM: ru_maxrss would carry the forking parent's peak
                  "peak_rss_gb": %s}))
""" % _PEAK

_TORCH_CHILD = """
import json, re, sys, time
t = time.perf_counter()
import torch
from mmgraph.core.config import load_params
from mmgraph.models import build_model, random_batch
from mmgraph.compiler.trace import micro_batch_size
params = load_params(sys.argv[1])
model, _ = build_model(params, seed=params.runconfig.seed)
batch = random_batch(params.layout(), micro_batch_size(params, "train"), seed=1)
train = [p for p in model.parameters() if p.requires_grad]

def step(fn):
    loss = fn(**batch)
    return torch.autograd.grad(loss, train)

step(model)                                            # eager runtime start-up, not compile
compiled = torch.compile(model, backend=sys.argv[2])
ready = time.perf_counter()
step(compiled)
first = time.perf_counter() - ready
steady = []
for _ in range(2):
    s = time.perf_counter()
    step(compiled)
    steady.append(time.perf_counter() - s)
print(json.dumps({"first_call_s": first, "setup_s": ready - t, "steady_step_s": min(steady),
                  "peak_rss_gb": %s}))
""" % _PEAK


def _with_depth(params: Path, depth: Optional[int], workdir: Path) -> Path:
    if depth is None:
        return params
    raw = yaml.safe_load(params.read_text())
    raw["model"]["text_model"]["num_hidden_layers"] = depth
    path = workdir / f"depth{depth}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def measure(params: Path, depth: Optional[int], workdir: Path) -> dict:
    """`mmgraph compile` of ``params`` (LLM depth set to ``depth`` unless None) in a fresh process."""
    path = _with_depth(params, depth, workdir)
    model_dir = tempfile.mkdtemp(prefix="md", dir=workdir)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), model_dir],
                         capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(model_dir, ignore_errors=True)                  # the dumps: not kept across runs
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"compile of {path} failed: {out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"compile of {path} failed: {out.stderr[-2000:]}")
    return result


def torch_compile_first_call(params: Path, backend: str = "inductor") -> dict:
    """torch.compile's first forward + backward of the training step, in a fresh process with
    a fresh Inductor cache folder and the FX-graph / AOT-autograd caches off."""
    with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
               "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        out = subprocess.run([sys.executable, "-c", _TORCH_CHILD, str(params), backend],
                             capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0 or not out.stdout.strip():
        raise RuntimeError(f"torch.compile of {params} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(params: Path, depths: list[int], repeats: int, warmup: bool = True) -> dict:
    """Depth scaling of `mmgraph compile` (one untimed warm-up process first)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if warmup:
            measure(params, depths[0], Path(tmp))                 # warm-up: file cache
        for depth in depths:
            runs = [measure(params, depth, Path(tmp)) for _ in range(repeats)]
            secs = [r["seconds"] for r in runs]
            rss = [r["peak_rss_gb"] for r in runs]
            rows.append({"depth": depth, "seconds_median": statistics.median(secs), "seconds_min": min(secs),
                         "seconds_max": max(secs), "peak_rss_gb_median": statistics.median(rss),
                         "peak_rss_gb_max": max(rss), "repeats": repeats})
    first, last = rows[0], rows[-1]
    return {
        "params": rel(params),
        "rows": rows,
        "time_ratio_deepest_vs_shallowest": last["seconds_median"] / first["seconds_median"],
        "depth_ratio": last["depth"] / first["depth"],
    }


def torch_compile_peer(params: Path, torch_repeats: int, mmgraph_repeats: int, backend: str = "inductor",
                       warmup: bool = True) -> dict:
    """`mmgraph compile` against torch.compile's first call, alternating, each in a fresh process."""
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if warmup:
            measure(params, None, Path(tmp))                      # warm-up: file cache
        for i in range(max(torch_repeats, mmgraph_repeats)):
            if i < mmgraph_repeats:
                ours.append(measure(params, None, Path(tmp)))
            if i < torch_repeats:
                theirs.append(torch_compile_first_call(params, backend))
    mm = summary([r["compile_s"] for r in ours])
    tc = summary([r["first_call_s"] for r in theirs])
    return {
        "params": rel(params), "backend": backend,
        "mmgraph_compile": {**mm, "process_s_median": statistics.median(r["seconds"] for r in ours),
                            "peak_rss_gb_median": statistics.median(r["peak_rss_gb"] for r in ours)},
        "torch_compile_first_call": {**tc, "steady_step_s_median": statistics.median(r["steady_step_s"] for r in theirs),
                                     "setup_s_median": statistics.median(r["setup_s"] for r in theirs),
                                     "peak_rss_gb_median": statistics.median(r["peak_rss_gb"] for r in theirs)},
        "ratio": mm["median_s"] / tc["median_s"],
    }


def mlir_peer(params_path: Path, repeats: int) -> dict:
    """torch-mlir's import (``to_mlir``) of the lowered program against ``trace_step`` and the
    whole ``compile_step``, alternating in this process after one warm-up of each."""
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.compiler.trace import trace_step
    from mmgraph.core.config import load_params
    from mmgraph.report.formats import to_mlir

    params = load_params(params_path)
    start = time.perf_counter()
    trace_step(params)
    trace_first = time.perf_counter() - start
    program = compile_step(params)[-1].program
    start = time.perf_counter()
    text = to_mlir(program)
    mlir_first = time.perf_counter() - start
    times: dict[str, list[float]] = {"trace": [], "compile_step": [], "to_mlir": []}
    for _ in range(repeats):
        start = time.perf_counter()
        trace_step(params)
        times["trace"].append(time.perf_counter() - start)
        start = time.perf_counter()
        program = compile_step(params)[-1].program
        times["compile_step"].append(time.perf_counter() - start)
        start = time.perf_counter()
        to_mlir(program)
        times["to_mlir"].append(time.perf_counter() - start)
    s = {k: summary(v) for k, v in times.items()}
    return {"params": rel(params_path), **s, "ops": len(program.ops()),
            "mlir_chars": len(text), "mlir_lines": text.count("\n"),
            "trace_first_call_s": trace_first, "to_mlir_first_call_s": mlir_first,
            "ratio_vs_trace": s["to_mlir"]["median_s"] / s["trace"]["median_s"],
            "ratio_vs_compile_step": s["to_mlir"]["median_s"] / s["compile_step"]["median_s"]}


def format_table(result: dict) -> str:
    lines = [f"`mmgraph compile` of {result['params']} (train step, dumps written), fresh process each, "
             f"median of {result['rows'][0]['repeats']} runs", "",
             "| LLM layers | seconds (median) | min | max | peak RSS GB |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['depth']} | {r['seconds_median']:.2f} | {r['seconds_min']:.2f} | "
                     f"{r['seconds_max']:.2f} | {r['peak_rss_gb_median']:.2f} |")
    lines.append("")
    lines.append(f"time at {result['rows'][-1]['depth']} layers / time at {result['rows'][0]['depth']}: "
                 f"{result['time_ratio_deepest_vs_shallowest']:.2f}x (depth ratio {result['depth_ratio']:.0f}x)")
    tc = result.get("torch_compile")
    if tc:
        m, t = tc["mmgraph_compile"], tc["torch_compile_first_call"]
        backend = "" if tc["backend"] == "inductor" else f" (backend {tc['backend']}: plumbing check, not a measurement)"
        lines += ["", f"Against torch.compile, {tc['params']}, each in a fresh process{backend}:", "",
                  "| compile | repeats | seconds (median) | min | max | peak RSS GB |", "|---|---|---|---|---|---|",
                  f"| `mmgraph compile` (trace, passes, all dumps) | {m['repeats']} | {m['median_s']:.2f} | "
                  f"{m['min_s']:.2f} | {m['max_s']:.2f} | {m['peak_rss_gb_median']:.2f} |",
                  f"| torch.compile first call (fwd + bwd, empty cache) | {t['repeats']} | {t['median_s']:.2f} | "
                  f"{t['min_s']:.2f} | {t['max_s']:.2f} | {t['peak_rss_gb_median']:.2f} |",
                  "", f"mmgraph compile / torch.compile first call: **{tc['ratio']:.2f}x** (ratio of medians). "
                      f"Not timed, before: mmgraph's imports {m['process_s_median'] - m['median_s']:.1f} s; torch's "
                      f"imports, model build and one eager step {t['setup_s_median']:.1f} s. The compiled step "
                      f"itself then takes {t['steady_step_s_median'] * 1e3:.0f} ms."]
    ml = result.get("mlir")
    if ml:
        lines += ["", f"torch-mlir import of the lowered program, {ml['params']} ({ml['ops']} ops, "
                      f"{ml['mlir_lines']:,} lines of MLIR), median of {ml['to_mlir']['repeats']}:", "",
                  "| step | ms (median) | min | max | / trace |", "|---|---|---|---|---|"]
        for key, label in (("trace", "`trace_step` (our trace)"), ("compile_step", "`compile_step` (trace + passes)"),
                           ("to_mlir", "`to_mlir` (torch-mlir FX import)")):
            s = ml[key]
            lines.append(f"| {label} | {s['median_s'] * 1e3:.0f} | {s['min_s'] * 1e3:.0f} | {s['max_s'] * 1e3:.0f} | "
                         f"{s['median_s'] / ml['trace']['median_s']:.2f} |")
        lines += ["", f"to_mlir / trace: **{ml['ratio_vs_trace']:.2f}x**; to_mlir / compile_step: "
                      f"{ml['ratio_vs_compile_step']:.2f}x (first call, torch-mlir's own import included: "
                      f"{ml['to_mlir_first_call_s']:.2f} s)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny config, depths 2 4 8, one run each, no warm-up; torch.compile backend aot_eager")
    ap.add_argument("--params", type=Path, default=BIG, help="the params for the depth scaling")
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--repeats", type=int, default=5, help="runs per depth")
    ap.add_argument("--peer-params", type=Path, default=SMALL, help="the params for the peers")
    ap.add_argument("--torch-repeats", type=int, default=3, help="torch.compile first calls (minutes each)")
    ap.add_argument("--peer-repeats", type=int, default=5, help="mmgraph compile runs and to_mlir repeats")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.params, args.depths, args.repeats = TINY, [2, 4, 8], 1
        args.peer_params, args.torch_repeats, args.peer_repeats, args.backend = TINY, 1, 1, "aot_eager"
    warmup = not args.quick
    result = run(args.params.resolve(), args.depths, args.repeats, warmup)
    if not args.no_peers:
        result["torch_compile"] = torch_compile_peer(args.peer_params.resolve(), args.torch_repeats,
                                                     args.peer_repeats, args.backend, warmup)
        result["mlir"] = mlir_peer(args.peer_params.resolve(), max(args.peer_repeats, 2))
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
