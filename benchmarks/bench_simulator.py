"""Simulator fidelity: the step time predicted on the calibrated ``host`` target against the
measured step of eager PyTorch on the same machine (same module, batch and optimizer).

    python -m benchmarks.bench_simulator            # tiny and small configs, 7 repeats
    python -m benchmarks.bench_simulator --quick    # tiny config, 2 repeats (tests)

Target (issue: simulated target): |predicted / measured - 1| <= 25% for tiny and small.
The host target is re-measured first (`mmgraph calibrate`) unless --target names a file.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import finish
from mmgraph.calibrate import host_target, measure
from mmgraph.config import load_params
from mmgraph.models import build_model, random_batch
from mmgraph.pipeline import compile_step
from mmgraph.target import Target, load_target
from mmgraph.trace import micro_batch_size

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny": ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml",
           "small": ROOT / "configs" / "params_mm_llava_small.yaml"}


def eager_step_s(params, repeats: int) -> float:
    """Median seconds of forward + backward + AdamW step, eager PyTorch, one micro-batch."""
    torch.manual_seed(0)
    model, _ = build_model(params, seed=0)
    batch = random_batch(params.layout(), micro_batch_size(params, "train"), seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).backward()
        opt.step()
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def predicted_step_s(params, target: Target) -> float:
    sched = compile_step(params, "train", target=target)[-1].program.schedule
    return sched.micro_step_s + sched.optimizer_tail_s


def run(names: list[str], repeats: int, target: Target) -> dict:
    rows = []
    for name in names:
        params = load_params(CONFIGS[name])
        measured, lo, hi = eager_step_s(params, repeats)
        predicted = predicted_step_s(params, target)
        rows.append({"config": name, "measured_s_median": measured, "measured_s_min": lo, "measured_s_max": hi,
                     "predicted_s": predicted, "ratio": predicted / measured, "repeats": repeats})
    return {"target": target.description, "target_figures": {
        "peak_flops": target.compute.peak_flops.model_dump(), "memory_bandwidth": target.memory.bandwidth,
        "overhead_s": target.compute.kernel_overhead_s,
        "optimizer_update_rate": target.external_memory.optimizer_update_rate}, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"host target: {result['target']}", "",
             "| config | measured eager step ms (median) | min | max | predicted ms | predicted / measured |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['config']} | {r['measured_s_median'] * 1e3:.2f} | {r['measured_s_min'] * 1e3:.2f} | "
                     f"{r['measured_s_max'] * 1e3:.2f} | {r['predicted_s'] * 1e3:.2f} | {r['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", help="a host target YAML (default: measure now)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.target:
        target = load_target(args.target)
    else:
        target = Target.model_validate(host_target(measure(size=512 if args.quick else 1024)))
    result = run(["tiny"] if args.quick else ["tiny", "small"], 2 if args.quick else args.repeats, target)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
