"""Dumps of every compile stage under ``MODEL_DIR/compile/``, for a person to read and diff.

- ``NN-<pass>.txt``: one line per node (op, operands, shape, phase, layer, module, FLOPs); stable
  names, so two passes or two compiles diff cleanly; weights are never written;
- ``program.py``: the lowered program as Python with shapes in the signature; it runs
  (``load_program``);
- ``report.json``: nodes per pass, parameters, FLOPs, pass timings, versions.

The folder is written beside the old one and swapped in at the end, so an interrupted compile
never leaves a half-written ``compile/``.
"""

from __future__ import annotations

import json
import platform
import re
import sys
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from mmgraph import __version__
from mmgraph.compiler.artifact import program_sha256
from mmgraph.compiler.scaling import scaling
from mmgraph.core.files import building
from mmgraph.core.ir import InputKind, Phase, Program, Schedule
from mmgraph.report.draw import kernel_graph, to_dot, to_svg
from mmgraph.report.formats import onnx_skip_reason, to_mlir, write_eval_onnx
from mmgraph.report.html import render_html

_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.int64: "i64",
          torch.int32: "i32", torch.bool: "b8", torch.float64: "f64"}



def bottleneck_words(s: Schedule) -> str:
    """The step's bottleneck in a sentence, with the three per-micro-step totals."""
    if not s.bottleneck:
        return "no segments"
    what = {"compute": "bound by compute", "stream-in": "bound by streaming weights in",
            "stream-out": "bound by streaming gradients out"}[s.bottleneck]
    return (f"{what}: per micro-step compute {s.compute_s * 1e3:,.1f} ms, weights in "
            f"{s.stream_in_s * 1e3:,.1f} ms, gradients out {s.stream_out_s * 1e3:,.1f} ms")

def _type(shape, dtype) -> str:
    return f"{_DTYPE.get(dtype, str(dtype))}[{','.join(map(str, shape))}]"


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def format_program(program: Program, title: str) -> str:
    ops = program.ops()
    lines = [
        f"# {title}: {program.mode} step, {len(ops)} ops",
        f"# FLOPs: forward {program.flops(Phase.FORWARD):,}, backward {program.flops(Phase.BACKWARD):,}",
    ]
    if program.history and program.history[-1].notes:
        lines.append("# " + ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}"
                                      for k, v in program.history[-1].notes.items()))
    lines.append("")
    for node, spec in zip([n for n in program.gm.graph.nodes if n.op == "placeholder"], program.inputs):
        role = ("trainable" if spec.trainable else "frozen") if spec.kind == InputKind.PARAM else spec.kind.value
        lines.append(f"%{node.name}: {_type(spec.shape, spec.dtype)}  # input {role} {spec.name}")
    lines.append("")
    if program.remat is not None and program.segments is None:
        lines += format_remat(program) + [""]
        if program.memory is not None:
            lines += format_memory(program) + [""]
    if program.schedule is not None:
        lines += format_schedule(program)
    elif program.segments is not None:
        lines += format_segments(program)
    elif program.kernels is not None:
        lines += _format_kernels(program)
    else:
        lines += [_op_line(program, node) for node in ops]
    outs = list(program.gm.graph.nodes)[-1].args[0]
    lines.append("")
    for node, spec in zip(outs, program.outputs):
        label = spec.kind + (f" {spec.target}" if spec.target else "")
        lines.append(f"return {_arg(node)}  # {label}")
    return "\n".join(lines) + "\n"


