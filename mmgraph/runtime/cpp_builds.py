"""One g++ run for several of a region's C++ kernels, while the compiled executor compiles.

Inductor builds each CPU kernel it generates as a Python extension of its own: one g++ run per
kernel, about 0.7 s of CPU on this machine, of which 0.4 s is loading Inductor's precompiled
header (150 MB) and 0.1 s linking; the kernel's own code is about 0.15 s. A region of the step
has 1-7 kernels, built when Inductor loads the region's code (``async_compile.wait``).
``batched`` (held by the compiled executor while it calls its regions) makes Inductor's
``AsyncCompile.cpp_pybinding`` defer each kernel; when the region's code waits for the first of
them, the pending kernels are built together, in ``min(compile threads, ceil(n / PER_BUILD))``
translation units on Inductor's compile pool: each kernel's ``kernel`` renamed ``kernel_<i>``
(``joint_source``), with one Python binding per kernel, as Inductor's own (a tuple of tensors
and scalars in, the kernel called on their data pointers). The kernels' code, flags and
precompiled header are Inductor's: the machine code is the same.

A unit of one kernel, or a joint build that fails (a kernel that is more than one plain
``extern "C"`` function, an argument type the binding does not parse, an Inductor whose API
differs), is built kernel by kernel, as Inductor does without this; ``stats`` counts both. The
private Inductor API it uses (``AsyncCompile.cpp_pybinding``, ``CppPythonBindingsCodeCache``,
``LambdaFuture``) is pinned by tests/test_cpp_builds.py.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from collections import Counter

PER_BUILD = 4                 # kernels a translation unit gets before a second one is worth its header load

stats: Counter = Counter()    # "joint" builds, the "kernels" in them, kernels built "alone" (of them "fallback")

_lock = threading.Lock()
_ENTRY = re.compile(r'(extern\s+"C"\s+(?:[\w:*&<>]+\s+)*?)kernel(\s*\()')


_PARSE = """
static inline int64_t mmgraph_int(PyObject* o) {
    auto v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred()) throw std::runtime_error("expected int arg");
    return v;
}
static inline float mmgraph_float(PyObject* o) {
    auto v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) throw std::runtime_error("expected float arg");
    return static_cast<float>(v);
}"""


def _binding(names: list[str], argtypes: list[list[str]]) -> str:
    """The Python bindings of kernels ``names`` (each like Inductor's: a tuple of tensors and
    scalars in, the kernel called on their data pointers), in one module named ``kernel``."""
    out = ["", "#define PY_SSIZE_T_CLEAN", "#include <Python.h>", "#include <cstdlib>", "#include <cerrno>",
           "#include <stdexcept>",
           "static void* (*mmgraph_data_ptr)(PyObject*);", _PARSE]
    for name, types in zip(names, argtypes):
        args = []
        for n, argtype in enumerate(types):
            base = argtype.replace("const ", "").strip()
            item = f"PyTuple_GET_ITEM(args, {n})"
            if base.endswith("*"):
                args.append(f"static_cast<{base}>(mmgraph_data_ptr({item}))")
            elif base == "int64_t":
                args.append(f"mmgraph_int({item})")
            elif base == "float":
                args.append(f"mmgraph_float({item})")
            else:
                raise ValueError(f"argument type {argtype!r}")
        out.append(f"""
static PyObject* {name}_py(PyObject* self, PyObject* args) {{
    try {{
        if (!PyTuple_CheckExact(args) || PyTuple_GET_SIZE(args) != {len(types)})
            throw std::runtime_error("{name} requires {len(types)} args");
        {name}({", ".join(args)});
        Py_RETURN_NONE;
    }} catch (std::exception const& e) {{
        PyErr_SetString(PyExc_RuntimeError, e.what());
        return nullptr;
    }}
}}""")
    table = "".join(f'    {{"{n}", {n}_py, METH_VARARGS, ""}},\n' for n in names)
    out.append(f"""
static PyObject* kernel_py(PyObject* self, PyObject* args) {{ Py_RETURN_NONE; }}
static PyMethodDef py_methods[] = {{
{table}    {{"kernel", kernel_py, METH_VARARGS, ""}},
    {{NULL, NULL, 0, NULL}}}};
