"""Reading and writing weight files tensor by tensor.

Read: ``.safetensors`` (memory-mapped, one tensor at a time) and ``.bin`` (only through
``torch.load(weights_only=True, mmap=True)``: never arbitrary pickle), single files or shards
with a ``*.index.json``. Write: safetensors shards streamed to disk one tensor at a time (the
header is known from shapes and dtypes before any data is read), with an index when there is
more than one shard. Memory therefore stays near the largest tensor, not the model.

Every problem is a UserError naming the file (and key).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mmgraph.core.errors import Problem, UserError

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_DTYPES = {  # safetensors dtype names
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class Entry:
    """One tensor of a checkpoint: where it lives and how to read it."""

    key: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]


def _safetensors_entries(path: Path) -> list[Entry]:
    """Header parsed and checked here (every entry an object with a known dtype, an integer shape
    and two offsets; offsets inside the data, in order, never overlapping; dtype x shape = bytes),
    each tensor read with plain file reads when asked for: no memory map, so pages of tensors
    already converted do not stay in the process's memory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise UserError(Problem(str(path), None, "cannot read safetensors file (header length past the end "
                                    "of the file); truncated or not a safetensors file"))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise UserError(Problem(str(path), None, f"cannot read safetensors file (header: {err}); "
                                    "truncated or not a safetensors file")) from err
    if not isinstance(header, dict):
        raise UserError(Problem(str(path), None, f"not a safetensors file (the header is a "
                                f"{type(header).__name__}, not an object)"))
    start, data_bytes = 8 + n, size - 8 - n
    out, spans = [], []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype, shape, (lo, hi) = _header_entry(path, key, info)
        if hi > data_bytes:
            raise UserError(Problem(str(path), key, f"cannot read safetensors file (data ends at byte {start + hi}, "
                                    f"the file has {size}); truncated"))
        if hi - lo != _numel(shape) * _itemsize(dtype):
            raise UserError(Problem(str(path), key, f"cannot read safetensors file ({hi - lo} bytes for "
                                    f"{_DTYPES[dtype]} {list(shape)}: size disagrees with dtype and shape)"))
        spans.append((lo, hi, key))
        out.append(Entry(key, path, shape, dtype, lambda o=start + lo, m=hi - lo, d=dtype, s=shape: _read(path, o, m, d, s)))
    spans.sort()
    for (_, end, before), (lo, _, key) in zip(spans, spans[1:]):
        if lo < end:
            raise UserError(Problem(str(path), key, f"cannot read safetensors file (its data overlaps {before}'s)"))
    return out


