"""The Cerebras Model Zoo's checkpoint file (``.mdl``: ``cstorch.save``, format 0.5), read and
written with h5py alone: no cerebras package is needed.

The file (cerebras-pytorch 2.x, ``cerebras/appliance/storage/h5_storage.py``):
- one HDF5 file, no groups: a state dict flattened with torch pytree, one leaf per dotted key
  (``model.model.text_model.lm_head.weight``, ``optimizer.state.3.exp_avg``, ``global_step``);
- root attributes ``__version__`` (0.5), ``__cstorch_version__``, ``__SUCCESS__`` (written
  last: a file without it is partial) and ``__spec__`` (JSON: the tree's shape, with
  ``torch.utils._pytree.treespec_dumps`` protocol 1 as its second item);
- per leaf an attribute ``<key>.__metadata__`` (JSON) whose ``__TYPE__`` says what it is: a
  tensor (``TorchTensorSerializer``: a dataset named ``<key>``), a scalar, a string, None, or a
  link to another leaf (``LinkedObject``: ``cstorch.save`` writes an object seen twice once;
  small ints are shared by Python, so ``global_step`` can be a link). Pickled objects
  (``ObjectSerializer``) are refused: nothing from a file is executed.
- tensors of rank >= 1 are LZ4-compressed by the Model Zoo (HDF5 filter 32004, through
  hdf5plugin). Where HDF5 has no LZ4 plugin the chunks are read raw and decoded with the
  ``lz4`` package; mmgraph writes its datasets uncompressed (any HDF5 reader takes them).
- bfloat16 is stored as its int16 bit pattern.

Errors name the file and the key: ``FILE: key: what``.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.tensorio import Entry

FORMAT_VERSION = 0.5
LZ4_FILTER = 32004
_DTYPES = {  # torch dtype name -> (torch dtype, numpy dtype as stored, rtfx code)
    "float32": (torch.float32, np.float32, 11), "float16": (torch.float16, np.float16, 10),
    "float64": (torch.float64, np.float64, 12), "bfloat16": (torch.bfloat16, np.int16, 15),
    "int64": (torch.int64, np.int64, 5), "int32": (torch.int32, np.int32, 4), "int16": (torch.int16, np.int16, 3),
    "uint8": (torch.uint8, np.uint8, 6), "int8": (torch.int8, np.int8, 2), "bool": (torch.bool, np.bool_, 1),
}
_NAME_OF = {v[0]: k for k, v in _DTYPES.items()}
_VALUE_TYPES = ("ScalarSerializer", "StringSerializer", "NoneSerializer")
_TENSOR_TYPES = ("TorchTensorSerializer", "NumpyArraySerializer")
_MAX_SPEC_DEPTH = 64


def is_mdl(path: Union[str, Path]) -> bool:
    """An HDF5 file (its signature), whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


@dataclass
class Link:
    """A leaf that is another leaf's value (``LinkedObject``)."""

    key: str


@dataclass
class MdlFile:
    """An open .mdl: every leaf by dotted key (tensors as lazily read ``Entry``s, links
    resolved), the tree they form, and the file's versions."""

    path: Path
    version: float
    cstorch_version: Optional[str]
    leaves: "OrderedDict[str, Any]"        # key -> Entry | int | float | bool | str | None
    spec: dict                               # the pytree node of the whole state dict

    def tree(self) -> Any:
        """The whole state dict: nested dicts / lists, ``Entry`` for each tensor."""
        values = iter(self.leaves.values())
        return _unflatten(self.spec, values, str(self.path))

    def subtree(self, top: str) -> Any:
        """One top-level key's value (``model``, ``optimizer``, ``global_step``, ...), or None."""
        tree = self.tree()
        return tree.get(top) if isinstance(tree, dict) else None

    @property
    def metadata(self) -> Optional[dict]:
        """The last ``__metadata__`` record (``version``, ``model_name``, ``params``), if any."""
        meta = self.subtree("__metadata__")
        if isinstance(meta, list) and meta and isinstance(meta[-1], dict):
            return meta[-1]
        return None


