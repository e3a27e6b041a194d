"""Data speed: preprocessing samples/s, and loader batches/s against a training step.

    python -m benchmarks.bench_data            # 4,000 caption samples (5 runs); small config loader
    python -m benchmarks.bench_data --quick    # 200 samples (tests)

Targets (issue: data): preprocessing of caption-style samples >= 1,000 samples/s on 2 cores;
the loader delivers batches of the small config at least 2x faster than an eager training step
of that config consumes them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import finish
from mmgraph.core.config import load_params
from mmgraph.data.preprocess import Layout, preprocess
from mmgraph.data.synth import synth
from mmgraph.runtime.data import make_loader

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"


def run(n: int, workers: int, batches: int, steps: int = 5, warmup: int = 3, pre_repeats: int = 5) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth(root, num_train=n, num_eval=8, seed=0)
        params = load_params(SMALL)
        lay = params.layout()
        layout = Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img)
        preprocess(str(root / "phase1_train.json"), str(root / "images"), str(root / "tokenizer"),
                   str(root / "warm"), 1, layout, num_workers=1, progress=False)       # imports, caches
        rates = []
        for i in range(pre_repeats):
            start = time.perf_counter()
            preprocess(str(root / "phase1_train.json"), str(root / "images"), str(root / "tokenizer"),
                       str(root / f"p1_{i}"), 1, layout, num_workers=workers, progress=False)
            rates.append(n / (time.perf_counter() - start))

        raw = yaml.safe_load(SMALL.read_text())
        raw["train_input"].update(data_dir=str(root / "p1_0"), img_data_dir=str(root / "images"))
        path = root / "small.yaml"
        path.write_text(yaml.safe_dump(raw))
        small = load_params(path)
        loader, _ = make_loader(small, num_workers=workers)
        it = iter(loader)
        batch = next(it)                                     # start-up (workers) not counted
        times = []
        for _ in range(batches):
            t = time.perf_counter()
            batch = next(it)
            times.append(time.perf_counter() - t)
        batch_s = statistics.median(times)
        batch_lo, batch_hi = min(times), max(times)

        from mmgraph.models import build_model
        model, _ = build_model(small, seed=0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        step_times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(**{k: v for k, v in batch.items()}).backward()
            opt.step()
            if i >= warmup:
                step_times.append(time.perf_counter() - t)
        step_s = statistics.median(step_times)
    return {"samples": n, "workers": workers, "batches": batches, "steps": steps, "preprocess_repeats": pre_repeats,
            "preprocess_samples_per_s": statistics.median(rates), "preprocess_samples_per_s_min": min(rates),
            "preprocess_samples_per_s_max": max(rates),
            "loader_batch_s_median": batch_s, "loader_batch_s_min": batch_lo, "loader_batch_s_max": batch_hi,
            "train_step_s_median": step_s, "train_step_s_min": min(step_times), "train_step_s_max": max(step_times),
            "loader_vs_step": step_s / batch_s}


def format_table(r: dict) -> str:
    def span(key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        lo, hi = r.get(f"{key}_min"), r.get(f"{key}_max")
        return f" (min {fmt.format(lo * scale)}, max {fmt.format(hi * scale)})" if lo is not None else ""
    pre_n = r.get("preprocess_repeats", 1)
    return "\n".join([
        "| measure | value (median) |", "|---|---|",
        f"| preprocess, {r['samples']} caption samples, {r['workers']} workers, {pre_n} run(s) | "
        f"{r['preprocess_samples_per_s']:,.0f} samples/s{span('preprocess_samples_per_s', fmt='{:,.0f}')} |",
        f"| loader, small config batch of 8 (64 px images, sequence 128), {r['workers']} workers, "
        f"{r.get('batches', 40)} batches | {r['loader_batch_s_median'] * 1e3:.2f} ms/batch{span('loader_batch_s', 1e3)} |",
        f"| eager training step of the small config (fwd + bwd + AdamW), {r.get('steps', 5)} steps | "
        f"{r['train_step_s_median'] * 1e3:.1f} ms{span('train_step_s', 1e3, '{:.1f}')} |",
        f"| loader speed / step consumption (ratio of medians) | **{r['loader_vs_step']:.1f}x** |",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        result = run(200, args.workers, 5, steps=2, warmup=1, pre_repeats=1)
    else:
        result = run(4000, args.workers, 40)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
