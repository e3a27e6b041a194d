"""Freezing: the phase-1 step (encoder and LLM frozen) against the phase-2 step (encoder
frozen) of the same model, measured and analytic.

    python -m benchmarks.bench_freeze            # small config, 11 repeats
    python -m benchmarks.bench_freeze --quick    # tiny config, 2 repeats (tests)

The params file with ``model.freeze`` set to each phase's patterns (phase 1:
``['^image_model.image_model_list', '^text_model']``, only the projector trains; phase 2:
``['^image_model.image_model_list']``) is compiled (``compile_step``, train mode) and its lowered
program executed by ``Runner`` with the ``reference`` executor, the same seeded weights and the
same batch (one micro-batch). Measured, interleaved across the phases, median of ``--repeats``
after warm-up: the program alone (forward + loss + backward, ``Runner.micro_step``) and the
whole training step (``Runner.train_step``: program, clipping and AdamW over the trainable
weights). Analytic, from the lowered program: forward and backward FLOPs, the number of
gradient outputs and their bytes. The measured ratio phase 1 / phase 2 is shown next to the
FLOPs ratio: freezing the LLM removes its weight gradients (about half its backward matmul
work) but not the backward through it, which the projector's gradient still needs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from benchmarks.common import finish, rel, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
PHASES = {"phase1": ["^image_model.image_model_list", "^text_model"],
          "phase2": ["^image_model.image_model_list"]}


def phase_path(params: Path, phase: str, workdir: Path) -> Path:
    """``params`` with ``model.freeze`` set to ``phase``'s patterns, written to ``workdir``."""
    raw = yaml.safe_load(params.read_text())
    raw["model"]["freeze"] = list(PHASES[phase])
    path = workdir / f"{phase}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def analytic(program) -> dict:
    """FLOPs and gradient figures of a lowered train program."""
    from mmgraph.core.ir import InputKind, Phase

    specs = {s.name: s for s in program.inputs if s.kind == InputKind.PARAM}
    grads = [specs[o.target] for o in program.outputs if o.kind == "grad"]
    return {
        "flops_forward": program.flops(Phase.FORWARD), "flops_backward": program.flops(Phase.BACKWARD),
        "flops_total": program.flops(), "ops": len(program.ops()),
        "kernels": len(program.kernels) if program.kernels is not None else None,
        "gradient_outputs": len(grads), "gradient_numel": sum(s.numel for s in grads),
        "gradient_bytes": sum(s.numel * torch.empty(0, dtype=s.dtype).element_size() for s in grads),
        "parameters": sum(s.numel for s in specs.values()),
    }


def run(params: Path, repeats: int, warmup: int = 2) -> dict:
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.compiler.trace import micro_batch_size
    from mmgraph.core.config import load_params
    from mmgraph.models import initial_weights, random_batch
    from mmgraph.runtime.runner import Runner

    torch.manual_seed(0)
    figures, fns = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        loaded = {phase: load_params(phase_path(params, phase, Path(tmp))) for phase in PHASES}
        first = loaded["phase1"]                   # the freeze list does not change the batch
        batch = random_batch(first.layout(), micro_batch_size(first, "train"), seed=1)
        for phase, p in loaded.items():
            program = compile_step(p)[-1].program
            figures[phase] = analytic(program)
            runner = Runner(p, Path(tmp) / phase, train=program, weights=initial_weights(p))
            fns[f"{phase}.program"] = lambda r=runner: r.micro_step(batch)
            fns[f"{phase}.step"] = lambda r=runner: r.train_step([batch])
        times = time_interleaved(fns, repeats, warmup)
    rows = [{"phase": phase, "freeze": patterns, **figures[phase], "program": times[f"{phase}.program"],
             "step": times[f"{phase}.step"]} for phase, patterns in PHASES.items()]
    one, two = rows

    def ratio(key):
        return one[key] / two[key] if two[key] else None
    return {
        "params": rel(params), "batch": int(batch["labels"].shape[0]),
        "threads": torch.get_num_threads(), "repeats": repeats, "rows": rows,
        "ratios": {"program_time": one["program"]["median_s"] / two["program"]["median_s"],
                   "step_time": one["step"]["median_s"] / two["step"]["median_s"],
                   "flops_total": ratio("flops_total"), "flops_backward": ratio("flops_backward"),
                   "gradient_bytes": ratio("gradient_bytes")},
    }


def _g(n: float) -> str:
    return f"{n / 1e9:.2f}"


def format_table(r: dict) -> str:
    ra = r["ratios"]
    lines = [f"{r['params']}, one micro-batch of {r['batch']}, reference executor, {r['threads']} threads, "
             f"median of {r['repeats']} (interleaved):", "",
             "| phase | freeze | program ms (median) | min | max | step ms (median) | min | max |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        p, s = row["program"], row["step"]
        lines.append(f"| {row['phase']} | {', '.join(f'`{x}`' for x in row['freeze'])} | {p['median_s'] * 1e3:.1f} | "
                     f"{p['min_s'] * 1e3:.1f} | {p['max_s'] * 1e3:.1f} | {s['median_s'] * 1e3:.1f} | "
                     f"{s['min_s'] * 1e3:.1f} | {s['max_s'] * 1e3:.1f} |")
    lines += ["", "| phase | forward GFLOP | backward GFLOP | total GFLOP | gradient outputs | gradient MB |",
              "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['phase']} | {_g(row['flops_forward'])} | {_g(row['flops_backward'])} | "
                     f"{_g(row['flops_total'])} | {row['gradient_outputs']} | {row['gradient_bytes'] / 1e6:.2f} |")
    lines += ["", "| phase 1 / phase 2 | ratio |", "|---|---|",
              f"| measured program time (fwd + bwd) | **{ra['program_time']:.2f}** |",
              f"| measured step time (program + clip + AdamW) | **{ra['step_time']:.2f}** |",
              f"| analytic total FLOPs | {ra['flops_total']:.2f} |",
              f"| analytic backward FLOPs | {ra['flops_backward']:.2f} |",
              f"| gradient bytes | {ra['gradient_bytes']:.3f} |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny config, 2 repeats")
    ap.add_argument("--params", type=Path, default=SMALL)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run(TINY, 2, 1) if args.quick else run(args.params.resolve(), args.repeats)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