# ---------------------------------------------------------------------------------------------
# read
# ---------------------------------------------------------------------------------------------


def read(path: Union[str, Path]) -> MdlFile:
    """Open and check a .mdl; tensors are read when their ``Entry.load`` is called."""
    import h5py

    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise UserError(Problem(where, None, "does not exist"))
    if not is_mdl(path):
        raise UserError(Problem(where, None, "not a Cerebras .mdl checkpoint (not an HDF5 file)"))
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(Problem(where, None, f"cannot open the HDF5 file: {err}")) from None
    with f:
        attrs = f.attrs
        if "__version__" not in attrs:
            raise UserError(Problem(where, "__version__", "missing: not a cstorch.save checkpoint"))
        version = _float_attr(attrs["__version__"], where, "__version__")
        if version < FORMAT_VERSION:
            raise UserError(Problem(where, "__version__", f"{version}: a checkpoint format before 0.5 (cerebras-"
                                    "pytorch 1.x); convert it with a Model Zoo release first"))
        if not bool(np.asarray(attrs.get("__SUCCESS__", False)).all()):
            raise UserError(Problem(where, "__SUCCESS__", "missing: the file was not written completely"))
        spec = _spec(attrs.get("__spec__"), where)
        keys = list(_spec_paths(spec, (), where))
        leaves: OrderedDict[str, Any] = OrderedDict()
        for key in keys:
            leaves[key] = _leaf(f, key, where)
        cs_version = attrs.get("__cstorch_version__")
        cs_version = cs_version.decode() if isinstance(cs_version, bytes) else cs_version
    _resolve_links(leaves, where)
    return MdlFile(path, version, cs_version if isinstance(cs_version, str) else None, leaves, spec)


def _float_attr(value, where: str, key: str) -> float:
    try:
        out = float(np.asarray(value).reshape(()))
    except (TypeError, ValueError):
        raise UserError(Problem(where, key, f"{value!r} is not a number")) from None
    if not math.isfinite(out):
        raise UserError(Problem(where, key, f"{out} is not a number"))
    return out


def _json_attr(value, where: str, key: str) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise UserError(Problem(where, key, "not a JSON string attribute"))
    try:
        return json.loads(value)
    except (json.JSONDecodeError, RecursionError) as err:
        raise UserError(Problem(where, key, f"not valid JSON ({err})")) from None


def _spec(value, where: str) -> dict:
    """The pytree node of the whole state dict (``__spec__``'s treespec, protocol 1)."""
    if value is None:
        raise UserError(Problem(where, "__spec__", "missing"))
    outer = _json_attr(value, where, "__spec__")
    if not isinstance(outer, list) or len(outer) != 2:
        raise UserError(Problem(where, "__spec__", "expected [tree, treespec]"))
    inner = _json_attr(outer[1], where, "__spec__")
    if not isinstance(inner, list) or len(inner) != 2 or inner[0] != 1 or not isinstance(inner[1], dict):
        raise UserError(Problem(where, "__spec__", "unknown treespec (expected protocol 1)"))
    return inner[1]


def _children_keys(node: dict, where: str, path: tuple) -> list:
    kind = node.get("type")
    children = node.get("children_spec")
    here = ".".join(path) or "__spec__"
    if not isinstance(children, list):
        raise UserError(Problem(where, here, "malformed treespec node (no children_spec list)"))
    if kind in ("builtins.dict", "collections.OrderedDict", "collections.defaultdict"):
        context = node.get("context")
        keys = json.loads(context) if isinstance(context, str) else context
        if kind == "collections.defaultdict" and isinstance(keys, dict):
            keys = keys.get("dict_keys")
        if not isinstance(keys, list) or len(keys) != len(children) \
                or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in keys):
            raise UserError(Problem(where, here, "malformed treespec node (keys do not match its children)"))
        return keys
    if kind in ("builtins.list", "builtins.tuple", "torch.Size"):
        return list(range(len(children)))
    raise UserError(Problem(where, here, f"unsupported pytree node type {str(kind)[:60]!r}"))


