"""The program artifact: a lowered Program saved so ``mmgraph run`` executes it without tracing.

``MODEL_DIR/programs/NAME/`` (NAME: ``train``, ``train.no_sync``, ``eval``) holds
- ``program.json``: the FX graph as data (nodes with their op, target, arguments and value
  shapes) and every typed field of the Program (input/output specs, node infos, kernels,
  segments, schedule, remat plan, collectives); targets are resolved on load only from an
  allowlist (``torch.ops.aten``, ``prims``, ``_c10d_functional``, mmgraph's own ``dropout_keep``,
  ``operator.getitem``) and
  typed fields only into the IR's own dataclasses; every name that reaches generated code is
  checked first (node names are identifiers, keyword arguments the op's own, stack traces one
  line per frame), so nothing from the file runs (no pickle, no ``exec`` of its text);
- ``fingerprint.json``: what the program was compiled from (the params' keys that reach the
  program, mode, micro-batch, target, world size, ZeRO stage, bucket size, remat policy, torch
  and mmgraph versions, the sha256 of the compiler's own source: trace, pipeline, artifact,
  core, models and passes) and ``program_sha256``: the hash of the program's code
  (``GraphModule.code``, which the dumps' ``program.py`` prints) and of every typed field
  (input and output specs, kernels, ...). Load checks it before the GraphModule is built; an
  artifact without it is refused.

``fingerprint`` says what a run wants; ``differences`` names what changed (a params key, a
version, the target) when an artifact does not match.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import keyword
import operator
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import torch
import torch.fx as fx

from mmgraph import __version__
from mmgraph.core import (
    ir,
    rng as _rng,  # noqa: F401 - registers mmgraph::dropout_keep, an op programs may call
)
from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.files import building
from mmgraph.passes.data_parallel import DEFAULT_BUCKET_BYTES

FORMAT = 2
NAMESPACES = ("aten", "prims", "_c10d_functional", "mmgraph")     # mmgraph: its own ops (core/rng.py)
# Input keys that never reach the program (where the data is and how it is read).
DATA_ONLY = {"data_dir", "img_data_dir", "transforms", "shuffle", "shuffle_seed", "drop_last", "num_workers",
             "noaugment", "data_processor"}


# -- fingerprint ---------------------------------------------------------------------------------
def _flat(prefix: str, value: Any, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


# What shapes a program: its source is hashed into every fingerprint, so a changed compiler or
# model recompiles instead of running a stale program.
COMPILER_MODULES = ("mmgraph.core", "mmgraph.models", "mmgraph.passes", "mmgraph.compiler.trace", "mmgraph.compiler.pipeline",
                    "mmgraph.compiler.artifact")


@functools.cache
def compiler_sha256() -> str:
    """sha256 over the source files of ``COMPILER_MODULES`` (path and text, in a fixed order)."""
    files: list[tuple[str, Path]] = []
    for name in COMPILER_MODULES:
        module = importlib.import_module(name)
        locations = getattr(module, "__path__", None)
        if locations:                                       # a package: every .py below it
            for root in locations:
                files += [(f"{name}/{f.relative_to(root).as_posix()}", f) for f in Path(root).rglob("*.py")]
        else:
            files.append((name, Path(module.__file__)))
    digest = hashlib.sha256()
    for label, path in sorted(files):
        digest.update(label.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def pass_versions() -> dict[str, str]:
    """Each module of ``mmgraph.passes`` -> the first 12 hex digits of its source's sha256: the
    version of every pass (and of the analyses passes share), so a stale artifact names the pass
    that changed."""
    root = Path(importlib.import_module("mmgraph.passes").__file__).parent
    return {f.stem: hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            for f in sorted(root.glob("*.py")) if f.stem != "__init__"}


def fingerprint(params: Params, mode: str, *, target: Optional[str], world_size: int = 1, zero: int = 0,
                bucket_bytes: Optional[int] = None, remat: Optional[str] = None, update: bool = False) -> dict:
    """What a program of ``params`` for ``mode`` is compiled from (JSON-able); settings that do
    not change the program are normalised away (ZeRO-1 is DDP's program; one rank has no buckets).
    ``update``: the program holds the optimizer update (``--optimizer_in_program``), so the
    optimizer's settings shape it too (all but the learning rate, an input)."""

    parallel = mode == "train" and world_size > 1
    section = "eval_input" if mode == "eval" else "train_input"
    data = params.input_for(mode)
    keys: dict = {}
    _flat("model", params.model.model_dump(mode="json"), keys)
    if data is not None:
        _flat(section, {k: v for k, v in data.model_dump(mode="json").items() if k not in DATA_ONLY}, keys)
    update = update and mode == "train"
    if update and params.optimizer is not None:
        _flat("optimizer", {k: v for k, v in params.optimizer.model_dump(mode="json").items()
                            if k != "learning_rate"}, keys)
    return {"format": FORMAT, "mmgraph": __version__, "torch": torch.__version__, "compiler": compiler_sha256(),
            "passes": pass_versions(), "mode": mode, "target": target,
            "world_size": world_size if parallel else 1, "zero": zero if parallel and zero == 2 else 0,
            "bucket_bytes": (bucket_bytes or DEFAULT_BUCKET_BYTES) if parallel else None, "remat": remat,
            "update": "program" if update else "host", "params": keys}


def differences(saved: dict, wanted: dict) -> list[str]:
    """What differs between a saved fingerprint and the wanted one, in words."""
    out = []
    for key in wanted:
        if key in ("params", "program_sha256", "resolved"):
            continue
        if key == "passes" and saved.get(key) != wanted[key]:
            was = saved.get(key) or {}
            changed = sorted(k for k in set(was) | set(wanted[key]) if was.get(k) != wanted[key].get(k))
            out.append(f"passes changed: {', '.join(changed)}")
        elif key == "compiler" and saved.get(key) != wanted[key]:
            was = str(saved.get(key))[:12]
            out.append(f"the compiler's source changed (trace, models, passes, core: {was} -> {wanted[key][:12]})")
        elif saved.get(key) != wanted[key]:
            out.append(f"{key} {saved.get(key)!r} -> {wanted[key]!r}")
    a, b = saved.get("params", {}), wanted.get("params", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"params key {key} changed ({a.get(key)!r} -> {b.get(key)!r})" if key in a and key in b
                       else f"params key {key} {'added' if key in b else 'removed'}")
    return out


def _sha256(code: str, fields: dict) -> str:
    digest = hashlib.sha256(code.encode())
    digest.update(b"\0" + json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()


def _fields(program: ir.Program) -> dict:
    return {f.name: _enc(getattr(program, f.name)) for f in dataclasses.fields(program) if f.name != "gm"}


def program_sha256(program: ir.Program) -> str:
    """The hash of what runs: the program's code and every typed field (specs, kernels, ...)."""
    return _sha256(program.gm.code, _fields(program))


# -- values -> JSON ------------------------------------------------------------------------------
def _dataclasses() -> dict[str, type]:
    classes = [ir.InputSpec, ir.OutputSpec, ir.NodeInfo, ir.PassRecord, ir.Kernel, ir.Segment, ir.SegmentTime,
               ir.Schedule, ir.RematLayer, ir.RematPlan, ir.MemoryPlan, ir.Bucket]
    return {c.__name__: c for c in classes}


_ENUMS = {"InputKind": ir.InputKind, "Phase": ir.Phase, "LayerKind": ir.LayerKind}
_MEMORY_FORMATS = {str(f).split(".")[-1]: f for f in (torch.contiguous_format, torch.channels_last,
                                                      torch.channels_last_3d, torch.preserve_format)}
_LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}


def _enc(v: Any) -> Any:
    if isinstance(v, Enum):                         # before str: the IR's enums are str enums
        return {"enum": type(v).__name__, "value": v.value}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else {"float": repr(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"memory_format": str(v).split(".")[-1]}
    if isinstance(v, torch.layout):
        return {"layout": str(v).split(".")[-1]}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"dataclass": type(v).__name__,
                "fields": {f.name: _enc(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, dict):
        return {"dict": [[_enc(k), _enc(x)] for k, x in v.items()]}
    raise TypeError(f"cannot save a {type(v).__name__} in a program artifact")


def _dec(v: Any, nodes: Optional[dict] = None, where: str = "") -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [_dec(x, nodes, where) for x in v]
    if not isinstance(v, dict) or len(v) not in (1, 2):
        raise ValueError(f"{where}: unexpected value {str(v)[:80]}")
    if "float" in v:
        return float(v["float"])
    if "node" in v:
        if nodes is None or v["node"] not in nodes:
            raise ValueError(f"{where}: refers to unknown node {v['node']!r}")
        return nodes[v["node"]]
    if "dtype" in v:
        dtype = getattr(torch, v["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{where}: unknown dtype {v['dtype']!r}")
        return dtype
    if "device" in v:
        return torch.device(v["device"])
    if "memory_format" in v:
        return _MEMORY_FORMATS[v["memory_format"]]
    if "layout" in v:
        return _LAYOUTS[v["layout"]]
    if "enum" in v:
        return _ENUMS[v["enum"]](v["value"])
    if "tuple" in v:
        return tuple(_dec(x, nodes, where) for x in v["tuple"])
    if "dict" in v:
        return {_dec(k, nodes, where): _dec(x, nodes, where) for k, x in v["dict"]}
    if "dataclass" in v:
        cls = _dataclasses().get(v["dataclass"])
        if cls is None:
            raise ValueError(f"{where}: unknown type {v['dataclass']!r}")
        return cls(**{k: _dec(x, nodes, where) for k, x in v["fields"].items()})
    raise ValueError(f"{where}: unexpected value {str(v)[:80]}")


# -- the graph -----------------------------------------------------------------------------------
def _target_name(target) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace in NAMESPACES:
        return f"{target.namespace}.{target._schema.name.split('::')[1]}.{target._overloadname}"
    raise TypeError(f"cannot save call target {target!r} in a program artifact")


def _resolve(name: str):
    if name == "operator.getitem":
        return operator.getitem
    namespace, _, rest = name.partition(".")
    op, _, overload = rest.rpartition(".")
    if namespace not in NAMESPACES or not op:
        raise ValueError(f"call target {name!r} is not an allowed op")
    packet = getattr(getattr(torch.ops, namespace), op, None)
    found = getattr(packet, overload, None) if packet is not None else None
    if not isinstance(found, torch._ops.OpOverload):
        raise ValueError(f"unknown op {name!r} (this torch has no such overload)")
    return found


def _val(v) -> Any:
    if isinstance(v, torch.Tensor):
        return {"shape": list(v.shape), "stride": list(v.stride()), "dtype": str(v.dtype).removeprefix("torch.")}
    if isinstance(v, (tuple, list)):
        return [_val(x) for x in v]
    return None


def _unval(v):
    if isinstance(v, dict):
        dtype = getattr(torch, str(v["dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {str(v['dtype'])[:40]!r}")
        return torch.empty_strided(v["shape"], v["stride"], dtype=dtype, device="meta")
    if isinstance(v, list):
        return tuple(_unval(x) for x in v)
    return None


def _graph_to_json(gm: fx.GraphModule) -> list[dict]:
    out = []
    for n in gm.graph.nodes:
        entry = {"name": n.name, "op": n.op, "args": _enc(n.args), "kwargs": _enc(n.kwargs),
                 "val": _val(n.meta.get("val")), "stack_trace": n.meta.get("stack_trace")}
        if n.op == "call_function":
            entry["target"] = _target_name(n.target)
        elif n.op == "placeholder":
            entry["target"] = n.target
        elif n.op != "output":
            raise TypeError(f"cannot save a {n.op} node in a program artifact")
        out.append(entry)
    return out


# Characters that end a line of Python source besides "\n" (fx splits stack traces on "\n" only
# and prints a frame's code as a comment) or have no business in a comment.
_LINE_BREAKS = {"\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"}


def _identifier(name: Any, at: str, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise ValueError(f"{at}: {what} {str(name)[:80]!r} is not a plain identifier")
    return name


def _check_kwargs(target, kwargs: dict, at: str) -> None:
    allowed = {a.name for a in target._schema.arguments} if isinstance(target, torch._ops.OpOverload) else set()
    for key in kwargs:
        _identifier(key, at, "keyword argument")
        if key not in allowed:
            raise ValueError(f"{at}: {target} takes no keyword argument {key!r}")


def _check_stack_trace(text: Any, at: str) -> Optional[str]:
    if text is None:
        return None
    if not isinstance(text, str) or any(c in _LINE_BREAKS or (not c.isprintable() and c not in "\n\t")
                                        for c in text):
        raise ValueError(f"{at}: the stack trace has characters a source comment cannot hold")
    return text


def _graph_from_json(entries: list[dict], where: str) -> fx.Graph:
    """The graph the entries describe, every name checked; nothing is compiled or run."""
    if not isinstance(entries, list):
        raise ValueError(f"{where}: graph is not a list of nodes")
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}
    for e in entries:
        if not isinstance(e, dict):
            raise ValueError(f"{where}: a node is not an object")
        at = f"{where}: node {str(e.get('name'))[:80]!r}"
        args, kwargs = _dec(e["args"], nodes, at), _dec(e["kwargs"], nodes, at)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ValueError(f"{at}: args or kwargs of the wrong type")
        if e["op"] == "output":
            node = graph.output(args[0])
        else:
            name = _identifier(e["name"], at, "node name")
            if e["op"] == "placeholder":
                if e.get("target") != name or args or kwargs:
                    raise ValueError(f"{at}: a placeholder is its name, with no arguments")
                node = graph.placeholder(name)
            elif e["op"] == "call_function":
                target = _resolve(e["target"])
                _check_kwargs(target, kwargs, at)
                node = graph.create_node("call_function", target, args, kwargs, name=name)
            else:
                raise ValueError(f"{at}: op {e['op']!r} is not allowed")
            if node.name != name:
                raise ValueError(f"{at}: the name did not survive (got {node.name!r})")
        if e.get("val") is not None:
            node.meta["val"] = _unval(e["val"])
        trace = _check_stack_trace(e.get("stack_trace"), at)
        if trace is not None:                                  # where the op came from, for the printout
            node.meta["stack_trace"] = trace
        nodes[node.name] = node
    graph.lint()
    return graph


# -- save / load ---------------------------------------------------------------------------------
def save(folder: str | Path, program: ir.Program, wanted: dict, resolved: Optional[dict] = None) -> Path:
    """Write ``program`` and its fingerprint to ``folder`` (a temporary name, then renamed);
    ``resolved``: what compile decided for ``auto`` settings (micro-batch, remat policy)."""
    folder = Path(folder)
    fields = _fields(program)
    doc = {"format": FORMAT, "graph": _graph_to_json(program.gm), "fields": fields}
    stamp = {**wanted, "resolved": resolved or {}, "program_sha256": _sha256(program.gm.code, fields)}
    with building(folder) as tmp:
        (tmp / "program.json").write_text(json.dumps(doc))
        (tmp / "fingerprint.json").write_text(json.dumps(stamp, indent=1))
    return folder


def save_stages(store: Path, mode: str, stages, wanted: dict, resolved: Optional[dict] = None) -> Path:
    """The programs ``mmgraph run`` loads for ``mode`` (``store/MODE``), from the compile's
    stages: the last one, and, when it accumulates gradients across data-parallel micro-steps,
    also ``train.no_sync``: the program before the collectives, for the micro-steps before the
    last. compile and run save through here alike."""
    last = save(store / mode, stages[-1].program, wanted, resolved)
    names = [s.name for s in stages]
    if mode == "train" and "data_parallel" in names and any(
            spec.kind == ir.InputKind.GRAD for spec in stages[-1].program.inputs):
        save(store / "train.no_sync", stages[names.index("data_parallel") - 1].program, wanted, resolved)
    return last


def read_fingerprint(folder: str | Path) -> Optional[dict]:
    path = Path(folder) / "fingerprint.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def load(folder: str | Path) -> ir.Program:
    """The Program saved in ``folder``; a UserError naming the file and what is wrong when it is
    malformed, names an op outside the allowlist or a name that is not an identifier, or does
    not hash to its fingerprint. The hash is checked on the code printed from the checked graph
    before that code is compiled."""
    path = Path(folder) / "program.json"
    try:
        saved = read_fingerprint(folder)
        if saved is None or not isinstance(saved.get("program_sha256"), str):
            raise ValueError(f"{Path(folder) / 'fingerprint.json'} is missing or has no program_sha256")
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f"format {doc.get('format') if isinstance(doc, dict) else None!r}, this mmgraph reads "
                             f"{FORMAT}")
        graph = _graph_from_json(doc["graph"], str(path))
        if not isinstance(doc["fields"], dict):
            raise ValueError("fields is not an object")
        fields = {k: _dec(v, None, f"{path}: {k}") for k, v in doc["fields"].items()}
        code = graph.python_code(root_module="self").src
        if _sha256(code, doc["fields"]) != saved["program_sha256"]:
            raise ValueError("the program does not hash to its fingerprint's program_sha256 (a changed or "
                             "damaged artifact)")
        program = ir.Program(gm=fx.GraphModule(torch.nn.Module(), graph), **fields)
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, IndexError,
            SyntaxError, RecursionError) as err:
        raise UserError(Problem(str(path), None, f"not a usable program artifact: {err}")) from None
    return program


def programs_dir(model_dir: str | Path) -> Path:
    """Where compile and run keep the artifacts: ``MODEL_DIR/programs``."""
    return Path(model_dir) / "programs"


def find(folder: str | Path, name: str, wanted: dict) -> tuple[Optional[Path], str]:
    """``(folder/name, "")`` when a saved program there matches ``wanted``, else ``(None, why)``."""
    where = Path(folder) / name
    saved = read_fingerprint(where)
    if saved is None or not (where / "program.json").is_file():
        return None, f"no saved {name} program in {folder}"
    diffs = differences(saved, wanted)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        return None, "; ".join(diffs[:3]) + more
    return where, ""
