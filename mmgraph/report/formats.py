"""Interchange dumps: MLIR (torch dialect, via torch-mlir) and ONNX (eval forward).

MLIR comes from the lowered program's graph: parameters are function arguments, never
embedded. ONNX comes from the eval forward of the model built with seeded weights, exported
with the parameters as graph inputs (named as in the Model Zoo), so no weights are written;
it needs real tensors, so it is written only for models small enough to build on the CPU.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from mmgraph.compiler.trace import micro_batch_size
from mmgraph.core.config import Params
from mmgraph.core.ir import Program
from mmgraph.models import batch_fields, build_model, random_batch
from mmgraph.models.loss import lm_loss

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


class _EvalForward(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_data, text_input_ids, image_data_loc, labels, loss_mask,
                key_padding_mask, token_modality_idx, segment_ids=None, position_ids=None):
        logits = self.model.compute_logits(image_data, text_input_ids, image_data_loc,
                                           key_padding_mask, token_modality_idx, position_ids, segment_ids)
        cfg = self.model.config
        return lm_loss(logits, labels, loss_mask, cfg.loss_scaling, cfg.loss_weight, segment_ids), logits


def onnx_skip_reason(program: Program) -> str | None:
    n = sum(s.numel for s in program.inputs if s.kind.value == "param")
    if n > ONNX_PARAM_LIMIT:
        return f"not written: ONNX export runs the model on real weights ({n:,} parameters > {ONNX_PARAM_LIMIT:,})"
    return None


def export_onnx(params: Params, path: str | Path, batch_size: int | None = None, seed: int = 0) -> list[str]:
    """Write the eval forward (loss, logits) as ONNX, static shapes at the eval micro-batch
    size; returns its input names."""

    batch_size = batch_size or micro_batch_size(params, "eval")
    model, _ = build_model(params, seed=seed)
    model.eval()
    batch = random_batch(params.layout("eval"), batch_size, seed=seed + 1)
    wrapper = _EvalForward(model)
    fields = batch_fields(params.layout("eval"))                 # packed: + segment_ids, position_ids
    args = tuple(batch[k] for k in fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, args, str(path), dynamo=False, export_params=False,
                          input_names=list(fields), output_names=["loss", "logits"],
                          do_constant_folding=False)
    import onnx

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return [i.name for i in proto.graph.input]


def run_onnx(path: str | Path, params: Params, batch: dict[str, torch.Tensor], seed: int = 0):
    """Run the ONNX file in onnxruntime with the seeded weights; returns (loss, logits)."""
    import onnxruntime as ort

    model, _ = build_model(params, seed=seed)
    weights = {"model." + k: v.detach().numpy() for k, v in model.state_dict().items()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in session.get_inputs():
        feeds[inp.name] = batch[inp.name].numpy() if inp.name in batch else weights[inp.name]
    return session.run(None, feeds)
