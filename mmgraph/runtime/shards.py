"""The multimodal H5 shard format, read and checked (mmgraph's and the Model Zoo's).

One layout, three spellings, all read the same way:

- the Model Zoo's preprocessor (2.3 and 2.10, ``MultiModalFinetuningTokenGenerator``):
  ``output_chunk_*.h5``, ``data_params.json`` beside them, empty image slots as the string
  ``"None"``, each dataset gzip-compressed in chunks of one sample; it also writes ``has_img``,
  which its loader never reads;
- mmgraph's ``preprocess`` from this release: the same, ``data-NNNNN.h5`` names, ``"None"``;
- mmgraph's earlier shards: ``""`` for an empty slot, ``has_img`` present, any string dtype.

Datasets: ``data`` N x 5 x S integers (input_ids, loss_mask, labels, key_padding_mask,
token_modality_idx; packed shards, ``preprocess --pack``: N x 7 x S, + segment_ids, position_ids), ``img_path`` N x max_num_img strings (relative to the image folder),
``img_data_loc`` N x max_num_img x num_patches integers (padding value S); optional
``has_img`` N x 1 and attribute ``n_examples``. Image paths never leave the image folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mmgraph.core.h5schema import DATA, row_fields
from mmgraph.core.errors import Problem

EMPTY_SLOTS = ("", "None")          # mmgraph before this release, the Model Zoo
DATA_PARAMS = "data_params.json"


@dataclass(frozen=True)
class Expect:
    """What the params say a shard holds."""

    max_seq_length: int
    max_num_img: int
    num_patches: int
    vocab_size: Optional[int] = None
    image_start_idx: int = 1        # the older ``llava`` model's shards: where every image starts
    packed: bool = False            # ``packed: true``: rows of 7 (+ segment_ids, position_ids)


def _int_dataset(f, key: str, tail: tuple[int, ...], path: str, problems: list[Problem]) -> Optional[int]:
    if key not in f or not hasattr(f[key], "shape"):
        problems.append(Problem(path, key, "dataset missing (not an mmgraph / Model Zoo multimodal shard)"))
        return None
    ds = f[key]
    if ds.ndim != 1 + len(tail) or tuple(ds.shape[1:]) != tail:
        want = " x ".join(map(str, tail))
        problems.append(Problem(path, key, f"shape {tuple(ds.shape)} does not match the params (expected N x {want})"))
        return None
    if ds.dtype.kind not in "iub":
        problems.append(Problem(path, key, f"dtype {ds.dtype} is not an integer type"))
        return None
    return ds.shape[0]


def inspect_shard(path: Path, want: Expect) -> tuple[int, list[Problem]]:
    """(samples, problems) of one shard, from its metadata (nothing big is read)."""
    import h5py

    name, problems = str(path), []
    S, I, P = want.max_seq_length, want.max_num_img, want.num_patches
    try:
        with h5py.File(path, "r") as f:
            if is_llava_shard(f):
                rows = [_int_dataset(f, "data", (4, S), name, problems)]
                if want.image_start_idx + P > S:
                    problems.append(Problem(name, None, f"image_start_idx {want.image_start_idx} + {P} image tokens "
                                            f"do not fit in {S}"))
            else:
                _packing_problem(f, want, name, problems)
                rows = [_int_dataset(f, DATA, (len(row_fields(want.packed)), S), name, problems),
                        _int_dataset(f, "img_data_loc", (I, P), name, problems)]
            if "img_path" not in f or not hasattr(f["img_path"], "shape"):
                problems.append(Problem(name, "img_path", "dataset missing (not an mmgraph / Model Zoo multimodal shard)"))
            elif f["img_path"].ndim != 2 or f["img_path"].shape[1] != I:
                problems.append(Problem(name, "img_path", f"shape {tuple(f['img_path'].shape)} does not match the "
                                        f"params (expected N x {I})"))
            elif f["img_path"].dtype.kind not in "SOU":
                problems.append(Problem(name, "img_path", f"dtype {f['img_path'].dtype} is not a string type"))
            else:
                rows.append(f["img_path"].shape[0])
            if "has_img" in f and hasattr(f["has_img"], "shape"):
                rows.append(f["has_img"].shape[0])
            counts = {r for r in rows if r is not None}
            if len(counts) > 1:
                problems.append(Problem(name, None, f"datasets disagree on the number of samples ({sorted(counts)})"))
            n = rows[0] if rows[0] is not None else 0
            if "n_examples" in f.attrs and not problems and int(f.attrs["n_examples"]) != n:
                problems.append(Problem(name, "n_examples", f"{int(f.attrs['n_examples'])} but data has {n} rows"))
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as err:
        return 0, [Problem(name, None, f"not a readable HDF5 file ({_first_line(err)})")]
    return (0 if problems else n), problems


def _packing_problem(f, want: Expect, name: str, problems: list[Problem]) -> None:
    """Packed shards (``preprocess --pack``: ``data`` N x 7 x S) need ``packed: true`` and the reverse."""
    data = f.get("data")
    rows = data.shape[1] if data is not None and hasattr(data, "shape") and data.ndim == 3 else None
    if rows == 7 and not want.packed:
        problems.append(Problem(name, "data", "packed rows (7: + segment_ids, position_ids; preprocess --pack): "
                                "set packed: true in the params' input section"))
    elif rows == 5 and want.packed:
        problems.append(Problem(name, "data", "unpacked rows (5), but the params say packed: true "
                                "(run mmgraph preprocess --pack, or drop packed)"))


def _first_line(err: BaseException) -> str:
    text = str(err).splitlines()[0] if str(err) else ""
    return f"{err.__class__.__name__}: {text}" if text else err.__class__.__name__


def is_llava_shard(f) -> bool:
    """The older ``llava`` model's shards (``LlavaHDF5MapDataProcessor``, written by 2.3's
    nlp/hdf5_preprocessing ``LlavaPhaseOne/TwoPreprocessor``): ``data`` N x 4 x S (no
    token_modality_idx), ``img_path`` N x 1, no ``img_data_loc``: each image's tokens stand at the
    model's ``image_start_idx``."""
    data = f.get("data")
    return ("img_data_loc" not in f and data is not None and hasattr(data, "shape") and data.ndim == 3
            and data.shape[1] == 4)


