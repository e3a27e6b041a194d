"""Trace a whole step to one static ATen graph: forward + loss (+ backward for training).

How (hidden behind ``trace_step``): the model is built under FakeTensorMode (no weights),
``torch.export`` records the forward with module paths, and ``make_fx`` traces an
interpreter of that forward plus ``torch.autograd.grad`` into one joint graph. Every parameter
that the forward uses gets a gradient here; which ones really train is the freeze_masks
pass's business, so the pass, not the tracer, removes frozen work.
"""

from __future__ import annotations

import contextlib
import operator
import os
import re
import traceback
from collections import deque
from pathlib import Path
from typing import Optional

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import mmgraph.models as _models_pkg
from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ir import LOSS_SCALE, RNG_FIELDS, InputKind, InputSpec, NodeInfo, OutputSpec, Phase, Program
from mmgraph.models import batch_fields, build_model, random_batch
from mmgraph.models.anatomy import is_head, is_llm_layer, kind_of, layer_of, unused_parameters
from mmgraph.models.multimodal import MultimodalModel
from mmgraph.models.rng import has_dropout, rng_inputs
from mmgraph.models.loss import lm_loss
from mmgraph.core.opcost import node_bytes, node_flops, node_val

_SANITIZE = re.compile(r"[^0-9a-zA-Z_]")
_MODEL_DIR = str(Path(_models_pkg.__file__).resolve().parent) + os.sep  # source or installed


class _Step(torch.nn.Module):
    """The traced step: positional batch fields in, loss (and logits in eval) out."""

    def __init__(self, model: MultimodalModel, mode: str, fields: tuple[str, ...]):
        super().__init__()
        self.m = model
        self.mode = mode
        self.fields = fields      # batch field names, in input order (packed: + segment/position ids)

    def forward(self, *fields):
        batch = dict(zip(self.fields, fields))
        if self.mode == "train":
            return self.m(**batch)
        logits = self.m.compute_logits(batch["image_data"], batch["text_input_ids"],
                                       batch["image_data_loc"], batch["key_padding_mask"],
                                       batch["token_modality_idx"], batch.get("position_ids"),
                                       batch.get("segment_ids"))
        cfg = self.m.config
        return lm_loss(logits, batch["labels"], batch["loss_mask"], cfg.loss_scaling, cfg.loss_weight,
                       batch.get("segment_ids")), logits


