"""The memory model of weight streaming on the Model Zoo's shipped micro-batches, and
``micro_batch_size: explore`` on its 7B phase-2 files.

    python -m benchmarks.bench_memory              # every shipped file on its release's target; explore
    python -m benchmarks.bench_memory --quick      # the tiny config only (a plumbing check)

Predicted (the compiler's memory plan and the cost pass; nothing is measured): every multimodal
params file of the Model Zoo's Release_2.3.1 (on cs2) and Release_2.10.0 (on cs3), compiled at
the micro-batch it ships: whether it fits, the peak and the device memory, the mechanisms the
plan uses (recompute per layer, segments run in pieces and the smallest piece, layers whose kept
activations are offloaded to MemoryX, with their costs), the planner's estimated peak beside the
simulated one, and the predicted samples/s. Then ``explore`` (every micro-batch from 1 to the
batch size, figures scaled from one trace) on the two 7B phase-2 files of Release_2.10.0.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import finish, rel

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "tests" / "data" / "modelzoo"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
TARGET = {"Release_2.3.1": "cs2", "Release_2.10.0": "cs3"}
SHIPPED = [
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase1.yaml"),
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase1_v2.yaml"),
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase2.yaml"),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml"),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase1_MSL2K_v2.yaml"),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml"),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml"),
    ("Release_2.10.0", "params_mm_llava_llama2_7b_phase1.yaml"),
    ("Release_2.10.0", "params_mm_llava_llama2_7b_phase2.yaml"),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml"),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml"),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml"),
]
EXPLORE = [("Release_2.10.0", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"),
           ("Release_2.10.0", "params_mm_llava_llama2_7b_phase2.yaml")]


def fit_row(path: Path, target_name: str) -> dict:
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    params = load_params(path)
    start = time.perf_counter()
    program = compile_step(params, target=load_target(target_name))[-1].program
    s, mp = program.schedule, program.memory
    counts: dict = {}
    for layer in program.remat.layers:
        counts[layer.policy] = counts.get(layer.policy, 0) + 1
    return {
        "params": rel(path), "target": target_name, "micro_batch_size": s.micro_batch_size,
        "batch_size": s.batch_size, "fits": s.fits, "peak_bytes": s.peak_memory_bytes, "memory_bytes": s.memory_bytes,
        "estimated_peak_bytes": mp.estimated_peak_bytes, "mechanisms": list(mp.mechanisms), "recompute": counts,
        "recompute_s": s.recompute_s, "segments_in_pieces": len(mp.segment_pieces), "smallest_piece": mp.piece_samples,
        "pieces": mp.pieces, "piece_overhead_s": s.piece_overhead_s, "offloaded": list(mp.offloaded),
        "offload_bytes": mp.offload_bytes, "samples_per_s": s.samples_per_s, "micro_step_s": s.micro_step_s,
        "bottleneck": s.bottleneck, "compile_s": time.perf_counter() - start,
    }


def explore_rows(path: Path, target_name: str, high: int = 0) -> dict:
    from mmgraph.compiler.pipeline import plan_micro_batches
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    params = load_params(path)
    batch = params.train_input.batch_size
    start = time.perf_counter()
    plans, probe = plan_micro_batches(params, "train", load_target(target_name), list(range(1, (high or batch) + 1)))
    rows = [{"micro_batch_size": p.micro_batch_size, "fits": p.fits, "peak_bytes": p.peak_bytes,
             "recompute": p.counts(), "pieces": p.pieces, "smallest_piece": p.piece_samples,
             "offloaded": len(p.offloaded), "samples_per_s": p.samples_per_s, "micro_step_s": p.step_s}
            for p in plans]
    fits = [r for r in rows if r["fits"]]
    best = max(fits, key=lambda r: (round(r["samples_per_s"], 6), -r["micro_batch_size"])) if fits else None
    shipped = params.train_input.micro_batch_size
    return {"params": rel(path), "target": target_name, "batch_size": batch, "probe": probe, "rows": rows,
            "best": best["micro_batch_size"] if best else None,
            "shipped": shipped if isinstance(shipped, int) else None, "seconds": time.perf_counter() - start}


def run(files, explore, high: int = 0) -> dict:
    return {"fits": [fit_row(ZOO / r / n if r else n, TARGET.get(r, "cs2")) for r, n in files],
            "explore": [explore_rows(ZOO / r / n if r else n, TARGET.get(r, "cs2"), high) for r, n in explore]}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _counts(c: dict) -> str:
    return ", ".join(f"{n} {p}" for p, n in sorted(c.items())) or "-"


def format_table(r: dict) -> str:
    lines = ["| file | target | micro-batch | fits | peak / memory GB (estimate) | recompute (layers) | "
             "pieces (segments, smallest) | offloaded layers (GB) | samples/s | bound by |",
             "|---|---|---:|---|---|---|---|---|---:|---|"]
    for x in r["fits"]:
        name = Path(x["params"]).parent.name.replace("Release_", "") + " " + Path(x["params"]).stem
        pieces = f"{x['segments_in_pieces']}, {x['smallest_piece']}" if x["segments_in_pieces"] else "-"
        off = f"{len(x['offloaded'])} ({x['offload_bytes'] / 1e9:.1f})" if x["offloaded"] else "-"
        lines.append(f"| {name} | {x['target']} | {x['micro_batch_size']} of {x['batch_size']} | "
                     f"{'yes' if x['fits'] else 'NO'} | {_gb(x['peak_bytes'])} / {_gb(x['memory_bytes'])} "
                     f"({_gb(x['estimated_peak_bytes'])}) | {_counts(x['recompute'])} | {pieces} | {off} | "
                     f"{x['samples_per_s']:,.1f} | {x['bottleneck']} |")
    for e in r["explore"]:
        lines += ["", f"`micro_batch_size: explore` for `{e['params']}` on {e['target']} (batch {e['batch_size']}; "
                  f"figures scaled from the step traced at micro-batch {e['probe']}, {e['seconds']:.0f} s): best "
                  f"{e['best']}, shipped {e['shipped']}. Every candidate that is a divisor of the batch, or within "
                  f"4 of the best or the shipped one:", "",
                  "| micro-batch | fits | peak GB | recompute (layers) | pieces (smallest) | offloaded layers | "
                  "micro-step ms | samples/s |", "|---:|---|---:|---|---|---:|---:|---:|"]
        keep = {m for m in range(1, e["batch_size"] + 1) if e["batch_size"] % m == 0}
        for m in (e["best"], e["shipped"]):
            if m:
                keep |= set(range(m - 4, m + 5))
        for row in e["rows"]:
            if row["micro_batch_size"] not in keep:
                continue
            mark = " **best**" if row["micro_batch_size"] == e["best"] else ""
            mark += " (shipped)" if row["micro_batch_size"] == e["shipped"] else ""
            pieces = f"{row['pieces']} ({row['smallest_piece']})" if row["pieces"] > 1 else "-"
            lines.append(f"| {row['micro_batch_size']}{mark} | {'yes' if row['fits'] else 'no'} | "
                         f"{_gb(row['peak_bytes'])} | {_counts(row['recompute'])} | {pieces} | "
                         f"{row['offloaded'] or '-'} | {row['micro_step_s'] * 1e3:,.1f} | {row['samples_per_s']:,.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config only")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        result = run([("", TINY)], [("", TINY)], high=8)
    else:
        result = run(SHIPPED, EXPLORE)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
