"""Checks a Program after a pass: structure always; numerics against eager PyTorch on request.

Numerics: the program runs on the weights of an eager model and a batch (both made by the
pipeline, ``mmgraph.compiler.pipeline.reference``), and its loss and every gradient it outputs must equal
eager PyTorch autograd on the same module and batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmgraph.core.ir import InputKind, Program


class VerificationError(AssertionError):
    """A pass broke the program (a bug in mmgraph, not in the user's input)."""


def verify_structure(program: Program, after: str) -> None:
    graph = program.gm.graph
    try:
        graph.lint()
    except Exception as err:  # noqa: BLE001
        raise VerificationError(f"after {after}: graph is malformed: {err}") from err
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(program.inputs):
        raise VerificationError(f"after {after}: {len(placeholders)} placeholders for {len(program.inputs)} inputs")
    outs = list(graph.output_node().args[0]) if hasattr(graph, "output_node") else list(list(graph.nodes)[-1].args[0])
    if len(outs) != len(program.outputs):
        raise VerificationError(f"after {after}: {len(outs)} outputs for {len(program.outputs)} output specs")
    for node in graph.nodes:
        if node.op == "get_attr":
            raise VerificationError(f"after {after}: {node.name} reads a constant attribute; weights must be inputs")
        if node.op in ("call_function", "placeholder") and node.name not in program.info:
            raise VerificationError(f"after {after}: node {node.name} has no NodeInfo")
    if program.kernels is not None:
        _verify_kernels(program, after)
    for spec in program.outputs:
        if spec.kind == "grad":
            src = next(s for s in program.inputs if s.name == spec.target)
            if not src.trainable and program.history and any(r.name == "freeze_masks" for r in program.history):
                raise VerificationError(f"after {after}: gradient of frozen parameter {spec.target}")


def _verify_kernels(program: Program, after: str) -> None:
    """Every op in exactly one kernel; kernels form a DAG (they can run in some order)."""
    import networkx as nx

    owner: dict[str, int] = {}
    for k in program.kernels:
        for name in k.nodes:
            if name in owner:
                raise VerificationError(f"after {after}: {name} is in kernels {owner[name]} and {k.id}")
            owner[name] = k.id
    missing = [n.name for n in program.ops() if n.name not in owner]
    if missing:
        raise VerificationError(f"after {after}: ops in no kernel: {missing[:5]}")
    dag = program.kernel_dag()
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        raise VerificationError(f"after {after}: kernels form a cycle: {cycle[:4]}")


@dataclass(frozen=True)
class NumericReport:
    loss: float
    max_rel_grad_error: float
    grads_checked: int


def program_inputs(program: Program, model, batch: dict) -> list[torch.Tensor]:
    """The program's inputs from the eager model's weights and a batch (the reference the
    pipeline builds: passes do not build models)."""
    state = dict(model.named_parameters())
    one = torch.ones(())                                  # float16 programs: gradients unscaled
    return [state[s.name] if s.kind == InputKind.PARAM else one if s.kind == InputKind.SCALAR
            else batch[s.name] for s in program.inputs]


def verify_numerics(program: Program, model, batch: dict, after: str, rtol: float = 1e-5) -> NumericReport:
    """The program's loss and gradients against eager autograd of ``model`` on ``batch``."""
    flat = program_inputs(program, model, batch)
    with torch.no_grad():
        outs = program.gm(*[t.detach() for t in flat])
    grads_wanted = [s.target for s in program.outputs if s.kind == "grad"]
    state = dict(model.named_parameters())
    for name, p in state.items():
        p.requires_grad_(name in grads_wanted)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(program.precision)
    with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        return _compare(program, model, batch, outs, after, rtol)


def _compare(program: Program, model, batch, outs, after: str, rtol: float) -> NumericReport:
    """Eager autograd of the same model (under the program's autocast) against the program."""
    grads_wanted = [s.target for s in program.outputs if s.kind == "grad"]
    state = dict(model.named_parameters())
    if program.mode == "train":
        loss = model(**batch)
        ref = torch.autograd.grad(loss, [state[n] for n in grads_wanted]) if grads_wanted else ()
    else:
        with torch.no_grad():
            loss = model(**batch)
        ref = ()
    _close(outs[0], loss.detach(), rtol, f"after {after}: loss")
    # A gradient that is zero but for rounding (a key projection's bias: softmax ignores what it
    # adds to every score) is rounding of terms that cancel, as large as the step's other
    # gradients: it is measured at a floor of ZERO_FLOOR times the largest gradient.
    floor = ZERO_FLOOR * max((float(r.abs().max()) for r in ref), default=0.0)
    worst = 0.0
    for spec, got, want in zip([s for s in program.outputs if s.kind == "grad"],
                               outs[len(outs) - len(grads_wanted):], ref):
        worst = max(worst, _close(got, want, rtol, f"after {after}: gradient of {spec.target}", floor))
    return NumericReport(float(loss.detach()), worst, len(ref))


ZERO_FLOOR = 1e-6


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str, floor: float = 0.0) -> float:
    """Relative error against the tensor's scale (at least ``floor``); raise when above ``rtol``."""
    scale = want.abs().max().clamp(min=max(floor, 1e-12))
    err = float((got - want).abs().max() / scale)
    if not err <= rtol:
        raise VerificationError(f"{what} differs from eager PyTorch: relative error {err:.2e} > {rtol:.0e}")
    return err