def _op_line(program: Program, node: fx.Node, indent: str = "") -> str:
    info = program.info[node.name]
    op = str(node.target).replace("aten.", "").replace(".default", "")
    args = ", ".join([_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
    flops = f" flops={info.flops:,}" if info.flops else ""
    return (f"{indent}%{node.name} = {op}({args})  # {_type(info.shape, info.dtype)} "
            f"{info.phase.value} {info.layer} [{info.module}]{flops}")


def _format_kernels(program: Program) -> list[str]:
    by_name = {n.name: n for n in program.ops()}
    lines = []
    for k in program.kernels:
        lines.append(f"kernel k{k.id} {k.kind} {k.phase} {k.layer}: {len(k.nodes)} ops, "
                     f"{k.flops:,} flops, {k.internal_bytes:,} bytes kept inside")
        lines += [_op_line(program, by_name[n], "    ") for n in k.nodes]
    lines += ["", f"# fusions refused: {len(program.refusals)}"]
    lines += [f"# cannot fuse %{n} into the kernel of %{p}: {r}" for n, p, r in program.refusals]
    return lines


def format_segments(program: Program) -> list[str]:
    lines = [f"{'seg':>4} {'phase':<9} {'layers':<44} {'kernels':>7} {'weights MB':>11} "
             f"{'grads MB':>9} {'kept MB':>9} {'freed MB':>9} {'GFLOP':>10}"]
    for s in program.segments:
        layers = s.layers[0] if len(s.layers) == 1 else f"{s.layers[0]} +{len(s.layers) - 1}"
        lines.append(f"{s.id:>4} {s.phase:<9} {layers:<44} {len(s.kernels):>7} {s.weight_bytes / 1e6:>11.2f} "
                     f"{s.grad_bytes / 1e6:>9.2f} {s.saved_bytes / 1e6:>9.2f} {s.freed_bytes / 1e6:>9.2f} "
                     f"{s.flops / 1e9:>10.2f}")
    for s in program.segments:
        lines.append(f"# segment {s.id}: kernels {list(s.kernels)}; streams in {list(s.weights)}"
                     + (f"; gradients out {list(s.grads)}" if s.grads else ""))
    return lines


def format_schedule(program: Program) -> list[str]:
    sch = program.schedule
    lines = [f"# target {sch.target}, {sch.precision}, micro-batch {sch.micro_batch_size} of {sch.batch_size}: "
             f"micro-step {sch.micro_step_s * 1e3:.3f} ms, step {sch.step_s * 1e3:.3f} ms, "
             f"{sch.samples_per_s:.2f} samples/s, utilization {sch.utilization:.2%}",
             f"# peak memory {sch.peak_memory_bytes:,} of {sch.memory_bytes:,} bytes: "
             + ("fits" if sch.fits else f"does not fit (largest micro-batch that fits: {sch.max_micro_batch_size})"),
             "",
             f"{'seg':>4} {'segment':<52} {'compute ms':>11} {'in ms':>9} {'out ms':>9} {'start ms':>10} "
             f"{'end ms':>10} {'live MB':>10} {'pieces':>6} {'off/re MB':>10} bottleneck"]
    for seg, t in zip(program.segments, sch.times):
        moved = (seg.offload_bytes + seg.reload_bytes) / 1e6
        lines.append(f"{seg.id:>4} {seg.name[:52]:<52} {t.compute_s * 1e3:>11.4f} {t.stream_in_s * 1e3:>9.4f} "
                     f"{t.stream_out_s * 1e3:>9.4f} {t.start * 1e3:>10.4f} {t.end * 1e3:>10.4f} "
                     f"{t.live_bytes / 1e6:>10.2f} {seg.pieces:>6} {moved:>10.1f} {t.bottleneck}")
    return lines


def format_remat(program: Program) -> list[str]:
    """Per layer: the policy, what the backward keeps and what it recomputes."""
    plan = program.remat
    lines = [f"# remat {plan.policy}: kept {plan.kept_bytes:,} bytes, extra {plan.extra_flops:,} FLOPs, "
             f"estimated peak {plan.estimated_peak_bytes:,} of {plan.memory_bytes:,} bytes",
             f"{'layer':<36} {'policy':<10} {'kept MB':>9} {'recomputed MB':>14} {'saved MB':>9} {'extra GFLOP':>12}"]
    for x in plan.layers:
        lines.append(f"{x.layer:<36} {x.policy:<10} {x.kept_bytes / 1e6:>9.2f} {x.recomputed_bytes / 1e6:>14.2f} "
                     f"{x.saved_bytes / 1e6:>9.2f} {x.extra_flops / 1e9:>12.3f}")
    for x in plan.layers:
        lines.append(f"# {x.layer}: keeps {', '.join('%' + n for n in x.kept) or 'nothing'}"
                     + (f"; recomputes {', '.join('%' + n for n in x.recomputed)}" if x.recomputed else ""))
    return lines


def format_memory(program: Program) -> list[str]:
    """The memory plan: the mechanisms chosen, the estimate, and the segments run in pieces."""
    mp = program.memory
    lines = [f"# memory plan at micro-batch {mp.micro_batch_size}: {mp.note}",
             f"# estimated peak {mp.estimated_peak_bytes:,} of {mp.memory_bytes:,} bytes "
             f"({'fits' if mp.fits else 'does not fit'}): kept {mp.kept_bytes:,} + largest working set "
             f"{mp.working_bytes:,} + buffers {mp.buffer_bytes:,}; estimated micro-step {mp.estimated_step_s * 1e3:.3f} ms",
             f"# mechanisms used: {', '.join(mp.mechanisms) or 'none'} (available: {', '.join(mp.available) or 'none'})"]
    if mp.offloaded:
        lines.append(f"# offloaded (their backward's kept values to external memory and back): {', '.join(mp.offloaded)}")
    for layer, phase, piece in mp.segment_pieces:
        lines.append(f"# {phase} {layer}: pieces of {piece} samples")
    return lines


def memory_report(program: Program) -> dict:
    mp = program.memory
    return {
        "micro_batch_size": mp.micro_batch_size, "mechanisms": list(mp.mechanisms), "available": list(mp.available),
        "note": mp.note, "fits": mp.fits, "estimated_peak_bytes": mp.estimated_peak_bytes,
        "memory_bytes": mp.memory_bytes, "kept_bytes": mp.kept_bytes, "working_bytes": mp.working_bytes,
        "buffer_bytes": mp.buffer_bytes, "estimated_micro_step_s": mp.estimated_step_s,
        "recompute": {"layers": {p: sum(1 for x in program.remat.layers if x.policy == p)
                                 for p in ("none", "selective", "full")} if program.remat else {},
                      "estimated_s": mp.recompute_s},
        "pieces": {"pieces": mp.pieces, "smallest_piece_samples": mp.piece_samples,
                   "segments": [{"layer": lay, "phase": ph, "piece_samples": q} for lay, ph, q in mp.segment_pieces],
                   "estimated_overhead_s": mp.piece_overhead_s},
        "offload": {"layers": list(mp.offloaded), "bytes": mp.offload_bytes, "estimated_link_s": mp.offload_s},
    }


def remat_report(program: Program) -> dict:
    plan = program.remat
    return {
        "policy": plan.policy, "kept_bytes": plan.kept_bytes, "extra_flops": plan.extra_flops,
        "saved_bytes": sum(x.saved_bytes for x in plan.layers), "layer_work_bytes": plan.layer_work_bytes,
        "attention_scores_bytes": plan.attention_scores_bytes, "kernel_work_bytes": plan.kernel_work_bytes,
        "weight_buffer_bytes": plan.weight_buffer_bytes, "estimated_peak_bytes": plan.estimated_peak_bytes,
        "recomputed_ops": len(plan.clones),
        "layers": [{"layer": x.layer, "policy": x.policy, "kept": list(x.kept), "recomputed": list(x.recomputed),
                    "kept_bytes": x.kept_bytes, "recomputed_bytes": x.recomputed_bytes,
                    "saved_bytes": x.saved_bytes, "extra_flops": x.extra_flops} for x in plan.layers],
    }


def schedule_report(program: Program, target) -> dict:
    sch = program.schedule
    segs = []
    for seg, t in zip(program.segments, sch.times):
        segs.append({"id": seg.id, "name": seg.name, "phase": seg.phase, "layers": list(seg.layers),
                     "kernels": len(seg.kernels), "weight_bytes": seg.weight_bytes, "grad_bytes": seg.grad_bytes,
                     "flops": seg.flops, "compute_s": t.compute_s, "stream_in_s": t.stream_in_s,
                     "stream_out_s": t.stream_out_s, "optimizer_s": t.optimizer_s, "in_start_s": t.in_start,
                     "in_end_s": t.in_end, "start_s": t.start, "end_s": t.end, "out_end_s": t.out_end,
                     "live_bytes": t.live_bytes, "bottleneck": t.bottleneck, "pieces": seg.pieces,
                     "offload_bytes": seg.offload_bytes, "reload_bytes": seg.reload_bytes,
                     "piece_overhead_s": t.piece_overhead_s, "offload_s": t.offload_s, "reload_s": t.reload_s})
    return {
        "name": target.name, "kind": target.kind, "description": target.description,
        "precision": sch.precision, "micro_batch_size": sch.micro_batch_size, "batch_size": sch.batch_size,
        "micro_step_s": sch.micro_step_s, "optimizer_tail_s": sch.optimizer_tail_s, "step_s": sch.step_s,
        "samples_per_s": sch.samples_per_s, "tokens_per_s": sch.tokens_per_s, "utilization": sch.utilization,
        "real_tokens_per_s": sch.real_tokens_per_s, "real_token_share": sch.real_token_share,
        "weight_bytes_in_per_micro_step": sch.weight_bytes_in, "gradient_bytes_out_per_micro_step": sch.grad_bytes_out,
        "peak_memory_bytes": sch.peak_memory_bytes, "memory_bytes": sch.memory_bytes,
        "weight_buffer_bytes": sch.weight_buffer_bytes, "fits": sch.fits,
        "max_micro_batch_size": sch.max_micro_batch_size,
        "bottlenecks": {b: sum(1 for t in sch.times if t.bottleneck == b) for b in ("compute", "stream-in", "stream-out")},
        "bottleneck": sch.bottleneck, "bottleneck_words": bottleneck_words(sch),
        "compute_s_per_micro_step": sch.compute_s, "stream_in_s_per_micro_step": sch.stream_in_s,
        "stream_out_s_per_micro_step": sch.stream_out_s,
        "recompute_flops_per_micro_step": sch.recompute_flops, "recompute_s_per_micro_step": sch.recompute_s,
        "piece_overhead_s_per_micro_step": sch.piece_overhead_s, "offload_bytes_per_micro_step": sch.offload_bytes,
        "micro_steps": sch.micro_steps,
        "segments": segs, "sources": target.sources, "assumptions": target.assumptions,
    }


def kernels_per_layer(program: Program) -> dict:
    out: dict = {}
    for k in program.kernels or ():
        out.setdefault(k.layer, {}).setdefault(k.phase, 0)
        out[k.layer][k.phase] += 1
    return dict(sorted(out.items()))


def program_source(program: Program) -> str:
    """The program as a Python module defining ``step(*inputs)``; shapes annotate the signature."""
    body = program.gm.print_readable(print_output=False, include_stride=False, include_device=False)
    # Source locations relative to the package roots, so the file is the same on every machine
    # (``mmgraph/models/llama.py`` from a source tree and from an install alike).
    body = re.sub(r"# File: \S*?/(site-packages|dist-packages)/", "# File: ", body)
    body = body.replace(str(Path(__file__).resolve().parents[2]) + "/", "")
    head = [
        '"""Lowered program written by mmgraph: `step(*inputs)` returns the outputs listed below."""',
        "import torch",
        "from torch import device  # noqa: F401",
        "",
        "INPUTS = [",
        *[f"    ({s.name!r}, {s.kind.value!r}, {s.trainable}, {list(s.shape)}, {str(s.dtype)!r})," for s in program.inputs],
        "]",
        "OUTPUTS = [",
        *[f"    ({o.kind!r}, {o.target!r})," for o in program.outputs],
        "]",
        "",
    ]
    return "\n".join(head) + body.replace("class GraphModule(torch.nn.Module):", "class Program(torch.nn.Module):") \
        + "\n\ndef step(*inputs):\n    return Program().forward(*inputs)\n"


def load_program(path: str | Path):
    """Import a written ``program.py`` and return its ``step`` function."""
    namespace: dict[str, Any] = {"__name__": "mmgraph_program"}
    exec(compile(Path(path).read_text(), str(path), "exec"), namespace)  # noqa: S102 - our own dump
    return namespace["step"]


def report(stages, params_path: str) -> dict:
    first, last = stages[0].program, stages[-1].program
    params = [s for s in first.inputs if s.kind == InputKind.PARAM]
    return {
        "params": params_path,
        "mode": last.mode,
        "parameters": {
            "total": sum(s.numel for s in params),
            "trainable": sum(s.numel for s in params if s.trainable),
            "frozen": sum(s.numel for s in params if not s.trainable),
        },
        "passes": [
            {
                "name": s.name,
                "seconds": round(s.program.history[-1].seconds, 4),
                "nodes": len(s.program.ops()),
                "flops_forward": s.program.flops(Phase.FORWARD),
                "flops_backward": s.program.flops(Phase.BACKWARD),
                "gradients": sum(1 for o in s.program.outputs if o.kind == "grad"),
                "kernels": len(s.program.kernels) if s.program.kernels is not None else None,
                "notes": s.program.history[-1].notes,
            }
            for s in stages
        ],
        "kernels_per_layer": kernels_per_layer(last),
        "intermediate_bytes_in_kernels": sum(k.internal_bytes for k in last.kernels or ()),
        **({"remat": remat_report(last)} if last.remat is not None else {}),
        **({"memory": memory_report(last)} if last.memory is not None else {}),
        "versions": _versions(),
    }


def _versions() -> dict:
    out = {"mmgraph": __version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": sys.platform}
    for pkg in ("torch_mlir", "onnx", "onnxruntime", "networkx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def write_dumps(stages, model_dir: str | Path, params_path: str, params=None, target=None,
                world: Optional[dict] = None, mlir: str | None = None, cirh=None) -> Path:
    """Write every stage, the program (Python, MLIR: ``mlir`` when the caller made it already),
    the vendor tool's CIRH (``cirh``: ``mmgraph.compiler.cirh.Check``), the kernel drawings, ONNX of the
    eval forward (small models, with ``params``) and the report (``world``: all ranks together);
    swap the folder in at the end (an
    error on the way, a full disk included, leaves the previous dumps and no temporary folder)."""
    model_dir = Path(model_dir)
    final = model_dir / "compile"
    with building(final) as tmp:
        _write_dumps(tmp, stages, params_path, params, target, mlir, cirh, world)
    return final


def _write_dumps(tmp: Path, stages, params_path: str, params, target, mlir: str | None, cirh, world=None) -> None:
    for i, stage in enumerate(stages):
        (tmp / f"{i:02d}-{stage.name}.txt").write_text(format_program(stage.program, stage.name))
    last = stages[-1].program
    (tmp / "program.py").write_text(program_source(last))
    (tmp / "program.mlir").write_text(mlir if mlir is not None else to_mlir(last))
    artifacts = {"program.py": "written", "program.mlir": "written"}
    if cirh is not None and cirh.lowering is not None:
        (tmp / "program.cirh.mlir").write_text(cirh.lowering.text)
        artifacts["program.cirh.mlir"] = f"written (from {cirh.checked})"
    elif cirh is not None:
        artifacts["program.cirh.mlir"] = f"not written: {cirh.found.how}"
    if last.kernels is not None:
        graph = kernel_graph(last)
        (tmp / "kernels.dot").write_text(to_dot(graph))
        (tmp / "kernels.svg").write_text(to_svg(graph))
        artifacts.update({"kernels.dot": "written", "kernels.svg": "written"})
    skip = onnx_skip_reason(last) if params is not None else "not written: no params given"
    if skip is None:
        write_eval_onnx(params, last, tmp / "eval.onnx")
        artifacts["eval.onnx"] = "written"
    else:
        artifacts["eval.onnx"] = skip
    rep = report(stages, params_path)

    rep["program_sha256"] = program_sha256(last)      # its code (program.py prints it) and typed fields
    if cirh is not None:
        rep["cirh"] = cirh.report()
    if last.schedule is not None and target is not None and last.mode == "train" and target.interconnect is not None:


        rep["scaling"] = {"topology": target.interconnect.topology,
                          "points": [asdict(p) for p in scaling(last, target)]}
    if world is not None:
        rep["world"] = world
    if last.schedule is not None and target is not None:

        rep["target"] = schedule_report(last, target)
        (tmp / "report.html").write_text(render_html(rep))
        artifacts["report.html"] = "written"
    rep["artifacts"] = artifacts
    (tmp / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
