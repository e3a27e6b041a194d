"""What the runtime's speed work (issue 31) must not change: the compiled executor running the
whole step (``--optimizer_in_program``) trains as the reference does, writing the new weights
and optimizer state into the buffers it was given; the cheaper divergence check
(``checkpoint.non_finite``) names exactly the non-finite tensors; the optimizer makes its
state once; the runner writes gradients in place only where no other tensor holds their memory
(``runtime.gradients``), so views are not copied and outputs sharing memory are not scaled twice."""

from __future__ import annotations

import torch

from mmgraph.compiler.pipeline import compile_step
from mmgraph.core.config import load_params
from mmgraph.models import build_model, initial_weights, random_batch
from mmgraph.models.anatomy import no_weight_decay
from mmgraph.runtime import checkpoint
from mmgraph.runtime.executors import write_back
from mmgraph.runtime.optim import Optimizer
from mmgraph.runtime.runner import Runner
from tests.conftest import TINY2


def test_compiled_whole_step_updates_in_place_and_trains_like_the_reference(tmp_path, monkeypatch):
    """Red without ``in_place`` (the state buffers change identity: new tensors each step), or
    when the executor calls its regions outside ``cpp_builds.batched`` (its C++ kernels built one
    g++ run each)."""
    import contextlib

    from mmgraph.runtime import cpp_builds, executors

    held = []

    @contextlib.contextmanager
    def spy():
        with cpp_builds.batched():
            held.append(True)
            yield

    monkeypatch.setattr(executors, "batched", spy)
    params = load_params(TINY2)
    program = compile_step(params, optimizer_in_program=True)[-1].program
    assert write_back(program)
    no_decay = no_weight_decay(build_model(params, device="meta")[0])
    ref, comp = (Runner(params, tmp_path / n, train=program, executor=n, weights=initial_weights(params),
                        no_decay=no_decay) for n in ("reference", "compiled"))
    layout = params.layout()
    weights = {k: comp.weights[k].data_ptr() for k in comp.trainable}
    state = None
    for step in range(4):
        batch = [random_batch(layout, 8, seed=50 + step)]
        a, b = ref.train_step(batch), comp.train_step(batch)
        assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss), (step, a.loss, b.loss)
        now = {(n, k): v.data_ptr() for n, st in comp.optimizer.state.items() for k, v in st.items()}
        state = state or now
        assert now == state, "optimizer state reallocated: the update did not write in place"
    assert {k: comp.weights[k].data_ptr() for k in comp.trainable} == weights
    for name in comp.trainable:
        torch.testing.assert_close(comp.weights[name], ref.weights[name], rtol=1e-3, atol=1e-5)
    assert held


def test_gradients_are_claimed_only_where_no_other_tensor_holds_their_memory():
    """Red when ``Claims`` claims views without checking overlap (the old rule copied every view:
    1% of the medium step), takes a tensor twice, or writes into an input's memory."""
    from mmgraph.runtime.gradients import Claims

    buf, weight = torch.zeros(4, 6), torch.ones(3, 5)
    owned = Claims([weight])
    assert owned.claim(buf[:2]) and owned.claim(buf[2:].t())      # disjoint views of one buffer
    assert not owned.claim(buf[1:3])                               # overlaps both
    fresh = torch.zeros(8)
    assert owned.claim(fresh) and not owned.claim(fresh) and not owned.claim(fresh.view(2, 4))
    assert not owned.claim(weight) and not owned.claim(weight[1:].t())         # the program's inputs
    assert not Claims([]).claim(torch.zeros(3).expand(4, 3))      # elements that share memory
    assert not Claims([]).claim(torch.zeros(4, 6)[:, ::2])         # not dense: an update would skip gaps


