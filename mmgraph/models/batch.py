"""The model's batch: field names, shapes and dtypes, and random batches for tests and tracing.

Fields (Model Zoo names), for batch B, images I = max_num_img, tokens P per image, sequence S:

    image_data          (B, I, C, H, W) float   images; padding images are zeros
    text_input_ids      (B, S) int64            token ids; image positions hold a placeholder id
    image_data_loc      (B, I, P) int64         sequence position of every image token; S = padding
    token_modality_idx  (B, S) int64            1 at image positions
    key_padding_mask    (B, S) int64            1 at padding
    labels              (B, S) int64            next token (input ids shifted by one)
    loss_mask           (B, S) int64            1 where the label is supervised

A packed layout (``layout.packed``: each row holds several samples) adds two fields:

    segment_ids         (B, S) int64            1, 2, ... per sample of the row, 0 at padding
    position_ids        (B, S) int64            position within the sample (restarts at 0)

and ``max_num_img`` is then the image budget of a row, shared by its samples.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
import torch.nn.functional as F

from mmgraph.core.config.params import SequenceLayout
from mmgraph.core.h5schema import PACKED_FIELDS

BATCH_FIELDS = ("image_data", "text_input_ids", "image_data_loc", "labels", "loss_mask",
                "key_padding_mask", "token_modality_idx")


def batch_fields(layout: SequenceLayout) -> tuple[str, ...]:
    """The batch fields of a program for ``layout``, in input order."""
    return BATCH_FIELDS + (PACKED_FIELDS if layout.packed else ())


def batch_spec(layout: SequenceLayout, batch_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    b, s, i, p = batch_size, layout.max_sequence_length, layout.max_num_img, layout.num_patches
    return {
        "image_data": ((b, i, *layout.image_data_size), torch.float32),
        "text_input_ids": ((b, s), torch.int64),
        "image_data_loc": ((b, i, p), torch.int64),
        "labels": ((b, s), torch.int64),
        "loss_mask": ((b, s), torch.int64),
        "key_padding_mask": ((b, s), torch.int64),
        "token_modality_idx": ((b, s), torch.int64),
    } | ({f: ((b, s), torch.int64) for f in PACKED_FIELDS} if layout.packed else {})


def random_batch(layout: SequenceLayout, batch_size: int, seed: int = 0,
                 num_images: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
    """A valid batch: each sample gets its images at random, non-overlapping positions among its
    text, right padding of random length, and supervision on text positions only.

    ``num_images[b]`` fixes the image count of sample b (default: random in 0..max_num_img,
    and at least one sample with the maximum).
    """
    if layout.packed:
        return _random_packed_batch(layout, batch_size, seed)
    g = torch.Generator().manual_seed(seed)
    b, s, imax, p = batch_size, layout.max_sequence_length, layout.max_num_img, layout.num_patches
    if num_images is None:
        num_images = [int(torch.randint(0, imax + 1, (), generator=g)) for _ in range(b)]
        num_images[0] = imax
    spec = batch_spec(layout, b)
    out = {k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in spec.items()}
    out["image_data"] = torch.randn(spec["image_data"][0], generator=g)
    out["image_data_loc"].fill_(s)
    ids = torch.randint(1, layout.vocab_size, (b, s + 1), generator=g)
    for row, n in enumerate(num_images):
        if n > imax:
            raise ValueError(f"sample {row}: {n} images > max_num_img {imax}")
        text_len = s - n * p
        length = n * p + int(torch.randint(max(text_len // 2, 1), text_len + 1, (), generator=g))
        # Split the text around the images: n+1 gaps whose sizes sum to (length - n*p).
        cuts = sorted(int(c) for c in torch.randint(0, length - n * p + 1, (n,), generator=g))
        pos, prev = 0, 0
        for img, cut in enumerate(cuts):
            pos += cut - prev
            prev = cut
            out["image_data_loc"][row, img] = torch.arange(pos, pos + p)
            out["token_modality_idx"][row, pos:pos + p] = 1
            pos += p
        for img in range(n, imax):
            out["image_data"][row, img] = 0.0
        out["text_input_ids"][row, :length] = ids[row, :length]
        out["text_input_ids"][row, out["token_modality_idx"][row] == 1] = 0
        out["labels"][row, : length - 1] = out["text_input_ids"][row, 1:length]
        out["key_padding_mask"][row, length:] = 1
        # Supervise positions whose next token is text (the last real token predicts nothing).
        nxt_is_text = torch.zeros(s, dtype=torch.bool)
        nxt_is_text[: length - 1] = out["token_modality_idx"][row, 1:length] == 0
        out["loss_mask"][row] = nxt_is_text.long()
    return out


def _random_packed_batch(layout: SequenceLayout, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Two random samples of half a row each per row (together within the row's image budget,
    each with at least two text tokens), packed; one sample per row where rows are too short."""
    s, imax, p = layout.max_sequence_length, layout.max_num_img, layout.num_patches
    half = s // 2
    cap = min(imax, (half - 2) // p) if half >= 2 else -1     # images a half-row sample can hold
    g = torch.Generator().manual_seed(seed)
    if cap < 0:
        n = [min(imax, (s - 2) // p)] * batch_size
        one = random_batch(replace(layout, packed=False), batch_size, seed, num_images=n)
        return pack_batch(one, [[r] for r in range(batch_size)], layout)
    first = [int(torch.randint(0, cap + 1, (), generator=g)) for _ in range(batch_size)]
    first[0] = cap
    second = [int(torch.randint(0, min(cap, imax - n) + 1, (), generator=g)) for n in first]
    samples = random_batch(replace(layout, packed=False, max_sequence_length=half), 2 * batch_size,
                           seed, num_images=first + second)
    samples = pad_batch(samples, s)
    return pack_batch(samples, [[r, batch_size + r] for r in range(batch_size)], layout)


def pad_batch(batch: dict[str, torch.Tensor], seq_len: int) -> dict[str, torch.Tensor]:
    """An unpacked batch right-padded to ``seq_len`` (padding images move to the new end)."""
    s = batch["text_input_ids"].shape[1]
    extra = seq_len - s
    out = {}
    for name, t in batch.items():
        if name == "image_data":
            out[name] = t
        elif name == "image_data_loc":
            out[name] = torch.where(t >= s, seq_len, t)
        else:
            out[name] = F.pad(t, (0, extra), value=1 if name == "key_padding_mask" else 0)
    return out


def pack_batch(batch: dict[str, torch.Tensor], rows: list[list[int]],
               layout: SequenceLayout) -> dict[str, torch.Tensor]:
    """Pack the samples of an unpacked ``batch`` (one per row, right-padded) into rows:
    ``rows[r]`` lists the samples of packed row r, in order. Each sample keeps its real tokens
    (``key_padding_mask == 0``) and its images; ``layout`` (packed) gives the row length and the
    row's image budget. A reference for tests and benchmarks (the preprocessor packs shards)."""
    spec = batch_spec(layout, len(rows))
    s_in = batch["text_input_ids"].shape[1]
    s = layout.max_sequence_length
    out = {k: torch.zeros(shape, dtype=dt) for k, (shape, dt) in spec.items()}
    out["image_data_loc"].fill_(s)
    out["key_padding_mask"].fill_(1)
    for r, members in enumerate(rows):
        off, img = 0, 0
        for k, i in enumerate(members):
            n = int((batch["key_padding_mask"][i] == 0).sum())
            if off + n > s:
                raise ValueError(f"row {r}: samples {members} need more than {s} tokens")
            for f in ("text_input_ids", "labels", "loss_mask", "token_modality_idx"):
                out[f][r, off:off + n] = batch[f][i, :n]
            out["key_padding_mask"][r, off:off + n] = 0
            out["segment_ids"][r, off:off + n] = k + 1
            out["position_ids"][r, off:off + n] = torch.arange(n)
            for j in range(batch["image_data_loc"].shape[1]):
                loc = batch["image_data_loc"][i, j]
                if int(loc[0]) >= s_in:
                    continue
                if img >= layout.max_num_img:
                    raise ValueError(f"row {r}: samples {members} hold more than {layout.max_num_img} images")
                out["image_data"][r, img] = batch["image_data"][i, j]
                out["image_data_loc"][r, img] = loc + off
                img += 1
            off += n
    return out
