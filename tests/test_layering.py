"""The import direction (docs/layering.md): each module imports only its own layer and the
layers below it; the runtime imports neither models nor the converter. Every import counts,
function-local ones too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The package's folder: every module is named by its path under it.
FOLDERS = {"mmgraph": ROOT / "mmgraph"}

# Bottom to top: one folder per layer (docs/layering.md). A module belongs to the first layer
# whose prefix names it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("mmgraph.core", "mmgraph.configs")),    # configs: params files and targets (data)
    ("data", ("mmgraph.data",)),
    ("models", ("mmgraph.models",)),
    ("passes", ("mmgraph.passes",)),
    ("compiler", ("mmgraph.compiler",)),
    ("runtime", ("mmgraph.runtime",)),
    ("report", ("mmgraph.report",)),
    ("convert", ("mmgraph.convert",)),
    ("commands", ("mmgraph.commands",)),
    ("cli", ("mmgraph.cli", "mmgraph.__main__")),
]
# Imports inside functions: only these optional or heavy dependencies, which a command may never
# need (``mmgraph --help`` and ``mmgraph check`` stay light). cli.py is exempt: it imports the one
# command it dispatches to.
LOCAL_IMPORTS_ALLOWED = {"torch", "h5py", "transformers", "tokenizers", "torch_mlir", "onnx", "onnxruntime", "PIL",
                         "networkx", "tqdm", "lz4", "fcntl"}
FORBIDDEN = {"runtime": ("mmgraph.models", "mmgraph.convert"), "passes": ("mmgraph.models",)}


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            if any(name.startswith(other + ".") or name == other for other in FOLDERS if other != package
                   and other.startswith(package + ".")):
                continue                      # mmgraph/passes is not a folder of mmgraph: skip look-alikes
            out[name] = path
    return out


def layer_of(module: str) -> int:
    if module == "mmgraph":                 # the package root: __version__ only
        return 0
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer")


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:                      # relative: resolve against the module's package
                base = module.split(".")[: -node.level] if not path.name == "__init__.py" else module.split(".")[: len(module.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names if f"{name}.{a.name}" in _MODULES]
    return [(line, name) for line, name in found if name == "mmgraph" or name.startswith("mmgraph.")]


_MODULES = _modules()


def violations() -> list[str]:
    out = []
    for module, path in sorted(_MODULES.items()):
        mine = layer_of(module)
        for line, target in _imports(path, module):
            if target == "mmgraph":
                continue
            theirs = layer_of(target)
            where = f"{path.relative_to(ROOT)}:{line}: {module} ({LAYERS[mine][0]}) imports {target}"
            if theirs > mine:
                out.append(f"{where} ({LAYERS[theirs][0]}, above it)")
            for banned in FORBIDDEN.get(LAYERS[mine][0], ()):
                if target == banned or target.startswith(banned + "."):
                    out.append(f"{where} (the {LAYERS[mine][0]} must not import {banned})")
    return out


def test_imports_go_down_the_layers_only():
    found = violations()
    assert not found, "imports against the layering (docs/layering.md):\n" + "\n".join(found)


def test_every_module_is_in_a_layer_folder():
    """No module sits loose in mmgraph/ but the entry points: each is in its layer's folder."""
    loose = [m for m, path in _MODULES.items() if m.count(".") == 1 and path.name != "__init__.py"
             and m not in ("mmgraph.cli", "mmgraph.__main__")]
    assert not loose, f"modules outside the layer folders: {loose}"


def test_the_wheel_lists_every_package():
    """pyproject's explicit package list names every folder of mmgraph/ (a folder left out is
    missing from a non-editable install)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mmgraph").rglob("__init__.py")}
    assert folders <= listed, f"not in pyproject's packages: {sorted(folders - listed)}"


def test_no_command_imports_another():
    """Commands share code through the layers below them, never through each other."""
    found = [f"{path.relative_to(ROOT)}:{line}: imports {target}"
             for module, path in sorted(_MODULES.items()) if module.startswith("mmgraph.commands.")
             for line, target in _imports(path, module)
             if target.startswith("mmgraph.commands.") and not target.startswith(module)]
    assert not found, "a command imports another:\n" + "\n".join(found)


def _local_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    out += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    out.append((node.lineno, "." * node.level + (node.module or "")))
    return sorted(set(out))


def test_imports_are_at_module_level():
    """What a module depends on is at its top; inside a function only LOCAL_IMPORTS_ALLOWED."""
    found = [f"{path.relative_to(ROOT)}:{line}: imports {name} inside a function"
             for module, path in sorted(_MODULES.items()) if module != "mmgraph.cli"
             for line, name in _local_imports(path) if name.split(".")[0] not in LOCAL_IMPORTS_ALLOWED]
    assert not found, "\n".join(found)


def test_the_check_sees_a_violation():
    """The checker itself: an upward import in a synthetic module is reported."""
    assert layer_of("mmgraph.core.ir") < layer_of("mmgraph.runtime.runner") < layer_of("mmgraph.cli")
    fake = ROOT / "build" / "layering_probe.py"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text("def f():\n    from mmgraph.runtime.runner import Runner\n")
    try:
        assert _imports(fake, "mmgraph.core.probe") == [(2, "mmgraph.runtime.runner")]
    finally:
        fake.unlink()