def _header_entry(path: Path, key: str, info) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, or a UserError saying what is malformed."""
    def bad(what: str) -> UserError:
        return UserError(Problem(str(path), key, f"malformed safetensors header entry: {what}"))

    if not isinstance(info, dict):
        raise bad(f"a {type(info).__name__}, not an object")
    names = {v: k for k, v in _DTYPES.items()}
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str):
        raise bad(f"dtype {str(dtype_name)[:40]} is not a name")
    if dtype_name not in names:
        raise UserError(Problem(str(path), key, f"unsupported dtype {dtype_name[:40]}"))
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"shape {str(shape)[:60]} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise bad(f"data_offsets {str(offsets)[:60]} is not two integers")
    lo, hi = offsets
    if lo < 0 or hi < lo:
        raise bad(f"data_offsets {offsets} do not describe a range of the data (begin >= 0, end >= begin)")
    return names[dtype_name], tuple(shape), (lo, hi)


def _read(path: Path, offset: int, nbytes: int, dtype: torch.dtype, shape) -> torch.Tensor:
    buf = bytearray(nbytes)
    with open(path, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != nbytes:
            raise UserError(Problem(str(path), None, "cannot read safetensors file (short read); truncated"))
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _bin_entries(path: Path) -> list[Entry]:
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(Problem(str(path), None, f"cannot read with torch.load(weights_only=True) "
                                f"({_first_line(err)}); truncated, or holds more than tensors")) from err
    if not isinstance(state, dict):
        raise UserError(Problem(str(path), None, f"holds a {type(state).__name__}, not a dict of tensors"))
    out = []
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise UserError(Problem(str(path), k, f"is a {type(v).__name__}, not a tensor"))
        out.append(Entry(k, path, tuple(v.shape), v.dtype, lambda v=v: v))
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def file_entries(path: Path) -> list[Entry]:
    if not path.is_file():
        raise UserError(Problem(str(path), None, "does not exist"))
    if path.suffix == ".safetensors":
        return _safetensors_entries(path)
    if path.suffix in (".bin", ".pt", ".pth"):
        return _bin_entries(path)
    raise UserError(Problem(str(path), None, "unknown weight file type (expected .safetensors or .bin)"))


def find_weights(folder: Path, required: bool = True) -> list[Path]:
    """The weight files of a Hugging Face folder: an index's shards, else the single file."""
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as err:
                raise UserError(Problem(str(index), "weight_map", f"not a valid index ({err})")) from err
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise UserError(Problem(str(index), "weight_map", "not a valid index (an object of tensor name to "
                                        "file name expected)"))
            files = sorted(set(weight_map.values()))
            for f in files:
                key = next(k for k, v in weight_map.items() if v == f)
                path = inside(folder, f, str(index), f"weight_map.{key}")
                if not path.is_file():
                    raise UserError(Problem(str(folder / f), key, f"listed in {index.name} but missing"))
            return [folder / f for f in files]
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    if required:
        raise UserError(Problem(str(folder), None, f"no weights ({' or '.join(WEIGHT_NAMES)}, or a sharded index)"))
    return []


def inside(folder: Path, name: str, source: str, key: str) -> Path:
    """``folder / name`` when it stays in ``folder`` (no absolute path, no ``..`` out, no link
    that points out); else a UserError naming ``source`` and ``key``."""
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if Path(name).is_absolute() or "\x00" in name or (path != base and base not in path.parents):
        raise UserError(Problem(source, key, f"{name!r} leaves the folder {folder}"))
    return path


def read_entries(files: list[Path]) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    for f in files:
        for e in file_entries(f):
            if e.key in out:
                raise UserError(Problem(str(f), e.key, f"also in {out[e.key].file}"))
            out[e.key] = e
    return out


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``1024`` (bytes)."""
    units = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[:-len(u)]) * m)
    return int(t)


class ShardWriter:
    """Writes (key, shape, dtype, loader) items as safetensors shards of at most ``shard_bytes``
    (a tensor larger than that gets a shard of its own), streaming one tensor at a time."""

    def __init__(self, folder: Path, shard_bytes: int, stem: str = "model"):
        self.folder, self.shard_bytes, self.stem = folder, shard_bytes, stem

    def write(self, items: list[tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
              metadata: Optional[dict[str, str]] = None) -> list[Path]:
        groups: list[list] = [[]]
        size = 0
        for item in items:
            n = _numel(item[1]) * _itemsize(item[2])
            if groups[-1] and size + n > self.shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += n
        names = ([f"{self.stem}.safetensors"] if len(groups) == 1 else
                 [f"{self.stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        for name, group in zip(names, groups):
            _write_safetensors(self.folder / name, group, metadata)
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(_numel(i[1]) * _itemsize(i[2]) for i in items)},
                     "weight_map": {i[0]: name for name, g in zip(names, groups) for i in g}}
            (self.folder / f"{self.stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / n for n in names]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _write_safetensors(path: Path, items, metadata: Optional[dict[str, str]]) -> None:
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for key, shape, dtype, _ in items:
        n = _numel(shape) * _itemsize(dtype)
        header[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)                        # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key, shape, dtype, load in items:
            t = load()
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise UserError(Problem(str(path), key, f"tensor is {tuple(t.shape)} {t.dtype}, "
                                        f"expected {tuple(shape)} {dtype}"))
            f.write(_tensor_bytes(t))
            del t


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return memoryview(t.view(torch.int16).numpy()).cast("B")
    return memoryview(t.numpy()).cast("B")

