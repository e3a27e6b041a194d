"""Legalization for the wafer and the vendor's check: what it costs at compile time, what the
CPU runs afterwards, and whether every program lowers with Cerebras's own tool.

    python -m benchmarks.bench_legalize                  # everything (about 15 minutes on 2 cores)
    python -m benchmarks.bench_legalize --quick          # the tiny config, 1-2 repeats (tests)

Three measurements, each comparing peers measured in the same run (``--parts`` reruns some of
them and keeps the others from ``--out``, with the date they were measured):

- ``compile``: ``compile_step`` of the LLaVA-7B phase-2 train step for cs2 (trace, every pass,
  cost), with legalization (cs2 as shipped: ``ops: cirh-2.10.0``) against without (the same target
  with no op set: the legalize pass leaves the program as traced), interleaved, in this process,
  median of ``--repeats``; and the MLIR dump and the vendor tool's lowering of the legalized program.
- ``step``: the CPU step (``Runner.train_step``: forward, loss, backward, clipping, AdamW; the
  ``reference`` executor) of the small config's program compiled three ways: for a host/GPU target
  (h100: every registered op runs, fused attention kept: what ``--target host`` gets), for cs2
  without legalization (the program as it was before the pass), and legalized for cs2 (functional
  copies, attention as bmm/softmax: what ``mmgraph run`` executes with its default target),
  interleaved, median of ``--repeats`` after warm-up.
- ``lowering``: every train and eval program of ``configs/`` (micro-batch as the params say) and
  every Model Zoo multimodal params file of ``tests/data/modelzoo`` (train, micro-batch 1: one that
  fits), legalized for cs2 and lowered with ``torch-cirh-opt -refine-types -torch-to-cirh-pipeline``
  (strict-soundness mode for mixed precision): ops rewritten, CIRH ops, the tool's seconds, and the
  first error where one refuses.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import finish, rel, summary, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
ZOO = ROOT / "tests" / "data" / "modelzoo"
BIG2 = CONFIGS / "params_mm_llava_llama2_7b_phase2.yaml"
SMALL = CONFIGS / "params_mm_llava_small.yaml"
TINY = CONFIGS / "params_mm_llava_tiny_phase2.yaml"


def _targets():
    from mmgraph.core.target import load_target

    cs2 = load_target("cs2")
    return {"legalized": cs2, "not legalized": cs2.model_copy(update={"ops": None})}


def _legalize_notes(stages) -> dict:
    return next(s.program.history[-1] for s in stages if s.name == "legalize").notes


def compile_time(params_path: Path, repeats: int) -> dict:
    """7B (or ``params_path``) compile for cs2 with and without legalization, interleaved."""
    from mmgraph.compiler import cirh
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.config import load_params
    from mmgraph.report.formats import to_mlir

    params = load_params(params_path)
    targets = _targets()
    last: dict = {}
    seconds: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(repeats):
        for name, target in targets.items():
            start = time.perf_counter()
            stages = compile_step(params, "train", target=target)
            seconds[name].append(time.perf_counter() - start)
            last[name] = stages
    stages = last["legalized"]
    rec = next(s.program.history[-1] for s in stages if s.name == "legalize")
    start = time.perf_counter()
    text = to_mlir(stages[-1].program)
    mlir_s = time.perf_counter() - start
    out = {"params": rel(params_path), "repeats": repeats,
           "with": summary(seconds["legalized"]), "without": summary(seconds["not legalized"]),
           "legalize_s": rec.seconds, "ops_before": rec.nodes_before, "ops_after": rec.nodes_after,
           "rewritten": rec.notes["rewritten"], "kernels": {k: len(v[-1].program.kernels) for k, v in last.items()},
           "step_ms": {k: v[-1].program.schedule.step_s * 1e3 for k, v in last.items()},
           "mlir_s": mlir_s, "mlir_mb": len(text) / 1e6}
    found = cirh.find_tool()
    if found.path is not None:
        low = cirh.lower(found.path, text, strict=stages[-1].program.precision != "fp32")
        out["tool"] = {"ok": low.ok, "seconds": low.seconds, "cirh_ops": low.total_ops, "error": low.error}
    out["ratio"] = out["with"]["median_s"] / out["without"]["median_s"]
    return out


def step_time(params_path: Path, repeats: int, warmup: int = 2) -> dict:
    """CPU train step of the program compiled for h100, for cs2 unlegalized and legalized."""
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.compiler.trace import micro_batch_size
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target
    from mmgraph.models import initial_weights, random_batch
    from mmgraph.runtime.runner import Runner

    params = load_params(params_path)
    torch.manual_seed(0)
    batch = random_batch(params.layout(), micro_batch_size(params, "train"), seed=1)
    programs = {"host/GPU (h100)": load_target("h100"), **{f"cs2 {k}": t for k, t in _targets().items()}}
    fns, ops, losses, code = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, target) in enumerate(programs.items()):
            program = compile_step(params, "train", target=target)[-1].program
            ops[name], code[name] = len(program.ops()), program.gm.code
            runner = Runner(params, Path(tmp) / str(i), train=program, weights=initial_weights(params))
            losses[name] = float(runner.micro_step(batch)[0])
            fns[name] = lambda r=runner: r.train_step([batch])
        times = time_interleaved(fns, repeats, warmup)
    base = times["cs2 not legalized"]["median_s"]
    return {"params": rel(params_path), "batch": int(batch["labels"].shape[0]), "threads": torch.get_num_threads(),
            "repeats": repeats, "host_code_unchanged": code["host/GPU (h100)"] == code["cs2 not legalized"],
            "rows": [{"program": k, "ops": ops[k], "loss": losses[k], **times[k],
                      "ratio": times[k]["median_s"] / base} for k in programs]}


def _lower_one(params_path: Path, mode: str, micro_batch, found) -> dict:
    from mmgraph.compiler import cirh
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.config import load_params
    from mmgraph.report.formats import to_mlir

    params = load_params(params_path)
    start = time.perf_counter()
    stages = compile_step(params, mode, target=_targets()["legalized"], micro_batch_size=micro_batch)
    compile_s = time.perf_counter() - start
    final = stages[-1].program
    notes = _legalize_notes(stages)
    row = {"params": rel(params_path), "mode": mode, "precision": final.precision,
           "micro_batch": final.batch_size, "compile_s": compile_s, "ops": len(final.ops()),
           "rewritten": notes["rewritten"], "ok": None}
    if found.path is not None:
        low = cirh.lower(found.path, to_mlir(final), strict=final.precision != "fp32")
        row.update({"ok": low.ok, "strict": low.strict, "tool_s": low.seconds, "cirh_ops": low.total_ops,
                    "error": low.error, "op": low.op})
    return row


def lowering(quick: bool) -> dict:
    from mmgraph.compiler import cirh
    from mmgraph.core.config import load_params

    found = cirh.find_tool()
    rows = []
    configs = [TINY] if quick else sorted(CONFIGS.glob("params_*.yaml"))
    for path in configs:
        params = load_params(path)
        for mode in ("train", "eval"):
            if params.input_for(mode) is not None:
                rows.append(_lower_one(path, mode, None, found))
                print(_row_line(rows[-1]), flush=True)
    if not quick:
        for path in sorted(ZOO.glob("Release_*/params_*.yaml")):
            rows.append(_lower_one(path, "train", 1, found))
            print(_row_line(rows[-1]), flush=True)
    return {"tool": rel(found.path) if found.path else None, "found": found.how.replace(str(ROOT) + "/", ""),
            "tool_sha256": cirh.sha256(found.path) if found.path else None, "rows": rows}


def _row_line(row: dict) -> str:
    verdict = {True: "lowers", False: f"REFUSED: {row.get('error')}", None: "not checked (no tool)"}[row["ok"]]
    return f"{row['params']} {row['mode']}: {row['rewritten']} ops rewritten, {verdict}"


PARTS = ("compile", "step", "lowering")


def run(quick: bool, repeats: int, parts=PARTS) -> dict:
    if quick:
        return {"quick": True, "compile": compile_time(TINY, 1), "step": step_time(TINY, 2, 1),
                "lowering": lowering(True)}
    jobs = {"compile": lambda: compile_time(BIG2, repeats), "step": lambda: step_time(SMALL, 7 * repeats),
            "lowering": lambda: lowering(False)}
    return {part: jobs[part]() for part in parts}


def format_table(r: dict) -> str:
    c = r["compile"]
    tool = c.get("tool")
    lines = [f"Compile, {c['params']} train step for cs2, in-process `compile_step` (trace + every pass), "
             f"median of {c['repeats']} (interleaved):", "",
             "| cs2 program | compile s (median) | min | max | ops | kernels | simulated step ms |", "|---|---|---|---|---|---|---|",
             f"| not legalized (no op set) | {c['without']['median_s']:.2f} | {c['without']['min_s']:.2f} | "
             f"{c['without']['max_s']:.2f} | {c['ops_before']:,} | {c['kernels']['not legalized']:,} | "
             f"{c['step_ms']['not legalized']:,.1f} |",
             f"| legalized (cirh-2.10.0) | {c['with']['median_s']:.2f} | {c['with']['min_s']:.2f} | "
             f"{c['with']['max_s']:.2f} | {c['ops_after']:,} | {c['kernels']['legalized']:,} | "
             f"{c['step_ms']['legalized']:,.1f} |", "",
             f"With / without: **{c['ratio']:.2f}x**; the legalize pass itself {c['legalize_s']:.2f} s "
             f"({c['rewritten']:,} ops rewritten). The MLIR of the legalized program: {c['mlir_s']:.1f} s, "
             f"{c['mlir_mb']:.1f} MB" + (f"; `torch-cirh-opt` lowers it in {tool['seconds']:.2f} s to "
                                        f"{tool['cirh_ops']:,} CIRH ops." if tool and tool["ok"] else
                                        f"; the tool: {tool['error']}." if tool else "; no tool here."), ""]
    s = r["step"]
    lines += [f"CPU step, {s['params']}, one micro-batch of {s['batch']}, `Runner.train_step` (reference executor, "
              f"AdamW), {s['threads']} threads, median of {s['repeats']} (interleaved):", "",
              "| program | ops | step ms (median) | min | max | / cs2 not legalized |", "|---|---|---|---|---|---|"]
    for row in s["rows"]:
        lines.append(f"| {row['program']} | {row['ops']:,} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['max_s'] * 1e3:.1f} | {row['ratio']:.3f} |")
    if "host_code_unchanged" in s:
        lines += ["", "The host/GPU program's code is " + ("identical to" if s["host_code_unchanged"] else
                                                            "**not** identical to") +
                  " the program before legalization (`GraphModule.code`): legalize rewrites nothing for it."]
    low = r["lowering"]
    lines += ["", f"Lowering with the vendor's tool ({low['found'].replace(str(ROOT) + '/', '')}):", "",
              "| params | mode | precision | micro-batch | ops | rewritten | compile s | CIRH ops | tool s | result |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for row in low["rows"]:
        result = {True: "lowers" + (" (strict)" if row.get("strict") else ""),
                  False: f"refused: {row.get('error')}", None: "no tool"}[row["ok"]]
        lines.append(f"| {row['params']} | {row['mode']} | {row['precision']} | {row['micro_batch']} | {row['ops']:,} | "
                     f"{row['rewritten']:,} | {row['compile_s']:.1f} | {row.get('cirh_ops', 0):,} | "
                     f"{row.get('tool_s', 0):.2f} | {result} |")
    checked = [x for x in low["rows"] if x["ok"] is not None]
    lines += ["", f"{sum(bool(x['ok']) for x in checked)} of {len(low['rows'])} programs lower"
              + (f" ({len(low['rows']) - len(checked)} not checked: no tool)" if len(checked) < len(low["rows"]) else "")
              + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config, 1-2 repeats")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parts", default=",".join(PARTS),
                    help="comma-separated parts to run; with --out, the others are kept from that file")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    result = run(args.quick, args.repeats, parts)
    if not args.quick and args.out and args.out.is_file() and set(parts) != set(PARTS):
        import json

        kept = json.loads(args.out.read_text())
        old = {k: {**kept[k], "measured": kept[k].get("measured", kept.get("meta", {}).get("date"))}
               for k in PARTS if k in kept and k not in parts}
        result = {**old, **result}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