class _Interpret(torch.nn.Module):
    """Runs an exported graph node by node so each traced op inherits the node's metadata."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__()
        self.g = gm

    def forward(self, *args):
        return fx.Interpreter(self.g).run(*args)


def autocast_dtype(params: Params) -> Optional[torch.dtype]:
    """Mixed precision is decided at compile time: with ``model.mixed_precision`` the step is
    traced under autocast, so the program itself holds the casts and low-precision matmuls
    (weights stay fp32 in the store; gradients come out fp32). ``cbfloat16`` (a Cerebras
    format) is computed as bfloat16."""
    return params.precision.autocast_dtype


def micro_batch_size(params: Params, mode: str) -> int:
    data = params.input_for(mode)
    if data is None:
        return 1
    mbs = data.micro_batch_size
    return mbs if isinstance(mbs, int) else data.batch_size


def trace_step(params: Params, mode: str = "train", batch_size: Optional[int] = None) -> Program:
    """The step of ``params`` as a Program (no weights are allocated)."""
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be train or eval, got {mode!r}")
    layout = params.layout(mode)
    batch_size = batch_size or micro_batch_size(params, mode)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model, report = build_model(params, fake_mode=fake)
    model.train(mode == "train")                            # dropout only in training
    unused = unused_parameters(model)
    frozen = report.frozen
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "train" and name not in unused)
    real = random_batch(layout, batch_size, seed=0)
    fields = batch_fields(layout)
    dropout = mode == "train" and has_dropout(model)      # masks from inputs (models/rng.py)
    if dropout:
        real |= rng_inputs(0, 0, batch_size)
        fields += RNG_FIELDS
    batch = [fake.from_tensor(real[k]) for k in fields]

    amp = autocast_dtype(params)
    cast = (lambda: torch.autocast("cpu", dtype=amp)) if amp else contextlib.nullcontext
    try:
        with fake, cast():
            exported = torch.export.export(_Step(model, mode, fields), tuple(batch))
    except Exception as err:  # noqa: BLE001 - reported to the user with the op and module
        raise UserError(Problem(params.path, None, f"cannot trace the model: {_describe(err)}")) from err
    fwd = exported.module()
    named = dict(fwd.named_parameters())
    names = [n for n in named if n.removeprefix("m.") not in unused] if mode == "train" else []
    order = list(named)
    runner = _Interpret(fwd)

    # float16 training scales the loss (the gradient seed is an input: dynamic loss scaling
    # changes it without recompiling); the loss itself comes out unscaled.
    scaled = mode == "train" and amp == torch.float16

    def step(param_list, batch_list):
        state = {"g." + k: v for k, v in zip(order, param_list)}
        out = torch.func.functional_call(runner, state, tuple(batch_list[:len(fields)]))
        if mode == "eval":
            return out
        seed = batch_list[len(fields)] if scaled else None
        grads = torch.autograd.grad(out, [state["g." + n] for n in names], grad_outputs=seed)
        return (out, *grads)

    values = [named[n].detach().requires_grad_(n in names) for n in order]
    traced_batch = batch + ([fake.from_tensor(torch.ones((), dtype=torch.float32))] if scaled else [])
    with fake, fx_traceback.preserve_node_meta(), cast():
        joint = make_fx(step, pre_dispatch=False)(values, traced_batch)

    inputs = [InputSpec(n.removeprefix("m."), InputKind.PARAM,
                        n.removeprefix("m.") not in frozen and n.removeprefix("m.") not in unused,
                        tuple(named[n].shape), named[n].dtype) for n in order]
    inputs += [InputSpec(f, InputKind.RNG if f in RNG_FIELDS else InputKind.BATCH, False, tuple(t.shape), t.dtype)
               for f, t in zip(fields, batch)]
    if scaled:
        inputs.append(InputSpec(LOSS_SCALE, InputKind.SCALAR, False, (), torch.float32))
    outputs = [OutputSpec("loss")] + ([OutputSpec("logits")] if mode == "eval" else [])
    outputs += [OutputSpec("grad", n.removeprefix("m.")) for n in names]
    gm = _rename_placeholders(joint, inputs)
    return Program(gm, tuple(inputs), tuple(outputs), annotate(gm, inputs, outputs), mode,
                   precision={torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp, "fp32"))


def _describe(err: BaseException) -> str:
    """First line of the error, and the innermost frame of the model code it came from."""
    text = str(err).strip().splitlines()
    message = text[0] if text else type(err).__name__
    frame = None
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for entry in traceback.extract_tb(err.__traceback__):
            if _MODEL_DIR in str(Path(entry.filename).resolve()):
                frame = entry
        err = err.__cause__ or err.__context__
    if frame is not None:
        where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
        return f"{message} (at models/{where}: {frame.line})"
    return message


def _rename_placeholders(gm: fx.GraphModule, inputs: list[InputSpec]) -> fx.GraphModule:
    """Copy the graph with readable placeholder names (``p_text_model_lm_head_weight``, ``image_data``)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            spec = next(specs)
            name = ("p_" if spec.kind == InputKind.PARAM else "") + _SANITIZE.sub("_", spec.name)
            new = graph.placeholder(name)
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    out = fx.GraphModule(torch.nn.Module(), graph)
    out.graph.lint()
    return out