static struct PyModuleDef py_module = {{PyModuleDef_HEAD_INIT, "kernel", NULL, -1, py_methods}};
PyMODINIT_FUNC PyInit_kernel(void) {{
    const char* addr = std::getenv("_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
    if (!addr) {{
        PyErr_SetString(PyExc_RuntimeError, "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR must be set");
        return nullptr;
    }}
    char* end = nullptr;
    errno = 0;
    uintptr_t value = std::strtoull(addr, &end, 10);
    if (errno != 0 || end == addr || value == 0) {{
        PyErr_SetString(PyExc_RuntimeError, "bad _TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR");
        return nullptr;
    }}
    mmgraph_data_ptr = reinterpret_cast<decltype(mmgraph_data_ptr)>(value);
    return PyModule_Create(&py_module);
}}""")
    return "\n".join(out) + "\n"


def joint_source(sources: list[str], argtypes: list[list[str]]) -> tuple[str, list[str]]:
    """One translation unit of Inductor's kernel ``sources`` (each defining ``extern "C"
    kernel``), and the names its module gives them. ValueError where a source is not one plain
    kernel."""
    names, parts = [], []
    for i, source in enumerate(sources):
        renamed, count = _ENTRY.subn(rf"\g<1>kernel_{i}\g<2>", source)
        if count != 1 or "PyInit" in source:
            raise ValueError(f"kernel {i}: {count} entry points")
        names.append(f"kernel_{i}")
        parts.append(renamed)
    return "\n".join(parts) + _binding(names, argtypes), names


@functools.lru_cache(maxsize=None)
def _joint_cache():
    """Inductor's Python-bindings code cache for joint sources (its own in-memory cache; on disk
    Inductor's): the sources carry their own bindings, so it adds none."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    class JointCodeCache(CppPythonBindingsCodeCache):
        cache: dict = {}
        suffix_template = ""

    return JointCodeCache


class _Slot:
    """One deferred kernel: what Inductor's future for it returns, once built."""

    kernel = None


def _build(original, compiler, pending: list) -> None:
    """Build ``pending`` kernels: in joint translation units, or each alone where a unit holds
    one kernel or its joint build fails."""
    from torch._inductor.async_compile import get_compile_threads

    units = max(1, min(get_compile_threads(), math.ceil(len(pending) / PER_BUILD)))
    started = []
    for chunk in (pending[i::units] for i in range(units)):
        future = names = None
        if len(chunk) > 1:
            try:
                source, names = joint_source([c[1] for c in chunk], [c[0] for c in chunk])
                future = _joint_cache().load_pybinding_async([], source, submit_fn=compiler.submit)
            except Exception:       # not plain kernels, or an Inductor whose API differs: each alone
                future = None
        started.append((chunk, names, future))
    alone = []
    for chunk, names, future in started:
        if future is not None:
            try:
                module = future().__self__
                kernels = [getattr(module, name) for name in names]
            except Exception:       # a kernel the joint build cannot hold: each alone, as Inductor does
                stats["fallback"] += len(chunk)
            else:
                for (_, _, slot), kernel in zip(chunk, kernels):
                    slot.kernel = kernel
                stats["joint"] += 1
                stats["kernels"] += len(chunk)
                continue
        alone += [(slot, original(compiler, argtypes, source)) for argtypes, source, slot in chunk]
    for slot, future in alone:
        slot.kernel = future.result()
        stats["alone"] += 1


@contextlib.contextmanager
def batched():
    """While held, Inductor's CPU kernels are built several to a g++ run (see the module's
    docstring). Without a compile pool (one compile thread) Inductor builds each kernel as it
    is generated, and this changes nothing."""
    try:
        from torch._inductor.async_compile import AsyncCompile, get_compile_threads
        from torch._inductor.codecache import LambdaFuture
    except ImportError:
        yield
        return
    if get_compile_threads() <= 1 or not _lock.acquire(blocking=False):
        yield
        return
    original = AsyncCompile.cpp_pybinding
    pending: list[tuple[list[str], str, _Slot]] = []

    def flush(compiler):
        items = pending[:]
        pending.clear()
        if items:
            _build(original, compiler, items)

    def cpp_pybinding(self, argtypes, source_code, *args, **kwargs):
        if args or kwargs:              # a call this module does not know: Inductor's own
            return original(self, argtypes, source_code, *args, **kwargs)
        slot = _Slot()
        pending.append((list(argtypes), source_code, slot))

        def result():
            if slot.kernel is None:
                flush(self)
            return slot.kernel
        return LambdaFuture(result)

    AsyncCompile.cpp_pybinding = cpp_pybinding
    try:
        yield
    finally:
        AsyncCompile.cpp_pybinding = original
        _lock.release()