def test_gradient_outputs_that_share_memory_are_weighed_and_clipped_once(tmp_path, monkeypatch):
    """Two micro-batches, clipped, where the program returns one tensor as two gradients and a
    view of a weight as a third: the step equals the one given separate copies. Red when the
    runner writes into memory it does not own alone."""
    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    shared, copied = (Runner(params, tmp_path / str(n), train=program, weights=initial_weights(params)) for n in range(2))
    index = {o.target: i for i, o in enumerate(program.outputs) if o.kind == "grad"}
    shape = {k: tuple(shared.weights[k].shape) for k in index}
    x, y = next((x, y) for x in index for y in index if x < y and shape[x] == shape[y])
    z = next(k for k in index if k not in (x, y))

    def aliasing(run, weights, alias):
        def call(inputs):
            outs = list(run(inputs))
            outs[index[x]] = outs[index[y]] if alias else outs[index[y]].clone()
            outs[index[z]] = weights[z].view(shape[z]) if alias else weights[z].clone()
            return tuple(outs)
        return call
    for runner, alias in ((shared, True), (copied, False)):
        monkeypatch.setattr(runner, "train_exec", aliasing(runner.train_exec, runner.weights, alias))
    layout = params.layout()
    for step in range(2):
        micro = [random_batch(layout, 8, seed=60 + step), random_batch(layout, 8, seed=70 + step)]
        a, b = shared.train_step(micro), copied.train_step(micro)
        assert (a.loss, a.grad_norm) == (b.loss, b.grad_norm)
    for k in shared.weights:
        assert torch.equal(shared.weights[k], copied.weights[k]), k


def test_non_finite_is_exact_also_when_a_sum_overflows():
    """Red when the element-wise fallback is dropped (finite weights whose sum overflows)."""
    big = torch.full((4,), 3e38)
    assert checkpoint.non_finite({"big": big, "w": torch.ones(3)}) == []
    for bad in (float("inf"), float("-inf"), float("nan")):
        w = torch.ones(5)
        w[2] = bad
        assert checkpoint.non_finite({"ok": torch.ones(2), "w": w, "big": big}) == ["w"]
    half = torch.ones(3, dtype=torch.float16) * 60000
    assert checkpoint.non_finite({"h": half}) == []


def test_adam_state_is_made_once():
    """Red with the old ``setdefault(name, {zeros_like...})``, which made two zero tensors per weight
    per step (the state kept, the zeros thrown away: counted here as allocations)."""
    params = load_params(TINY2)
    p = {"w": torch.zeros(4, 4)}
    opt = Optimizer(params.optimizer, p)
    opt.step({"w": torch.ones(4, 4)})
    real = torch.zeros_like
    calls = []
    torch.zeros_like = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        opt.step({"w": torch.ones(4, 4)})
    finally:
        torch.zeros_like = real
    assert calls == []


def test_compiled_executor_compiles_per_region():
    """Each transformer layer's forward and backward is a region of its own (repeated layers: the
    same code, compiled once through Inductor's cache); red when the executor compiles the whole
    graph as one, or when regions cross layers."""
    from mmgraph.core.ir import LayerKind
    from mmgraph.runtime.executors import CompiledExecutor
    from mmgraph.runtime.regions import region_of

    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    region = region_of(program)
    by_layer: dict = {}
    for node in program.ops():
        info = program.info[node.name]
        if info.kind == LayerKind.BLOCK:
            by_layer.setdefault((info.layer, info.phase), set()).add(region(node))
    assert by_layer and all(len(r) == 1 for r in by_layer.values())
    assert len({next(iter(r)) for r in by_layer.values()}) == len(by_layer)
    ex = CompiledExecutor(program, params, torch.device("cpu"))
    subs = [n.target for n in ex.fn.graph.nodes if n.op == "call_module"]
    assert len(subs) > len(by_layer)


def test_a_repeated_layers_update_is_one_region_compiled_once():
    """The update in the program (``--optimizer_in_program``) is grouped like the layers: each
    transformer layer's weights' update is one region with the same code as the next layer's
    (one compiled function for all of them), each write-back copy in the region that makes its
    value. Red when update ops lose their weight (``NodeInfo.module``), when ``core.update``
    interleaves weights again, or when the copies gather at the end."""
    from mmgraph.core.ir import InputKind, LayerKind
    from mmgraph.runtime.executors import CompiledExecutor, in_place
    from mmgraph.runtime.regions import region_of

    params = load_params(TINY2)
    program = compile_step(params, optimizer_in_program=True)[-1].program
    gm = in_place(program.gm, write_back(program))
    region = region_of(program, gm)
    placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
    block_weights = {}
    for node, spec in zip(placeholders, program.inputs):
        layers = {program.info[u.name].layer for u in node.users if u.name in program.info
                  and program.info[u.name].kind == LayerKind.BLOCK}
        if spec.kind == InputKind.PARAM and len(layers) == 1:
            block_weights[spec.name] = layers.pop()
    by_layer: dict = {}
    for node in gm.graph.nodes:
        info = program.info.get(node.name)
        if info is not None and info.layer == "optimizer" and info.module in block_weights:
            by_layer.setdefault(block_weights[info.module], set()).add(region(node))
    assert len(by_layer) >= 2 and all(len(r) <= 2 for r in by_layer.values()), by_layer   # norm part, update part
    copies = [n for n in gm.graph.nodes if n.target is torch.ops.aten.copy_.default]
    assert copies and len({region(n) for n in copies}) > 2, "the write-back copies gathered in one region"
    for c in copies:                                   # with the value they write
        assert region(c) == region(c.args[1])
    ex = CompiledExecutor(program, params, torch.device("cpu"))
    update = {r for rs in by_layer.values() for r in rs}
    codes = {id(getattr(ex.fn, f"submod_{r}").region) for r in update}
    assert len(codes) < len(update), "each layer's update compiled on its own"