def _spec_paths(node: Any, path: tuple, where: str) -> Iterator[str]:
    if len(path) > _MAX_SPEC_DEPTH or not isinstance(node, dict):
        raise UserError(Problem(where, ".".join(path) or "__spec__", "malformed treespec"))
    if node.get("type") is None:
        yield ".".join(path)
        return
    for k, child in zip(_children_keys(node, where, path), node["children_spec"]):
        yield from _spec_paths(child, path + (str(k),), where)


def _unflatten(node: dict, values: Iterator[Any], where: str, path: tuple = ()) -> Any:
    if node.get("type") is None:
        return next(values)
    keys = _children_keys(node, where, path)
    items = [(k, _unflatten(c, values, where, path + (str(k),))) for k, c in zip(keys, node["children_spec"])]
    kind = node["type"]
    if kind == "collections.OrderedDict":
        return OrderedDict(items)
    if kind in ("builtins.dict", "collections.defaultdict"):
        return dict(items)
    return tuple(v for _, v in items) if kind == "builtins.tuple" else [v for _, v in items]


def _leaf(f, key: str, where: str) -> Any:
    name = f"{key}.__metadata__"
    if name not in f.attrs:
        raise UserError(Problem(where, key, "no __metadata__ attribute for this leaf"))
    record = _json_attr(f.attrs[name], where, key)
    meta = record.get(name) if isinstance(record, dict) else None
    if not isinstance(meta, dict):
        raise UserError(Problem(where, key, "malformed leaf metadata"))
    kind = meta.get("__TYPE__")
    if kind == "LinkedObject":
        if not isinstance(meta.get("key"), str):
            raise UserError(Problem(where, key, "a link without a key"))
        return Link(meta["key"])
    if kind == "ScalarSerializer":
        value = meta.get("scalar_value")
        if not isinstance(value, (bool, int, float)):
            raise UserError(Problem(where, key, f"scalar_value {str(value)[:40]} is not a number"))
        return value
    if kind == "StringSerializer":
        value = meta.get("string_value")
        if not isinstance(value, str):
            raise UserError(Problem(where, key, "string_value is not a string"))
        return value
    if kind == "NoneSerializer":
        return None
    if kind in _TENSOR_TYPES:
        return _tensor_entry(f, key, meta, where)
    if kind == "ObjectSerializer":
        raise UserError(Problem(where, key, "a pickled Python object: refused (mmgraph never unpickles a file)"))
    raise UserError(Problem(where, key, f"unknown serializer {str(kind)[:60]!r}"))


def _tensor_entry(f, key: str, meta: dict, where: str) -> Entry:
    if key not in f:
        raise UserError(Problem(where, key, "tensor metadata without a dataset"))
    dset = f[key]
    dtypes = meta.get("dtypes") or ["torch.float32"]
    name = str(dtypes[0]).removeprefix("torch.") if meta.get("__TORCH__", True) else str(dset.dtype)
    if name not in _DTYPES:
        raise UserError(Problem(where, key, f"unsupported dtype {name[:40]}"))
    dtype, stored, _ = _DTYPES[name]
    shape = tuple(int(d) for d in dset.shape)
    if np.dtype(dset.dtype) != np.dtype(stored):
        raise UserError(Problem(where, key, f"dataset of {dset.dtype} for a {name} tensor"))
    shapes = meta.get("shapes")
    if isinstance(shapes, list) and shapes and isinstance(shapes[0], list) and tuple(shapes[0]) != shape:
        raise UserError(Problem(where, key, f"dataset shape {list(shape)} disagrees with its metadata {shapes[0]}"))
    path = Path(f.filename)
    return Entry(key, path, shape, dtype, lambda: _load(path, key, dtype))


