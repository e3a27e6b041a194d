"""Activation recomputation: what the remat pass buys on the simulated wafer, and what it costs
on the CPU against torch's own activation checkpointing.

    python -m benchmarks.bench_remat              # 7B phase 2 (Model Zoo file) on cs2 and cs3; small on the CPU
    python -m benchmarks.bench_remat --quick      # tiny config for both parts, 1 repeat (tests)

Predicted (the cost pass, no measurement): the Model Zoo's own
``params_mm_llava_llama2_7b_phase2.yaml`` (Release_2.3.1, as shipped: micro-batch 24 of 216 at
sequence 2048) compiled for each target with every policy at micro-batch 24: fits, peak memory,
extra FLOPs (recomputed / model FLOPs of the step), predicted samples/s and the step's
bottleneck; and with ``none`` at the largest divisor of the batch that fits without
recomputation, the throughput the recomputing step is compared with.

Measured (CPU, the small config at batch 8, fp32, the same seeded weights and batch): the
lowered program of each policy (``program.gm``: forward + loss + backward, gradients out) and,
as the peer, the eager module with ``torch.autograd.grad`` plainly and with
``torch.utils.checkpoint`` around every transformer layer. Step time: interleaved, median of
``--repeats`` after warm-up. Peak memory: bytes the CPU allocator holds above the start of one
step, from ``torch.profiler`` memory events (allocations and frees in time order; weights and
the batch exist before and do not count).

Targets (issue 21): 7B on cs2 and cs3 fits at 24; full <= 35% and selective <= 5% extra FLOPs
(selective: whenever it fits); samples/s at 24 >= 2x the largest micro-batch that fits without
recomputation; CPU small: full peak <= 0.5x none and time <= 1.35x, selective <= 0.75x and
<= 1.10x.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch

from benchmarks.common import finish, rel, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
ZOO_7B = ROOT / "tests" / "data" / "modelzoo" / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase2.yaml"
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
POLICIES = ("none", "selective", "full")


def peak_bytes(fn) -> int:
    """Highest bytes held by the CPU allocator during ``fn()`` above what it held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _predicted_row(params, target, mbs: int, policy: str) -> dict:
    from mmgraph.compiler.pipeline import compile_step

    program = compile_step(params, target=target, micro_batch_size=mbs, remat=policy)[-1].program
    s = program.schedule
    model_flops = program.flops() - s.recompute_flops
    return {"policy": policy, "micro_batch_size": mbs, "fits": s.fits, "peak_bytes": s.peak_memory_bytes,
            "memory_bytes": s.memory_bytes, "extra_flops_share": s.recompute_flops / model_flops,
            "samples_per_s": s.samples_per_s, "step_s": s.step_s, "bottleneck": s.bottleneck,
            "max_micro_batch_size": s.max_micro_batch_size,
            "layers": {p: sum(1 for x in program.remat.layers if x.policy == p) for p in POLICIES}}


def predicted(path: Path, targets: tuple[str, ...]) -> list[dict]:
    """Per target: every policy at the params' micro-batch, and ``none`` at the largest that fits."""
    from mmgraph.compiler.trace import micro_batch_size
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    params = load_params(path)
    mbs = micro_batch_size(params, "train")
    batch = params.train_input.batch_size
    out = []
    for name in targets:
        target = load_target(name)
        rows = [_predicted_row(params, target, mbs, p) for p in (*POLICIES, "auto")]
        room = rows[0]["max_micro_batch_size"]
        plain = max((m for m in range(1, batch + 1) if batch % m == 0 and m <= room), default=None)
        base = _predicted_row(params, target, plain, "none") if plain else None
        auto = rows[-1]
        out.append({"target": name, "micro_batch_size": mbs, "rows": rows, "no_recompute": base,
                    "speedup": auto["samples_per_s"] / base["samples_per_s"] if base and auto["fits"] else None})
    return out


def trained_llm(path: Path, target: str = "cs2") -> dict:
    """Context for the FLOPs budget: the same file with the LLM trained too (``freeze`` of the
    image model only, as LLaVA's phase 2 usually is), full and selective at its micro-batch."""
    import tempfile

    import yaml

    from mmgraph.compiler.trace import micro_batch_size
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    raw = yaml.safe_load(path.read_text())
    raw["model"]["freeze"] = ["^image_model.image_model_list"]
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / path.name
        variant.write_text(yaml.safe_dump(raw, sort_keys=False))
        params = load_params(variant)
        mbs = micro_batch_size(params, "train")
        rows = [_predicted_row(params, load_target(target), mbs, p) for p in ("selective", "full")]
    return {"target": target, "freeze": raw["model"]["freeze"], "rows": rows}


def _checkpointed(model):
    """The module with ``torch.utils.checkpoint`` around every transformer layer."""
    from torch.utils.checkpoint import checkpoint

    for module in list(model.modules()):
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            for layer in layers:
                layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    return model