def decode_paths(raw) -> list[str]:
    out = []
    for p in raw:
        if isinstance(p, bytes):
            p = p.decode("utf-8")
        out.append(str(p))
    return out


def read_sample(f, path: Path, row: int, want: Expect) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(data 5 x S int64, image names with empty slots as "", img_data_loc I x P int64), checked.

    Raises ``ValueError`` with what is wrong; the caller names the shard and sample."""
    S = want.max_seq_length
    try:
        data = np.asarray(f["data"][row], dtype=np.int64)
        names = decode_paths(f["img_path"][row])
        if is_llava_shard(f):
            data, loc = _llava_rows(data, names, want)
        else:
            loc = np.asarray(f["img_data_loc"][row], dtype=np.int64)
    except (OSError, KeyError, RuntimeError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot be read ({_first_line(err)})") from None
    if want.vocab_size is not None:
        ids = data[[0, 2]]
        bad = ids[(ids < 0) | (ids >= want.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (vocab_size {want.vocab_size})")
    if ((loc < 0) | (loc > S)).any():
        raise ValueError(f"img_data_loc {int(loc[(loc < 0) | (loc > S)][0])} is outside 0..{S}")
    if want.packed and data.shape[0] == len(row_fields(True)):
        _check_packed(data)
    names = ["" if n in EMPTY_SLOTS else n for n in names]
    for j, n in enumerate(names):
        if n and (loc[j] >= S).any():
            raise ValueError(f"image slot {j} ({n}) has no position in the sequence (img_data_loc {S} = padding)")
        if not n and (loc[j] < S).any():
            raise ValueError(f"image slot {j} is empty but img_data_loc places it in the sequence (padding is {S})")
    return data, names, loc


def _check_packed(data: np.ndarray) -> None:
    """A packed row's own fields as ``preprocess --pack`` writes them (core/packing.py): samples
    first, numbered 1, 2, ... in ``segment_ids`` and counted 0, 1, ... in ``position_ids``, then
    padding (segment 0, position 0, ``key_padding_mask`` 1). Anything else would let samples
    attend to each other or rotate at wrong positions; raises ``ValueError`` naming the position."""
    fields = row_fields(True)
    seg, pos = data[fields.index("segment_ids")], data[fields.index("position_ids")]
    padding = data[fields.index("key_padding_mask")] != 0
    real = seg != 0
    n = int(real.sum())
    if (seg < 0).any():
        raise ValueError(f"segment_ids {int(seg[seg < 0][0])} is negative (samples are 1, 2, ...; padding 0)")
    if not real[:n].all():
        at = int(np.flatnonzero(~real[:n])[0])
        raise ValueError(f"segment_ids: padding (0) at position {at} before the last sample's tokens "
                         f"(samples come first, then padding)")
    ids = seg[:n]
    steps = np.diff(ids, prepend=0)
    if n and ((steps != 0) & (steps != 1)).any():
        at = int(np.flatnonzero((steps != 0) & (steps != 1))[0])
        raise ValueError(f"segment_ids {int(ids[at])} at position {at}: samples are numbered 1, 2, ... in "
                         f"order, each in one run")
    starts = np.flatnonzero(steps)                         # where each sample begins
    within = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    if not np.array_equal(pos[:n], within):
        at = int(np.flatnonzero(pos[:n] != within)[0])
        raise ValueError(f"position_ids {int(pos[at])} at position {at}: expected {int(within[at])} (0, 1, ... "
                         f"within each sample)")
    if (pos[n:] != 0).any():
        at = n + int(np.flatnonzero(pos[n:] != 0)[0])
        raise ValueError(f"position_ids {int(pos[at])} at padding position {at} (expected 0)")
    if (padding != ~real).any():
        at = int(np.flatnonzero(padding != ~real)[0])
        raise ValueError(f"key_padding_mask {int(padding[at])} at position {at} disagrees with segment_ids "
                         f"{int(seg[at])}")


def _llava_rows(data: np.ndarray, names: list[str], want: Expect) -> tuple[np.ndarray, np.ndarray]:
    """4 rows + an image at ``image_start_idx`` -> the 5 rows and ``img_data_loc`` of the layout."""
    S, P, start = want.max_seq_length, want.num_patches, want.image_start_idx
    rows = np.zeros((5, S), dtype=np.int64)
    rows[:4] = data
    loc = np.full((want.max_num_img, P), S, dtype=np.int64)
    if names and names[0] not in EMPTY_SLOTS:
        loc[0] = np.arange(start, start + P)
        rows[4, start:start + P] = 1
    return rows, loc


def read_data_params(folder: Path) -> Optional[dict]:
    """The Model Zoo's ``data_params.json`` beside the shards (mmgraph writes one too), if any."""
    path = folder / DATA_PARAMS
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def data_params_problems(folder: Path, want: Expect) -> list[Problem]:
    """Where ``data_params.json`` disagrees with the params' layout."""
    dp = read_data_params(folder)
    if dp is None:
        return []
    name = str(folder / DATA_PARAMS)
    processing = dp.get("processing") if isinstance(dp.get("processing"), dict) else {}
    dataset = dp.get("dataset") if isinstance(dp.get("dataset"), dict) else {}
    problems = []
    for where, value, expected in (("processing.max_seq_length", processing.get("max_seq_length"), want.max_seq_length),
                                   ("dataset.num_patches", dataset.get("num_patches"), want.num_patches),
                                   ("dataset.max_num_img", dataset.get("max_num_img"), want.max_num_img)):
        if isinstance(value, int) and value != expected:
            problems.append(Problem(name, where, f"{value}, but the params give {expected}"))
    return problems