def _fwd_module(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return re.sub(r"^(g\.)?m\.", "", path) if path not in ("m", "g") else ""


def annotate(gm: fx.GraphModule, inputs: list[InputSpec] | tuple[InputSpec, ...],
             outputs: list[OutputSpec] | tuple[OutputSpec, ...]) -> dict[str, NodeInfo]:
    """Per node: shape, dtype, module, layer, phase, FLOPs, bytes.

    Forward = every node the loss depends on. Forward modules come from the trace. A backward
    node follows the gradient: it takes the module of the parameter it reads, else the
    top level when it reads a value the model's own forward made (the image scatter), else
    the module of the gradient it was computed from, else of the latest forward value it
    reads (the loss's backward). A gradient output takes its parameter's module.
    """
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = nodes[-1]
    outs = list(output.args[0])
    loss = outs[0]
    forward = _ancestors([loss]) | set(placeholders)
    if any(o.kind == "logits" for o in outputs):
        forward |= _ancestors([outs[1]])
    # Other outputs of a forward op (attention's logsumexp, kept for backward) are forward too.
    forward |= {n for n in nodes if n.target is operator.getitem and n.args[0] in forward}
    position = {n: i for i, n in enumerate(nodes)}

    module: dict[fx.Node, str] = {}
    for node, spec in zip(placeholders, inputs):
        module[node] = spec.name.rpartition(".")[0] if spec.kind == InputKind.PARAM else ""
    param_nodes = {p for p, s in zip(placeholders, inputs) if s.kind == InputKind.PARAM}
    for out_node, spec in zip(outs, outputs):
        if spec.kind == "grad" and isinstance(out_node, fx.Node) and out_node.op == "call_function":
            module[out_node] = spec.target.rpartition(".")[0]
    last_fwd = ""
    for node in nodes:
        if node in module or node.op != "call_function":
            continue
        if node in forward:
            found = _fwd_module(node)
            module[node] = found if found is not None else last_fwd
            last_fwd = module[node]
            continue
        ins = [a for a in node.all_input_nodes]
        params = [a for a in ins if a in param_nodes or (a in forward and _reads_param_only(a, param_nodes))]
        fwd_ins = [a for a in ins if a in forward and a not in params]
        bwd_ins = [a for a in ins if a not in forward and a in module]
        # Values of the model's own forward that no layer reads (the scatter's index).
        top_level = [a for a in fwd_ins if a.op == "call_function" and module.get(a) == ""
                     and all(module.get(u, "") == "" for u in a.users if u in forward)]
        if params:
            module[node] = module[_root_param(params[0], param_nodes)]
        elif top_level:
            module[node] = ""
        elif bwd_ins:
            module[node] = module[max(bwd_ins, key=position.__getitem__)]
        elif fwd_ins:
            module[node] = module.get(max(fwd_ins, key=position.__getitem__), "")
        else:
            module[node] = ""

    layers = _split_top(nodes, module, forward)
    info = {}
    for node in nodes:
        if node.op not in ("call_function", "placeholder"):
            continue
        vals = node_val(node)
        mod = module.get(node, "")
        info[node.name] = NodeInfo(
            shape=tuple(vals[0].shape) if vals else (),
            dtype=vals[0].dtype if vals else None,
            module=mod,
            layer=layers[node],
            phase=Phase.FORWARD if node in forward else Phase.BACKWARD,
            flops=node_flops(node),
            bytes=node_bytes(node),
            kind=kind_of(layers[node]),
        )
    return info


def _split_top(nodes: list[fx.Node], module: dict, forward: set) -> dict[fx.Node, str]:
    """Layers per node; ops of the model's own forward split into ``top`` (the image scatter,
    before the LLM) and ``loss`` (after the LM head, and their backward before the LLM's)."""
    layers, after_head, after_llm_bwd = {}, set(), set()
    for node in nodes:
        layer = layer_of(module.get(node, ""))
        ins = node.all_input_nodes
        if node in forward and (is_head(module.get(node, "")) or any(a in after_head for a in ins)):
            after_head.add(node)
        if node not in forward and (is_llm_layer(layer) or any(a in after_llm_bwd for a in ins)):
            after_llm_bwd.add(node)
        if layer == "top" and node.op == "call_function":
            if node in forward and node in after_head:
                layer = "loss"
            elif node not in forward and node not in after_llm_bwd:
                layer = "loss"
        layers[node] = layer
    return layers


def _ancestors(roots: list) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = deque(r for r in roots if isinstance(r, fx.Node))
    while todo:
        n = todo.popleft()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def _reads_param_only(node: fx.Node, params: set[fx.Node]) -> bool:
    """A view chain of one parameter (``t(W)``, ``view(W)``)."""
    while node.op == "call_function" and len(node.all_input_nodes) == 1:
        node = node.all_input_nodes[0]
    return node in params


def _root_param(node: fx.Node, params: set[fx.Node]) -> fx.Node:
    while node not in params:
        node = node.all_input_nodes[0]
    return node