def _load(path: Path, key: str, dtype: torch.dtype) -> torch.Tensor:
    import h5py

    with h5py.File(path, "r") as f:
        array = read_dataset(f[key], str(path))
    t = torch.from_numpy(np.array(array, order="C"))         # keeps 0-d tensors 0-d
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def read_dataset(dset, where: str) -> np.ndarray:
    """The array; LZ4-filtered chunks are decoded here when HDF5 has no LZ4 plugin."""
    import h5py

    plist = dset.id.get_create_plist()
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if not filters or all(h5py.h5z.filter_avail(x) for x in filters):
        try:
            return np.asarray(dset[()])
        except OSError as err:
            raise UserError(Problem(where, dset.name.lstrip("/"), f"cannot read the dataset: {err}")) from None
    if filters != [LZ4_FILTER]:
        raise UserError(Problem(where, dset.name.lstrip("/"), f"HDF5 filters {filters}: only LZ4 (32004) is decoded "
                                "without a plugin"))
    out = np.empty(dset.shape, dtype=dset.dtype)
    chunk = tuple(dset.chunks)
    chunk_bytes = int(np.prod(chunk)) * dset.dtype.itemsize
    for index in range(dset.id.get_num_chunks()):
        info = dset.id.get_chunk_info(index)
        mask, raw = dset.id.read_direct_chunk(info.chunk_offset)
        if mask & 1:                                # the filter was skipped for this chunk
            data = raw
        else:
            data = lz4_chunk(raw, chunk_bytes, where, dset.name.lstrip("/"))
        block = np.frombuffer(data, dtype=dset.dtype).reshape(chunk)
        sl = tuple(slice(o, min(o + c, s)) for o, c, s in zip(info.chunk_offset, chunk, dset.shape))
        out[sl] = block[tuple(slice(0, x.stop - x.start) for x in sl)]
    return out


def lz4_chunk(raw: bytes, expected: int, where: str, key: str) -> bytes:
    """One chunk of the HDF5 LZ4 filter: ``>Q`` original size, ``>I`` block size, then per
    block ``>I`` compressed size and an LZ4 block (stored raw when the sizes are equal)."""
    import lz4.block

    def bad(what: str) -> UserError:
        return UserError(Problem(where, key, f"corrupt LZ4 chunk ({what})"))

    if len(raw) < 12:
        raise bad("shorter than its header")
    total, block = struct.unpack(">QI", raw[:12])
    if total != expected:
        raise bad(f"{total} bytes where the chunk holds {expected}")
    block = min(block, total) if block else total
    pos, out = 12, bytearray()
    while len(out) < total:
        size = min(block, total - len(out))
        if pos + 4 > len(raw):
            raise bad("truncated")
        (csize,) = struct.unpack(">I", raw[pos:pos + 4])
        pos += 4
        data = raw[pos:pos + csize]
        pos += csize
        if len(data) != csize:
            raise bad("truncated")
        if csize == size:
            out += data
            continue
        try:
            out += lz4.block.decompress(data, uncompressed_size=size)
        except lz4.block.LZ4BlockError as err:
            raise bad(str(err)) from None
    if len(out) != total:
        raise bad("decoded size differs")
    return bytes(out)


def _resolve_links(leaves: "OrderedDict[str, Any]", where: str) -> None:
    for key in list(leaves):
        value, seen = leaves[key], {key}
        while isinstance(value, Link):
            if value.key in seen or value.key not in leaves:
                why = "a cycle of links" if value.key in seen else f"a link to {value.key[:80]!r}, which is not a leaf"
                raise UserError(Problem(where, key, why))
            seen.add(value.key)
            value = leaves[value.key]
        leaves[key] = value


# ---------------------------------------------------------------------------------------------
# write
# ---------------------------------------------------------------------------------------------

Tensorish = Union[torch.Tensor, Entry]