def test_a_shared_region_is_compiled_once_whatever_its_callers_strides():
    """Two call sites of one region's code, the first passing a strided view (as the first
    layer's input is a slice of a longer sequence): one compile, not one per layout; the inputs
    a region writes (here transposed views) reach it as they are; a region used once with
    nothing to fuse is not compiled. Red without ``gapped_inputs`` (the code is compiled again for
    the second layout), or when it copies a written input (the write is lost)."""
    from mmgraph.runtime.regions import Region, Site, regional

    graph = torch.fx.Graph()
    x, out1, out2 = (graph.placeholder(n) for n in ("x", "out1", "out2"))
    label = {}

    def op(region, target, *args):
        node = graph.call_function(target, args)
        label[node.name] = region
        return node

    view = op(0, torch.ops.aten.slice.Tensor, x, 1, 1, 9)
    a = op(1, torch.ops.aten.relu.default, op(1, torch.ops.aten.mul.Tensor, view, 2.0))
    op(1, torch.ops.aten.copy_.default, out1, a)
    b = op(2, torch.ops.aten.relu.default, op(2, torch.ops.aten.mul.Tensor, a, 2.0))
    op(2, torch.ops.aten.copy_.default, out2, b)
    graph.output((b,))
    gm = torch.fx.GraphModule({}, graph)
    fn = regional(gm, lambda n: label[n.name])
    xs = torch.randn(2, 10, 4)
    dest1, dest2 = (torch.zeros(2, 4, 8).transpose(1, 2) for _ in range(2))
    (got,) = fn(xs, dest1, dest2)
    torch.testing.assert_close(got, (xs[:, 1:9] * 4).relu())
    assert torch.equal(dest2, got) and torch.equal(dest1, (xs[:, 1:9] * 2).relu()), "a write was lost"
    assert isinstance(fn.submod_1, Site) and isinstance(fn.submod_1.region, Region)
    assert fn.submod_1.region is fn.submod_2.region and fn.submod_1.region.written == frozenset({1})  # (input, out)
    assert len(fn.submod_1.region.compiled) == 1                    # the shared code, once
    assert isinstance(fn.submod_0, torch.fx.GraphModule)    # the slice alone: nothing to fuse, fx code


def test_a_site_whose_inputs_change_layout_gets_code_for_the_new_one():
    """A region compiled by Inductor directly has no guards: its code checks its inputs' sizes
    and strides, and the site compiles (or takes) the region's code for a new layout instead of
    running code made for another. Red when the site keeps calling the old code (an assertion
    error, or a wrong result) or when an error of the same layout is swallowed."""
    import pytest

    from mmgraph.runtime.regions import Region, Site

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (graph.call_function(
        torch.ops.aten.relu.default, (x,)), 3.0)),))
    site = Site(Region(torch.fx.GraphModule({}, graph), shared=False))
    a = torch.randn(4, 6)
    torch.testing.assert_close(site(a)[0], a.relu() * 3)
    t = torch.randn(6, 4).t()                                  # the same shape, transposed strides
    torch.testing.assert_close(site(t)[0], t.relu() * 3)
    torch.testing.assert_close(site(a)[0], a.relu() * 3)
    assert len(site.region.compiled) == 2
    with pytest.raises(AssertionError):
        site.fn = lambda *args: (_ for _ in ()).throw(AssertionError("not a layout"))
        site(a)


