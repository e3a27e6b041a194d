"""Sequence packing for ``mmgraph preprocess --pack``: several samples per row.

Each encoded sample (one row of ``max_seq_length``, ``n`` real tokens, its images) is placed
into packed rows by first-fit decreasing within a window of samples: the window is sorted by
length (longest first; ties broken by a seeded permutation), each sample goes into the first
row where its tokens and its images still fit (``max_num_img`` is the row's image budget), and
the window's rows are then shuffled with the same seed, so a row's place in the shards says
nothing about its length. Deterministic for a given input order, window and seed.

A packed row holds the five rows of an unpacked one (input_ids, loss_mask, labels,
key_padding_mask, token_modality_idx), each sample's real tokens copied in order, and two more:
``segment_ids`` (1, 2, ... per sample, 0 at padding) and ``position_ids`` (0.. within each
sample, 0 at padding). ``img_data_loc`` holds every image of the row, shifted to where its
sample starts. A sample's last label is never supervised, so no label crosses into the next
sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PACKED_ROWS = ("segment_ids", "position_ids")
DEFAULT_WINDOW = 1000


@dataclass
class PackedRow:
    rows: np.ndarray            # (7, S) int32
    img_paths: list[str]
    img_loc: np.ndarray         # (max_num_img, num_patches) int32
    samples: list[int] = field(default_factory=list)   # window indices, in row order


@dataclass
class PackStats:
    rows_before: int = 0        # samples (one row each unpacked)
    rows_after: int = 0
    tokens: int = 0             # real tokens

    def as_dict(self, seq_len: int, window: int, seed: int) -> dict:
        share = (lambda rows: round(self.tokens / (rows * seq_len), 4) if rows else 0.0)
        return {"rows_before": self.rows_before, "rows_after": self.rows_after,
                "real_token_share_before": share(self.rows_before),
                "real_token_share_after": share(self.rows_after),
                "window": window, "seed": seed, "algorithm": "first-fit decreasing"}


def assign(lengths: list[int], images: list[int], seq_len: int, max_images: int,
           seed: int) -> list[list[int]]:
    """Rows as lists of sample indices (first-fit decreasing; tokens <= seq_len and images <=
    max_images per row); rows shuffled with ``seed``. A sample that alone exceeds a row is a
    ``ValueError`` naming its index."""
    rng = np.random.default_rng(seed)
    tie = rng.permutation(len(lengths))
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tie[i]))
    rows: list[list[int]] = []
    free_tok: list[int] = []
    free_img: list[int] = []
    for i in order:
        if lengths[i] > seq_len or images[i] > max_images:
            raise ValueError(f"sample {i}: {lengths[i]} tokens and {images[i]} images do not fit in a row "
                             f"of {seq_len} tokens and {max_images} images")
        for r in range(len(rows)):
            if free_tok[r] >= lengths[i] and free_img[r] >= images[i]:
                break
        else:
            r = len(rows)
            rows.append([])
            free_tok.append(seq_len)
            free_img.append(max_images)
        rows[r].append(i)
        free_tok[r] -= lengths[i]
        free_img[r] -= images[i]
    for row in rows:
        row.sort()                                       # samples keep their input order in a row
    return [rows[k] for k in rng.permutation(len(rows))]


def build_row(samples: list, members: list[int], seq_len: int, max_images: int,
              num_patches: int, pad_id: int) -> PackedRow:
    """One packed row from encoded samples (``.rows`` (5, S), ``.tokens``, ``.img_paths``,
    ``.img_loc``)."""
    rows = np.zeros((7, seq_len), dtype=np.int32)
    rows[0, :] = pad_id
    rows[2, :] = pad_id
    rows[3, :] = 1
    loc = np.full((max_images, num_patches), seq_len, dtype=np.int32)
    paths: list[str] = []
    off = 0
    for k, i in enumerate(members):
        e = samples[i]
        n = e.tokens
        rows[:5, off:off + n] = e.rows[:, :n]
        rows[5, off:off + n] = k + 1
        rows[6, off:off + n] = np.arange(n)
        for j in range(len(e.img_paths)):
            loc[len(paths)] = e.img_loc[j] + off
            paths.append(e.img_paths[j])
        off += n
    return PackedRow(rows, paths, loc, list(members))


def pack(samples: list, seq_len: int, max_images: int, num_patches: int, pad_id: int,
         seed: int, stats: PackStats) -> list[PackedRow]:
    """Pack one window of encoded samples into rows (see the module's docstring)."""
    lengths = [e.tokens for e in samples]
    members = assign(lengths, [len(e.img_paths) for e in samples], seq_len, max_images, seed)
    stats.rows_before += len(samples)
    stats.rows_after += len(members)
    stats.tokens += sum(lengths)
    return [build_row(samples, m, seq_len, max_images, num_patches, pad_id) for m in members]


def unpack_row(rows: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of every sample of a packed row (7, S), from its segment ids."""
    seg = rows[5]
    out = []
    for k in range(1, int(seg.max(initial=0)) + 1):
        where = np.flatnonzero(seg == k)
        out.append((int(where[0]), int(where.size)))
    return out


def real_token_share(data_dirs, seq_len: int) -> float | None:
    """Share of real (non-pad) tokens in the rows of preprocessed data, from the ``stats.json``
    that ``preprocess`` writes beside the shards (packed: after packing; unpacked: tokens /
    samples x ``seq_len``); None when no folder has usable statistics."""

    dirs = [data_dirs] if isinstance(data_dirs, (str, Path)) else list(data_dirs or [])
    tokens = rows = 0
    for d in dirs:
        try:
            stats = json.loads((Path(d) / "stats.json").read_text(encoding="utf-8"))
            packed = stats.get("packing")
            n = int(packed["rows_after"] if isinstance(packed, dict) else stats["samples_written"])
            t = int(stats["tokens"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        tokens, rows = tokens + t, rows + n
    return min(tokens / (rows * seq_len), 1.0) if rows and seq_len else None
