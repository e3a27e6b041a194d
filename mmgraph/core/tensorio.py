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
    """Header parsed here, each tensor read with plain file reads when asked for: no memory
    map, so pages of tensors already converted do not stay in the process's memory."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if n is None or n > size - 8:
            raise UserError(Problem(str(path), None, "cannot read safetensors file (header length past the end "
                                    "of the file); truncated or not a safetensors file"))
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(Problem(str(path), None, f"cannot read safetensors file (header: {err}); "
                                    "truncated or not a safetensors file")) from err
    names = {v: k for k, v in _DTYPES.items()}
    start = 8 + n
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = names.get(info.get("dtype"))
        if dtype is None:
            raise UserError(Problem(str(path), key, f"unsupported dtype {info.get('dtype')}"))
        shape = tuple(info["shape"])
        lo, hi = info["data_offsets"]
        if start + hi > size:
            raise UserError(Problem(str(path), key, f"cannot read safetensors file (data ends at byte {start + hi}, "
                                    f"the file has {size}); truncated"))
        if hi - lo != _numel(shape) * _itemsize(dtype):
            raise UserError(Problem(str(path), key, "cannot read safetensors file (size disagrees with shape)"))
        out.append(Entry(key, path, shape, dtype, lambda o=start + lo, m=hi - lo, d=dtype, s=shape: _read(path, o, m, d, s)))
    return out


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
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(Problem(str(index), "weight_map", f"not a valid index ({err})")) from err
            files = sorted(set(weight_map.values()))
            for f in files:
                if not (folder / f).is_file():
                    key = next(k for k, v in weight_map.items() if v == f)
                    raise UserError(Problem(str(folder / f), key, f"listed in {index.name} but missing"))
            return [folder / f for f in files]
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / name]
    if required:
        raise UserError(Problem(str(folder), None, f"no weights ({' or '.join(WEIGHT_NAMES)}, or a sharded index)"))
    return []


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

