"""The op registry (mmgraph.core.ops): every op the programs hold has one entry, and one entry
is all a new op needs for cleanup, fusion, FLOPs/bytes and the cost model to know it."""

from __future__ import annotations

import operator

import pytest
import torch

from mmgraph.core import ops
from mmgraph.core.config import load_params
from mmgraph.core.opcost import node_bytes, node_flops
from mmgraph.core.target import load_target
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import ROOT

CONFIGS = ["params_mm_llava_tiny_phase1.yaml", "params_mm_llava_tiny_phase2.yaml", "params_cogvlm_tiny.yaml",
           "params_mm1_tiny.yaml", "params_two_encoders_tiny.yaml"]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_op_of_the_traced_programs_is_registered(config):
    params = load_params(ROOT / "configs" / config)
    missing = set()
    for mode in ("train", "eval"):
        for stage in compile_step(params, mode, world_size=2 if mode == "train" else 1):
            for node in stage.program.ops():
                if node.target is not operator.getitem and ops.info(node) is None:
                    missing.add(str(node.target))
    assert not missing


def test_an_op_is_one_entry(monkeypatch):
    """Unregister silu: fusion refuses it (test_compile pins the message); register it again
    under another class and flops rule: fusion, opcost and the cost model follow."""
    params = load_params(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml")
    program = compile_step(params, "train", target=load_target("cs2"))[-1].program
    silu = next(n for n in program.ops() if ops.op_name(n) == "silu")
    assert ops.op_class(silu) == "elementwise" and ops.is_transcendental(silu)
    out = silu.meta["val"].numel()
    assert node_flops(silu) == out and node_bytes(silu) > 0
    silu_flops = sum(node_flops(n) for n in program.ops() if ops.op_name(n) == "silu")

    monkeypatch.setitem(ops.REGISTRY, "silu", ops.Op("silu", "opaque", flops="zero", moves_bytes=False))
    assert ops.op_class(silu) == "opaque" and not ops.is_transcendental(silu)
    assert node_flops(silu) == 0 and node_bytes(silu) == 0
    regrouped = compile_step(params, "train")[-1].program
    kernel = next(k for k in regrouped.kernels if silu.name in k.nodes)
    assert kernel.kind == "opaque" and kernel.nodes == (silu.name,)        # a kernel of its own, as opaque ops are
    # the cost model follows: silu's FLOPs leave the simulated step
    recosted = compile_step(params, "train", target=load_target("cs2"))[-1].program
    assert silu_flops > 0 and recosted.flops() == program.flops() - silu_flops


def test_cleanup_reads_the_registry(monkeypatch):
    from mmgraph.passes.cleanup import cleanup

    params = load_params(ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml")
    traced = compile_step(params, "train")[0].program
    _, notes = cleanup(traced)
    assert notes["asserts"] > 0
    monkeypatch.setitem(ops.REGISTRY, "_assert_tensor_metadata",
                        ops.Op("_assert_tensor_metadata", "view", "zero", False))      # no cleanup role
    _, kept = cleanup(traced)
    assert kept["asserts"] == 0


def test_a_bad_class_is_refused():
    with pytest.raises(ValueError, match="unknown class 'fancy'"):
        ops.Op("x", "fancy")
    assert torch.ops.aten.mm.default.__name__.split(".")[0] in ops.REGISTRY
