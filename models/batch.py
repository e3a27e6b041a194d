"""The model's batch: field names, shapes and dtypes, and random batches for tests and tracing.

Fields (Model Zoo names), for batch B, images I = max_num_img, tokens P per image, sequence S:

    image_data          (B, I, C, H, W) float   images; padding images are zeros
    text_input_ids      (B, S) int64            token ids; image positions hold a placeholder id
    image_data_loc      (B, I, P) int64         sequence position of every image token; S = padding
    token_modality_idx  (B, S) int64            1 at image positions
    key_padding_mask    (B, S) int64            1 at padding
    labels              (B, S) int64            next token (input ids shifted by one)
    loss_mask           (B, S) int64            1 where the label is supervised
"""

from __future__ import annotations

from typing import Optional

import torch

from mmgraph.config.load import SequenceLayout

BATCH_FIELDS = ("image_data", "text_input_ids", "image_data_loc", "labels", "loss_mask",
                "key_padding_mask", "token_modality_idx")


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
    }


def random_batch(layout: SequenceLayout, batch_size: int, seed: int = 0,
                 num_images: Optional[list[int]] = None) -> dict[str, torch.Tensor]:
    """A valid batch: each sample gets its images at random, non-overlapping positions among its
    text, right padding of random length, and supervision on text positions only.

    ``num_images[b]`` fixes the image count of sample b (default: random in 0..max_num_img,
    and at least one sample with the maximum).
    """
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
