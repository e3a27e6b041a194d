"""The compiled executor's joint g++ builds (runtime/cpp_builds.py): several of a graph's C++
kernels built in one translation unit, each still called as Inductor's own, and each built
alone where a joint build fails. Pins the private Inductor API the module hooks."""

from __future__ import annotations

import inspect

import pytest
import torch

from mmgraph.runtime import cpp_builds
from mmgraph.runtime.cpp_builds import batched, joint_source

KERNEL = '''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0, float* out_ptr0, const int64_t ks0)
{
    for (int64_t i = 0; i < ks0; ++i) out_ptr0[i] = in_ptr0[i] * %s;
}
'''


def _many_kernels(x, y):
    # elementwise ops between matrix products (ATen's): a C++ kernel before, between and after
    a = (x * 2.0).relu() @ y.t()
    b = torch.sigmoid(a) + 1.0
    return (torch.tanh(b @ y) - x).sum(dim=1)


def _compiled_kernels(fn, *args):
    torch._dynamo.reset()
    before = dict(cpp_builds.stats)
    with batched():
        out = torch.compile(fn, dynamic=False, fullgraph=True)(*args)
    return out, {k: cpp_builds.stats[k] - before.get(k, 0) for k in ("joint", "kernels", "alone", "fallback")}


def test_inductor_api_the_joint_builds_hook_is_there():
    from torch._inductor.async_compile import AsyncCompile, get_compile_threads
    from torch._inductor.codecache import CppPythonBindingsCodeCache, LambdaFuture

    assert list(inspect.signature(AsyncCompile.cpp_pybinding).parameters)[:3] == ["self", "argtypes", "source_code"]
    params = inspect.signature(CppPythonBindingsCodeCache.load_pybinding_async).parameters
    assert list(params)[:2] == ["argtypes", "main_code"] and "submit_fn" in params
    assert CppPythonBindingsCodeCache.entry_function == "kernel"
    assert callable(LambdaFuture(lambda: 1).result) and get_compile_threads() >= 1


def test_joint_source_renames_each_entry_and_binds_it():
    source, names = joint_source([KERNEL % "2.0f", KERNEL % "3.0f"], [["const float*", "float*", "const int64_t"]] * 2)
    assert names == ["kernel_0", "kernel_1"]
    assert source.count('extern "C"  void  kernel_0(') == 1 and source.count('extern "C"  void  kernel_1(') == 1
    assert '{"kernel_1", kernel_1_py, METH_VARARGS, ""}' in source and "PyInit_kernel" in source
    with pytest.raises(ValueError):             # two entry points in one source: not a plain kernel
        joint_source([KERNEL % "2.0f" + KERNEL % "3.0f"], [["float*"]])
    with pytest.raises(ValueError):             # an argument type the binding cannot parse
        joint_source([KERNEL % "2.0f"], [["c10::complex<float>"]])


def test_a_graphs_kernels_are_built_together_and_compute_as_eager():
    from torch._inductor.async_compile import get_compile_threads

    if get_compile_threads() <= 1:
        pytest.skip("Inductor builds each kernel as it is generated with one compile thread")
    x, y = torch.randn(6, 33), torch.randn(6, 33)
    out, counts = _compiled_kernels(_many_kernels, x, y)
    torch.testing.assert_close(out, _many_kernels(x, y))
    assert counts["joint"] >= 1 and counts["kernels"] >= 2 and counts["alone"] == 0, counts


def test_a_joint_build_that_fails_falls_back_to_one_build_per_kernel(monkeypatch):
    from torch._inductor.async_compile import get_compile_threads

    if get_compile_threads() <= 1:
        pytest.skip("Inductor builds each kernel as it is generated with one compile thread")
    real = joint_source

    def broken(sources, argtypes):
        source, names = real(sources, argtypes)
        return source + "\n#error a kernel the joint build cannot hold\n", names

    monkeypatch.setattr(cpp_builds, "joint_source", broken)
    x, y = torch.randn(5, 17), torch.randn(5, 17)
    out, counts = _compiled_kernels(_many_kernels, x, y)
    torch.testing.assert_close(out, _many_kernels(x, y))
    assert counts["joint"] == 0 and counts["alone"] == counts["fallback"] >= 2, counts


def test_batched_restores_inductor_and_is_not_reentrant():
    from torch._inductor.async_compile import AsyncCompile

    original = AsyncCompile.cpp_pybinding
    with batched():
        inner = AsyncCompile.cpp_pybinding
        with batched():                          # held already: changes nothing
            assert AsyncCompile.cpp_pybinding is inner
    assert AsyncCompile.cpp_pybinding is original
