"""The multimodal H5 shard layout (the Model Zoo's, plus mmgraph's packed rows), written once:
the preprocessor writes it, the loader and the shard checks read it, the batch specs follow it.

Each shard holds ``data`` (N x rows x S int32: the ``ROW_FIELDS`` in order, then with packing the
``PACKED_FIELDS``), ``img_path`` (N x max_num_img utf-8 paths relative to the image folder,
"None" for an empty slot), ``has_img`` (N x 1 bool) and ``img_data_loc`` (N x max_num_img x
tokens per image int32: where each image's tokens stand in the row).
"""

from __future__ import annotations

ROW_FIELDS = ("text_input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx")
PACKED_FIELDS = ("segment_ids", "position_ids")      # rows 6 and 7 of a packed shard
DATA, IMG_PATH, HAS_IMG, IMG_DATA_LOC = "data", "img_path", "has_img", "img_data_loc"
NO_IMAGE = "None"


def row_fields(packed: bool) -> tuple[str, ...]:
    """The fields of ``data``'s rows, in order."""
    return ROW_FIELDS + (PACKED_FIELDS if packed else ())