def _treespec(obj: Any) -> dict:
    if isinstance(obj, dict):
        return {"type": "collections.OrderedDict" if isinstance(obj, OrderedDict) else "builtins.dict",
                "context": json.dumps(list(obj.keys())), "children_spec": [_treespec(v) for v in obj.values()]}
    if isinstance(obj, (list, tuple)):
        return {"type": "builtins.tuple" if isinstance(obj, tuple) else "builtins.list", "context": "null",
                "children_spec": [_treespec(v) for v in obj]}
    return {"type": None, "context": None, "children_spec": []}


def _stars(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _stars(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_stars(v) for v in obj]
    return "*"


def flatten(obj: Any, prefix: tuple = ()) -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) in pytree order, named as cstorch names them."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from flatten(v, prefix + (str(k),))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from flatten(v, prefix + (str(i),))
    else:
        yield ".".join(prefix), obj


def _leaf_meta(value: Any, key: str) -> tuple[dict, Optional[Callable[[], np.ndarray]], Optional[tuple]]:
    if value is None:
        return {"__TYPE__": "NoneSerializer", "__NONE__": True}, None, None
    if isinstance(value, (bool, int, float)):
        return {"scalar_value": value, "__TYPE__": "ScalarSerializer", "__NONE__": True}, None, None
    if isinstance(value, str):
        return {"string_value": value, "__TYPE__": "StringSerializer", "__NONE__": True}, None, None
    if isinstance(value, (torch.Tensor, Entry)):
        dtype = value.dtype
        if dtype not in _NAME_OF:
            raise UserError(Problem(None, key, f"dtype {dtype} cannot be written to .mdl"))
        name = _NAME_OF[dtype]
        shape = tuple(value.shape)
        meta = {"__TORCH__": True, "shapes": [list(shape)], "dtypes": [f"torch.{name}"],
                "rtfx_dtypes": [_DTYPES[name][2]], "__TYPE__": "TorchTensorSerializer", "__NUMPY__": True,
                "compressed": False}

        def array() -> np.ndarray:
            t = value.load() if isinstance(value, Entry) else value
            t = t.detach().contiguous().cpu()
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise UserError(Problem(None, key, f"read as {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}"))
            return (t.view(torch.int16) if dtype == torch.bfloat16 else t).numpy()
        return meta, array, shape
    raise UserError(Problem(None, key, f"a {type(value).__name__} cannot be written to .mdl"))


def write(path: Union[str, Path], state: dict, cstorch_version: str) -> Path:
    """``state`` (nested dicts / lists / tuples of tensors, ``Entry``s, numbers, strings, None)
    as ``cstorch.save`` would write it, tensors uncompressed. Written to a temporary file in the
    same folder, flushed, then renamed into place: a failure leaves nothing behind."""
    import h5py

    path = Path(path)
    spec = json.dumps([_stars(state), json.dumps([1, _treespec(state)])], indent=4)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["__spec__"] = spec
            f.attrs["__version__"] = FORMAT_VERSION
            f.attrs["__cstorch_version__"] = cstorch_version
            for key, value in flatten(state):
                meta, array, shape = _leaf_meta(value, key)
                if array is not None:
                    dset = f.create_dataset(key, data=array())
                    dset.attrs["__NUMPY__"] = True
                    dset.attrs["__TORCH__"] = True
                    dset.attrs["__TYPE__"] = meta["__TYPE__"]
                    dset.attrs["compressed"] = False
                    dset.attrs["dtypes"] = np.array(meta["dtypes"], dtype=h5py.string_dtype())
                    dset.attrs["rtfx_dtypes"] = np.array(meta["rtfx_dtypes"], dtype=np.int64)
                    dset.attrs["shapes"] = np.array([list(shape)], dtype=np.int64)
                leaf_spec = json.dumps([1, {"type": "builtins.dict", "context": json.dumps([key]),
                                            "children_spec": [_treespec(None)]}])
                f.attrs[f"{key}.__metadata__"] = json.dumps(
                    {"__spec__": [{key: "*"}, leaf_spec], "__objects__": [key], f"{key}.__metadata__": meta}, indent=4)
            f.attrs["__SUCCESS__"] = True
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(Problem(str(path), None, f"cannot write: {err.strerror or err}")) from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