def measured(path: Path, batch_size: int, repeats: int, warmup: int) -> dict:
    from mmgraph.compiler.pipeline import compile_step, reference_inputs
    from mmgraph.core.config import load_params
    from mmgraph.models import build_model

    torch.manual_seed(0)
    params = load_params(path)
    fns = {}
    for policy in POLICIES:
        program = compile_step(params, micro_batch_size=batch_size, remat=policy)[-1].program
        _, _, flat = reference_inputs(program, params)
        inputs = [t.detach() for t in flat]
        fns[policy] = functools.partial(_run_program, program.gm, inputs)
    model, batch, _ = reference_inputs(program, params)
    wanted = [s.target for s in program.outputs if s.kind == "grad"]
    ckpt = _checkpointed(build_model(params, seed=0)[0])
    for name, m in (("eager", model), ("eager+checkpoint", ckpt)):
        state = dict(m.named_parameters())
        for n, p in state.items():
            p.requires_grad_(n in wanted)
        fns[name] = functools.partial(_run_eager, m, batch, [state[n] for n in wanted])
    times = time_interleaved(fns, repeats, warmup)
    peaks = {k: peak_bytes(fn) for k, fn in fns.items()}
    rows = [{"variant": k, "time": times[k], "peak_bytes": peaks[k]} for k in fns]

    def ratio(a, b, key):
        get = (lambda r: r["time"]["median_s"]) if key == "time" else (lambda r: r["peak_bytes"])
        by = {r["variant"]: r for r in rows}
        return get(by[a]) / get(by[b]) if get(by[b]) else None
    return {"params": rel(path), "batch": batch_size, "threads": torch.get_num_threads(), "repeats": repeats,
            "rows": rows,
            "ratios": {f"{a} / {b} {key}": ratio(a, b, key) for a, b in
                       (("full", "none"), ("selective", "none"), ("eager+checkpoint", "eager"))
                       for key in ("peak", "time")}}


def _run_program(gm, inputs):
    with torch.no_grad():
        return gm(*inputs)


def _run_eager(model, batch, weights):
    loss = model(**batch)
    return loss.detach(), torch.autograd.grad(loss, weights)


def run(big: Path, small: Path, batch: int, repeats: int, warmup: int, targets=("cs2", "cs3")) -> dict:
    return {"big": rel(big), "predicted": predicted(big, targets), "trained_llm": trained_llm(big, targets[0]),
            "measured": measured(small, batch, repeats, warmup)}


def _pct(x: float) -> str:
    return f"{x:.1%}"


def format_table(r: dict) -> str:
    lines = [f"Predicted: {r['big']} (cost pass; micro-batch as shipped unless named):", "",
             "| target | policy | micro-batch | fits | peak GB | extra FLOPs | samples/s | bottleneck | layers (none/selective/full) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in r["predicted"]:
        for row in t["rows"] + ([t["no_recompute"]] if t["no_recompute"] else []):
            layers = "/".join(str(row["layers"][p]) for p in POLICIES)
            lines.append(f"| {t['target']} | {row['policy']} | {row['micro_batch_size']} | {'yes' if row['fits'] else 'no'} | "
                         f"{row['peak_bytes'] / 1e9:.2f} of {row['memory_bytes'] / 1e9:.0f} | "
                         f"{_pct(row['extra_flops_share'])} | {row['samples_per_s']:,.1f} | {row['bottleneck']} | {layers} |")
        if t["speedup"] is not None:
            lines.append(f"| {t['target']} | auto at {t['micro_batch_size']} / none at "
                         f"{t['no_recompute']['micro_batch_size']} | | | | | **{t['speedup']:.2f}x** | | |")
    ctx = r.get("trained_llm")
    if ctx:
        lines += ["", f"The same file with the LLM trained too (`freeze: {ctx['freeze']}`), on {ctx['target']}: "
                  + ", ".join(f"{row['policy']} {_pct(row['extra_flops_share'])} extra FLOPs "
                              f"({'fits' if row['fits'] else 'does not fit'}, peak {row['peak_bytes'] / 1e9:.2f} GB)"
                              for row in ctx["rows"]) + "."]
    m = r["measured"]
    lines += ["", f"Measured on the CPU: {m['params']}, batch {m['batch']}, {m['threads']} threads, median of "
              f"{m['repeats']} (interleaved); peak = allocator bytes above the step's start:", "",
              "| variant | step ms (median) | min | max | peak MB |", "|---|---|---|---|---|"]
    for row in m["rows"]:
        t = row["time"]
        lines.append(f"| {row['variant']} | {t['median_s'] * 1e3:.1f} | {t['min_s'] * 1e3:.1f} | "
                     f"{t['max_s'] * 1e3:.1f} | {row['peak_bytes'] / 1e6:.1f} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | **{v:.2f}** |" for k, v in m["ratios"].items() if v is not None]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config for both parts, 1 repeat")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        result = run(TINY, TINY, 4, 1, 1, targets=("cs2",))
    else:
        result = run(ZOO_7B, SMALL, 8, args.repeats, 2)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
