"""Simulator fidelity: the step time predicted on the calibrated ``host`` target against the
measured step on the same machine, two ways, interleaved in the same run:

- ``reference``: the runtime executing the lowered program (``Runner.train_step``, reference
  executor: the program's forward + loss + backward, gradient clipping, AdamW), the thing the
  schedule predicts;
- ``eager``: the nn.Module in eager PyTorch (forward + backward + ``torch.optim.AdamW``), the
  same weights and batch.

One micro-batch; median of ``--repeats`` after 3 warm-ups, with min and max.

    python -m benchmarks.bench_simulator            # tiny and small configs, 7 repeats
    python -m benchmarks.bench_simulator --rounds 3 # calibrate + measure 3 times, report the median
    python -m benchmarks.bench_simulator --quick    # tiny config, 2 repeats (tests)

Target (issue: simulated target): |predicted / measured - 1| <= 25% for tiny and small, measured
being the runtime's step (eager is shown beside it). The host target is re-measured first (the
figures ``mmgraph calibrate`` writes, measured in this process: nothing is written to
``MMGRAPH_HOME``) unless --target names a file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import finish, time_interleaved
from mmgraph.commands.calibrate import host_target, measure
from mmgraph.compiler.pipeline import compile_step
from mmgraph.compiler.trace import micro_batch_size
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.core.target import Target, load_target
from mmgraph.models import build_model, initial_weights, random_batch
from mmgraph.runtime.runner import Runner

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"tiny": ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml",
           "small": ROOT / "configs" / "params_mm_llava_small.yaml"}


def eager_step(params):
    """Forward + backward + AdamW step of the nn.Module, eager PyTorch, one micro-batch."""
    torch.manual_seed(0)
    model, _ = build_model(params, seed=0)
    batch = random_batch(params.layout(), micro_batch_size(params, "train"), seed=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        model(**batch).backward()
        opt.step()
    return step


def reference_steps(params, program, model_dir: str) -> dict:
    """The lowered program on ``Runner`` with the ``reference`` executor, one micro-batch:
    ``reference``, the whole training step (``train_step``: the program's forward + loss +
    backward, gradient clipping, AdamW), and ``reference_program``, the program alone
    (``micro_step``), which splits the step into what the schedule's micro-step and optimizer
    predict."""
    runner = Runner(params, model_dir, train=program, executor="reference", weights=initial_weights(params))
    batch = random_batch(params.layout(), micro_batch_size(params, "train"), seed=1)
    return {"reference": lambda: runner.train_step([batch]), "reference_program": lambda: runner.micro_step(batch)}


def predicted_step_s(program) -> float:
    sched = program.schedule
    return sched.micro_step_s + sched.optimizer_tail_s


def run(names: list[str], repeats: int, target: Target, warmup: int = 3) -> dict:
    rows = []
    for name in names:
        params = load_params(CONFIGS[name])
        program = compile_step(params, "train", target=target)[-1].program
        predicted = predicted_step_s(program)
        with tempfile.TemporaryDirectory() as tmp:
            times = time_interleaved({"eager": eager_step(params), **reference_steps(params, program, tmp)},
                                     repeats, warmup)
        sched = program.schedule
        # what the target charges its per-dispatch overhead for: ops (host) or kernels
        ops = (len(program.kernels) if target.compute.granularity == "kernel"
               else sum(len(k.nodes) for k in program.kernels))
        rows.append({"config": name, "eager": times["eager"], "reference": times["reference"],
                     "reference_program": times["reference_program"],
                     "predicted_s": predicted, "ratio_vs_reference": predicted / times["reference"]["median_s"],
                     "ratio_vs_eager": predicted / times["eager"]["median_s"], "repeats": repeats,
                     "predicted_micro_step_s": sched.micro_step_s, "predicted_optimizer_s": sched.optimizer_tail_s,
                     "ops": ops, "predicted_overhead_s": ops * target.compute.kernel_overhead_s,
                     "gradient_tensors": sum(1 for o in program.outputs if o.kind == "grad")})
    return {"target": target.description, "rounds": 1, "target_figures": {
        "peak_flops": target.compute.peak_flops.model_dump(), "memory_bandwidth": target.memory.bandwidth,
        "overhead_s": target.compute.kernel_overhead_s, "op_efficiency": target.compute.op_efficiency,
        "optimizer_update_rate": target.external_memory.optimizer_update_rate,
        "optimizer_tensor_overhead_s": target.external_memory.optimizer_tensor_overhead_s}, "rows": rows}


def run_rounds(names: list[str], repeats: int, rounds: int, calibrate) -> dict:
    """``rounds`` times: calibrate the host target (``calibrate()``), then predict and measure.
    Calibration and measurement are each a few seconds of a shared machine, so one round can
    land in a slow spell; the result is the round with the median ratio for each config (the
    target's figures of the tiny config's median round), with every round's ratio beside it.
    A round whose calibration ``mmgraph calibrate`` would refuse (a degenerate fit on a busy
    machine) is counted and left out; with none left the refusal stands."""
    results, refused = [], []
    for _ in range(rounds):
        try:
            target = calibrate()
        except UserError as err:
            refused.append(str(err))
            continue
        results.append(run(names, repeats, target))
    if not results:
        raise UserError(f"every calibration round was refused: {refused[-1]}")
    rounds = len(results)
    median = [sorted(results, key=lambda r: r["rows"][i]["ratio_vs_reference"])[rounds // 2]
              for i in range(len(names))]
    return {**median[0], "rows": [m["rows"][i] for i, m in enumerate(median)], "rounds": rounds,
            "ratio_rounds": {name: [r["rows"][i]["ratio_vs_reference"] for r in results]
                             for i, name in enumerate(names)},
            "round_figures": [r["target_figures"] for r in results], "refused_rounds": refused}


def _measured(row: dict, key: str) -> Optional[dict]:
    """The measured column ``key`` of a row; files from before the reference column hold eager
    only, as ``measured_s_*``."""
    if key in row:
        return row[key]
    if key == "eager" and "measured_s_median" in row:
        return {"median_s": row["measured_s_median"], "min_s": row["measured_s_min"], "max_s": row["measured_s_max"]}
    return None


def format_table(result: dict) -> str:
    fig = result["target_figures"]
    fitted = (f"; fitted on generic transformer-encoder steps: {fig['overhead_s'] * 1e6:.1f} us per op, op efficiency "
              f"{fig['op_efficiency']:.2f}; the runtime's AdamW + clipping {fig['optimizer_update_rate'] / 1e6:,.0f} M "
              f"elements/s + {fig['optimizer_tensor_overhead_s'] * 1e6:.1f} us per gradient tensor"
              if "op_efficiency" in fig else "")
    lines = [f"host target: {result['target']}{fitted}", "",
             "| config | reference step ms (median) | min | max | eager step ms (median) | min | max | "
             "predicted ms | predicted / reference | predicted / eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [r["config"]]
        for key in ("reference", "eager"):
            m = _measured(r, key)
            cells += [f"{m[k] * 1e3:.2f}" for k in ("median_s", "min_s", "max_s")] if m else ["-"] * 3
        ref, eager = _measured(r, "reference"), _measured(r, "eager")
        cells += [f"{r['predicted_s'] * 1e3:.2f}",
                  f"{r['predicted_s'] / ref['median_s']:.2f}" if ref else "-",
                  f"{r['predicted_s'] / eager['median_s']:.2f}" if eager else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("rounds", 1) > 1:
        lines += ["", f"Median of {result['rounds']} rounds (each: calibrate the host target, then predict and "
                      "measure); predicted / reference in every round: " + "; ".join(
                          f"{name} " + ", ".join(f"{x:.2f}" for x in ratios)
                          for name, ratios in result["ratio_rounds"].items()) + "."]
    split = [r for r in result["rows"] if "reference_program" in r]
    if split:
        lines += ["", "The runtime's step split as the schedule splits it (medians; the optimizer part measured as "
                      "the step less the program alone):", "",
                  "| config | program (fwd + bwd) ms | predicted micro-step ms | predicted / measured | "
                  "clip + AdamW ms | predicted optimizer ms | predicted per-op overhead ms (ops) |",
                  "|---|---|---|---|---|---|---|"]
        for r in split:
            prog = r["reference_program"]["median_s"]
            opt = r["reference"]["median_s"] - prog
            lines.append(f"| {r['config']} | {prog * 1e3:.2f} | {r['predicted_micro_step_s'] * 1e3:.2f} | "
                         f"{r['predicted_micro_step_s'] / prog:.2f} | {opt * 1e3:.2f} | "
                         f"{r['predicted_optimizer_s'] * 1e3:.2f} | {r['predicted_overhead_s'] * 1e3:.2f} ({r['ops']}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--target", help="a host target YAML (default: measure now)")
    ap.add_argument("--rounds", type=int, default=1, help="calibrate + measure this many times; report the median")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.target:
        def calibrate():
            return load_target(args.target)
    else:
        def calibrate():
            return Target.model_validate(host_target(measure(size=512 if args.quick else 1024)))
    names = ["tiny"] if args.quick else ["tiny", "small"]
    repeats = 2 if args.quick else args.repeats
    result = run_rounds(names, repeats, 1 if args.quick else args.rounds, calibrate)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
