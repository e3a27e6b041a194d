"""The compiled executor's CPU GEMMs (``mmgraph.runtime.kernels``): ATen's or oneDNN's kernel,
picked by measurement per shape, the same arithmetic as the program's ``mm``/``addmm``."""

from __future__ import annotations

import pytest
import torch

from mmgraph.compiler.pipeline import compile_step
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.models import initial_weights, random_batch
from mmgraph.runtime import kernels
from mmgraph.runtime.executors import CompiledExecutor
from mmgraph.runtime.runner import Runner
from tests.conftest import TINY2

needs_onednn = pytest.mark.skipif(not kernels.onednn_available(), reason="this PyTorch has no oneDNN")
aten = torch.ops.aten


@needs_onednn
@pytest.mark.parametrize("a_t,b_t,bias", [(False, False, False), (True, False, False), (False, True, True),
                                          (True, True, True)])
def test_the_onednn_gemm_is_the_float32_product(a_t, b_t, bias):
    """Every layout a backward hands it (transposed operands), with and without bias: the
    float32 product within float32 rounding, the float64 product as the judge."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 24, generator=g) if not a_t else torch.randn(24, 40, generator=g).t()
    b = torch.randn(24, 56, generator=g) if not b_t else torch.randn(56, 24, generator=g).t()
    c = torch.randn(56, generator=g) if bias else None
    want = a.double() @ b.double() + (c.double() if bias else 0)
    for kernel in ("onednn", "aten", "auto"):
        got = torch.ops.mmgraph.gemm(a, b, c, kernel)
        assert got.dtype == torch.float32 and got.shape == (40, 56)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_auto_takes_onednn_only_where_it_measured_clearly_faster(monkeypatch):
    monkeypatch.setattr(kernels, "chosen", {})
    a, b = torch.ones(4, 3), torch.ones(3, 5)
    fake = {"aten": 1.0, "onednn": 0.5}
    timer = lambda fn, args: fake["onednn" if fn is kernels._onednn else "aten"]     # noqa: E731
    assert kernels.choose(a, b, None, timer) == "onednn"
    fake["onednn"] = 0.95
    assert kernels.choose(a, b, None, timer) == "onednn"         # remembered per shape and layout
    assert kernels.choose(a.t().contiguous().t(), b, None, timer) == "aten"   # another layout, timed: a
    assert kernels.choose(a, b, torch.ones(5), timer) == "aten"                # near tie stays with ATen


def test_the_policy_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(UserError, match="MMGRAPH_CPU_GEMM: unknown CPU GEMM choice 'fast'; one of auto, onednn, aten"):
        kernels.gemm_policy()
    monkeypatch.setenv(kernels.ENV, "ATEN")
    assert kernels.gemm_policy() == "aten"
    monkeypatch.delenv(kernels.ENV)
    assert kernels.gemm_policy() == ("auto" if kernels.onednn_available() else "aten")


def _gemms(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.mmgraph.gemm.default]


def test_auto_leaves_the_gemms_aten_wins_as_the_programs_own_ops(monkeypatch):
    """``auto`` times each GEMM when the graph is rewritten, on operands of the node's shapes and
    strides, and rewrites only those oneDNN wins: the others stay ``mm``/``addmm``, with no call
    of ours around ATen's kernel at run time."""
    program = compile_step(load_params(TINY2), optimizer_in_program=True)[-1].program
    seen = []

    def fake(a, b, bias):
        seen.append((tuple(a.shape), a.stride(), tuple(b.shape), b.stride()))
        return "onednn" if bias is not None else "aten"         # the addmms "win" on oneDNN
    monkeypatch.setattr(kernels, "choose", fake)
    graph = kernels.cpu_gemms(program.gm, "auto")
    nodes = {n.name: n for n in program.gm.graph.nodes}
    addmms = {n.name for n in nodes.values() if n.target is aten.addmm.default}
    mms = {n.name for n in nodes.values() if n.target is aten.mm.default}
    assert addmms and mms
    assert {n.name for n in _gemms(graph)} == addmms and all(n.args[3] == "onednn" for n in _gemms(graph))
    assert {n.name for n in graph.graph.nodes if n.target is aten.mm.default} == mms
    metas = {(tuple(n.args[0].meta["val"].shape), n.args[0].meta["val"].stride(), tuple(n.args[1].meta["val"].shape),
              n.args[1].meta["val"].stride()) for n in nodes.values() if n.name in mms}
    assert metas <= set(seen) and len(seen) == len(mms) + len(addmms)


@needs_onednn
def test_the_compiled_executor_runs_the_programs_gemms_on_onednn_and_trains_like_the_reference(tmp_path, monkeypatch):
    """Every float32 mm/addmm of the step becomes ``mmgraph::gemm`` (the program's own graph
    untouched, node names kept for the regions); 3 steps with the update in the program match
    the reference executor (ATen's mm) within float tolerance, and oneDNN's kernel ran."""
    params = load_params(TINY2)
    program = compile_step(params, optimizer_in_program=True)[-1].program
    mms = [n for n in program.gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]
    assert mms
    graph = kernels.cpu_gemms(program.gm, "onednn")
    assert len(_gemms(graph)) == len(mms) and {n.name for n in _gemms(graph)} == {n.name for n in mms}
    assert kernels.cpu_gemms(program.gm, "aten") is program.gm and _gemms(program.gm) == []

    calls = {"n": 0}
    real = kernels.KERNELS["onednn"]

    def counted(*args):
        calls["n"] += 1
        return real(*args)
    monkeypatch.setitem(kernels.KERNELS, "onednn", counted)
    monkeypatch.setenv(kernels.ENV, "onednn")
    ref = Runner(params, tmp_path / "r", train=program, weights=initial_weights(params))
    comp = Runner(params, tmp_path / "c", train=program, executor="compiled", weights=initial_weights(params))
    assert isinstance(comp.train_exec, CompiledExecutor)
    for step in range(3):
        batch = [random_batch(params.layout(), 8, seed=20 + step)]
        a, b = ref.train_step(batch), comp.train_step(batch)
        assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss), (step, a.loss, b.loss)
    assert calls["n"] >= 3 * len(mms)
    for name in comp.trainable:
        torch.testing.assert_close(comp.weights[name], ref.weights[name], rtol=1e-3, atol=1e-5)