def test_a_region_with_an_input_that_is_not_a_tensor_keeps_torch_compiles_guards():
    """Inductor's code bakes a Python number in; such a region is compiled by torch.compile,
    whose guards compile it again for another value. Red when it goes to Inductor directly
    (the second value would be computed with the first)."""
    from mmgraph.runtime.regions import Region, Site

    graph = torch.fx.Graph()
    x, k = graph.placeholder("x"), graph.placeholder("k")
    graph.output((graph.call_function(torch.ops.aten.mul.Tensor, (x, k)),))
    site = Site(Region(torch.fx.GraphModule({}, graph), shared=False))
    a = torch.randn(4, 6)
    torch.testing.assert_close(site(a, 2.0)[0], a * 2.0)
    torch.testing.assert_close(site(a, 3.0)[0], a * 3.0)


def test_prepare_probes_the_cpu_vector_isa_off_the_main_thread(monkeypatch):
    """``prepare`` (called before the lowering) checks each vector ISA the CPU reports on a
    thread of its own, then has Inductor pick one; the compiled executor waits for it; other
    executors start nothing. Red when the checks run on the caller's thread or one at a time
    on one thread, or when a reported ISA is skipped."""
    import platform
    import threading

    import pytest
    from torch._inductor import cpu_vec_isa

    import mmgraph.runtime.regions as ex

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86 ISA list")
    seen = []
    together = threading.Barrier(2, timeout=10)         # the two reported ISAs: checked at the same time

    class Isa:
        def __init__(self, name):
            self.name = name

        def __str__(self):
            return self.name

        def __bool__(self):
            together.wait()
            seen.append((self.name, threading.current_thread()))
            return True

    monkeypatch.setattr(cpu_vec_isa, "supported_vec_isa_list", [Isa("avx512 avx512_vnni"), Isa("avx2"), Isa("asimd")])
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2", "avx512", "avx512_vnni"])
    picked = []
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: picked.append(threading.current_thread()))
    monkeypatch.setattr(ex, "_setup", {})
    ex.prepare("reference", torch.device("cpu"))
    assert not ex._setup
    ex.prepare("compiled", torch.device("cpu"))
    ex.prepared()
    assert sorted(n for n, _ in seen) == ["avx2", "avx512 avx512_vnni"]
    assert len(picked) == 1 and threading.main_thread() not in {t for _, t in seen} | set(picked)


def test_a_shared_region_copies_only_views_with_gaps():
    """A shared region's inputs: a slice of a longer sequence is made contiguous; a transposed
    weight, an expanded mask and a contiguous tensor pass as themselves (copying them every step
    cost the small config's compiled step about 20 MB of copies). Red when every non-contiguous
    input is copied, or when the slice is not."""
    from mmgraph.runtime.regions import gapped_inputs

    x = torch.randn(8, 130, 16)
    sliced, t, mask, dense = x[:, 1:129], torch.randn(24, 16).t(), torch.ones(1, 1, 4, 4).expand(8, 2, 4, 4), x
    assert gapped_inputs((sliced, t, mask, dense), frozenset()) == (0,)
    assert gapped_inputs((sliced, t, mask, dense), frozenset({0})) == ()         # an input it writes


def test_the_update_of_weights_of_no_layer_is_one_region():
    """Once the layers' updates have begun, the update ops of weights no layer reads (the
    projector's, the norms') are one region wherever their runs fall (one compile and kernel, not
    one per run); before that (their gradient-norm parts inside the backward's runs) nothing is
    moved; a grouping that would make regions depend on each other both ways is refused. Red
    when the runs are left apart or when ``_acyclic`` misses a cycle."""
    from mmgraph.core.ir import LayerKind
    from mmgraph.passes.optimizer import LAYER
    from mmgraph.runtime.executors import in_place
    from mmgraph.runtime.regions import _acyclic, _weight_layers, region_of

    params = load_params(TINY2)
    program = compile_step(params, optimizer_in_program=True)[-1].program
    gm = in_place(program.gm, write_back(program))
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    runs, merged = region_of(program, gm, merge=False), region_of(program, gm)
    assert len({merged(n) for n in nodes}) < len({runs(n) for n in nodes})
    layer_of = _weight_layers(program)
    order = {n.name: i for i, n in enumerate(nodes)}
    start = min(order[n.name] for n in nodes if n.name in program.info and program.info[n.name].layer == LAYER
                and program.info[n.name].module in layer_of)
    rest = {merged(n) for n in nodes if order[n.name] > start and n.name in program.info
            and program.info[n.name].layer == LAYER and program.info[n.name].kind != LayerKind.BLOCK
            and program.info[n.name].module not in layer_of}
    assert len(rest) == 1
    a, b, c = (torch.fx.Node(torch.fx.Graph(), name, "call_function", torch.relu, (), {}) for name in "abc")
    b.args, c.args = (a,), (b,)
    assert _acyclic([a, b, c], {"a": 0, "b": 1, "c": 0}) is False
    assert _acyclic([a, b, c], {"a": 0, "b": 0, "c": 1}) is True


