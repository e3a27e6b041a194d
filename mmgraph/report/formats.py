"""Interchange dumps: MLIR (torch dialect, via torch-mlir) and ONNX (the eval step).

MLIR comes from the lowered program's graph: parameters are function arguments, never
embedded. ONNX comes from the eval Program, exported by the runtime's one exporter
(``mmgraph.runtime.onnx_program``, which the ``onnxruntime`` executor runs): parameters are
graph inputs, so no weights are written. The exporter runs the program once on zero tensors,
so it is written only for models up to ``ONNX_PARAM_LIMIT`` parameters.
"""

from __future__ import annotations

from pathlib import Path


from mmgraph.compiler.pipeline import compile_step
from mmgraph.core.config import Params
from mmgraph.core.ir import Program
from mmgraph.runtime.onnx_program import export_program

ONNX_PARAM_LIMIT = 50_000_000


def to_mlir(program: Program, name: str = "step") -> str:
    """The program in torch-mlir's torch dialect; a header maps ``%argN`` to input names."""
    from torch_mlir.fx import stateless_fx_import

    module = stateless_fx_import(program.gm, model_name=name)
    header = [f"// %arg{i}: {s.kind.value} {s.name}" for i, s in enumerate(program.inputs)]
    return "\n".join(header) + "\n" + str(module) + "\n"


def parse_mlir(text: str):
    """Parse MLIR text back with ``torch_mlir.ir`` (raises on malformed text)."""
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_d

    ctx = ir.Context()
    torch_d.register_dialect(ctx)
    return ir.Module.parse(text, ctx)


def onnx_skip_reason(program: Program) -> str | None:
    n = sum(s.numel for s in program.inputs if s.kind.value == "param")
    if n > ONNX_PARAM_LIMIT:
        return (f"not written: the ONNX exporter runs the program on zero tensors of every weight "
                f"({n:,} parameters > {ONNX_PARAM_LIMIT:,})")
    return None


def eval_program(params: Params, compiled: Program) -> Program:
    """The eval program ``eval.onnx`` holds: ``compiled`` when it is one the exporter takes (an
    eval program lowered for no op set), else the eval step traced for the host (trace, freeze,
    cleanup, fusion), at the eval micro-batch."""
    if compiled.mode == "eval" and not any(r.name == "legalize" for r in compiled.history):
        return compiled
    return compile_step(params, "eval")[-1].program


def write_eval_onnx(params: Params, compiled: Program, path: str | Path) -> list[str]:
    """``eval.onnx``: the eval Program exported by the runtime's exporter (the one the
    ``onnxruntime`` executor runs), weights as graph inputs named as the program names them;
    returns the ONNX graph's input names."""
    return export_program(eval_program(params, compiled), path)