def test_the_reference_writes_in_place_only_into_operands_no_later_op_reads():
    """``reuse_dead_operands``: an elementwise op writes into an operand only where nothing else
    reads its memory: not an input (even one read once), not an operand read again or returned,
    not one whose view is read, not an expanded view (also one a functional copy became:
    ``placed``); where it does, the values are the same. Red when ``_dead_after`` passes any
    operand, an input read once, or an expanded view, or passes none (nothing reused)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from mmgraph.runtime.executors import placed, reuse_dead_operands

    aten = torch.ops.aten

    def f(x, w, y):
        a = x * 2                 # x is an input: not written
        b = a + w                 # a is read here only: written (a fresh tensor)
        v = b.view(-1)            # b is read twice (this view, the next op): not written
        c = b * 3                 # b is also read by v: not written
        d = v.sum() + c           # c read again below: not written
        e = c.t() * 2             # c returned: the view of c is not written
        g = x.expand(3, 4) * 1.5  # an input's expanded view: no
        h = aten.expand_copy.default(torch.ones(1, 4) * 2, [3, 4]) + 1   # ones * 2 into ones; + 1: no (a view)
        k = (g + h).view(12) - 1  # g + h into g (read here only); the sum, read once through a view: written
        m = y * 0.5               # y, an input read once: not written
        return c, d, e, k, m

    x, w, y = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    gm = reuse_dead_operands(placed(make_fx(f)(x, w, y), torch.device("cpu"), own=True))
    want = f(x.clone(), w.clone(), y.clone())
    inplace = sorted(str(n.target) for n in gm.graph.nodes if str(n.target).endswith("_.Tensor"))
    assert inplace == ["aten.add_.Tensor", "aten.add_.Tensor", "aten.mul_.Tensor", "aten.sub_.Tensor"], inplace
    kept = [t.clone() for t in (x, w, y)]
    for got, expected in zip(gm(x, w, y), want):
        assert torch.equal(got, expected)
    assert all(torch.equal(a, b) for a, b in zip((x, w, y), kept))


def test_the_reference_executor_reuses_memory_with_the_same_values():
    """The tiny train and eval programs under the reference executor: bit for bit the outputs of
    their graphs as traced, inputs (weights, batch) untouched, and the gradient sums written in
    place (as eager autograd does them). Red when ``reuse_dead_operands`` is dropped (nothing in
    place) or writes an operand that is read again."""
    from mmgraph.runtime.executors import ReferenceExecutor, placed
    from mmgraph.runtime.regions import writes_in_place

    for mode in ("train", "eval"):
        params = load_params(TINY2, mode)
        program = compile_step(params, mode)[-1].program
        weights = initial_weights(params)
        batch = random_batch(params.layout(mode), 8, seed=11)
        inputs = [weights[s.name] if s.kind.value == "param" else batch[s.name] for s in program.inputs]
        kept = [t.clone() for t in inputs]
        ref = ReferenceExecutor(program, params, torch.device("cpu"))
        assert len([n for n in ref.fn.graph.nodes if writes_in_place(n)]) >= (50 if mode == "train" else 20), mode
        assert not any(writes_in_place(n) for n in program.gm.graph.nodes)      # the program's own graph: as it was
        with torch.no_grad():
            want = placed(program.gm, torch.device("cpu"))(*inputs)
        for _ in range(2):
            got = ref(inputs)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), mode
            assert all(torch.equal(a, b) for a, b in zip(inputs, kept)), mode
