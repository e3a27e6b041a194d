"""The Model Zoo's multimodal H5 files, both ways, rebuilt from its code's layout (not vendored).

``write_modelzoo_shard`` follows ``MultiModalFinetuningTokenGenerator.encode`` (2.3.1
``multimodal_finetuning_token_generator.py``; 2.10.0 ``finetuning_token_generator.py``) and
``DataPreprocessor.save_buffer_to_hdf5``: per sample ``np.expand_dims(stack of 5 rows)``,
``np.array(paths + [None] * (max_num_img - n), dtype="S")`` (so an empty slot is ``b"None"``),
``has_img`` ``(1, 1)`` bool, ``img_data_loc`` ``np.full((1, I, P), S)``; the buffer concatenated
and written with ``dtype`` ``string_dtype('utf-8')`` for ``S`` data, ``np.bool_`` for bool, else
``"i4"``, ``chunks=(1, *shape[1:])``, ``compression="gzip"``, attribute ``n_examples``; file
name ``output_chunk_{pid}_{file_idx}_{start_doc_idx}_{chunk}.h5`` and ``data_params.json``.

``ModelZooReader`` follows ``H5Reader`` / ``_SequencedH5Reader`` / ``_VirtualDataset``
(``data/common/h5_map_dataset/readers.py``, the same in both tags) and
``MultimodalSimpleHDF5Dataset.__getitem__`` / ``preprocess_img`` (``dataset.py``) with the
``MultimodalSimpleHDF5MapDataProcessor``'s feature map, line by line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch
from PIL import Image

FEATURES = ["text_input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx"]


def write_modelzoo_shard(folder: Path, samples: list[tuple[np.ndarray, list[str], list[tuple[int, int]]]],
                         max_seq_length: int, max_num_img: int, num_patches: int, data_params: dict) -> Path:
    """``samples``: (5 x S rows, image paths, [(start, end)] image positions) per sample."""
    buffer = {"data": [], "img_path": [], "has_img": [], "img_data_loc": []}
    for rows, paths, positions in samples:
        token_modality_idx = np.zeros(max_seq_length)                  # float64, as encode() makes it
        img_data_loc = np.full((1, max_num_img, num_patches), max_seq_length)
        for i, (start, end) in enumerate(positions):
            img_data_loc[0, i] = list(range(start, end))
            token_modality_idx[start:end] = 1
        padded = np.stack([rows[0], rows[1], rows[2], rows[3], token_modality_idx])
        image_paths = [p.encode("utf-8") for p in paths]
        has_img = bool(image_paths)
        image_paths = image_paths + [None] * (max_num_img - len(image_paths))
        buffer["data"].append(np.expand_dims(padded, axis=0))
        buffer["img_path"].append(np.array(image_paths, dtype="S").reshape(1, -1))
        buffer["has_img"].append(np.array([[has_img]], dtype=np.bool_))
        buffer["img_data_loc"].append(img_data_loc)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "output_chunk_0_0_0_0.h5"
    with h5py.File(path, "w") as h5file:
        n_examples = 0
        for label in buffer:
            data = np.concatenate(buffer[label], axis=0)
            if data.dtype.kind == "S":
                dtype = h5py.string_dtype(encoding="utf-8")
            elif data.dtype == np.bool_:
                dtype = np.bool_
            else:
                dtype = "i4"
            chunks = (1, *data.shape[1:]) if len(data.shape) > 1 else None
            n_examples = data.shape[0]
            h5file.create_dataset(label, data=data, dtype=dtype, chunks=chunks, compression="gzip")
        h5file.attrs["n_examples"] = n_examples
    (folder / "data_params.json").write_text(json.dumps(data_params, indent=4, sort_keys=True))
    return path


class _VirtualDataset:
    def __init__(self, sources: list):
        length = sum(s.shape[0] for s in sources)
        self._shape = (length, *sources[0].shape[1:])
        self._dtype = max(source.dtype for source in sources)
        layout = h5py.VirtualLayout(shape=self._shape, dtype=self._dtype)
        start = 0
        for vsource in sources:
            end = start + vsource.shape[0]
            layout[start:end:1, ...] = vsource
            start = end
        self._tmp = tempfile.NamedTemporaryFile("w", prefix="virtual_dataset", suffix=".h5")
        with h5py.File(self._tmp.name, "w", libver="latest") as f:
            f.create_virtual_dataset("data", layout)
        self._file = h5py.File(self._tmp.name, "r")
        self._dataset = self._file["data"]

    def __getitem__(self, i):
        return self._dataset[i]

    def __len__(self):
        return self._dataset.shape[0]


class ModelZooReader:
    """``MultimodalSimpleHDF5Dataset`` over ``H5Reader(extra_data_keys=["img_path", "img_data_loc"])``."""

    def __init__(self, data_dir: str, img_data_dir: str, image_data_size: list[int], max_num_img: int, transform):
        files = []
        p = Path(data_dir)
        if not p.is_dir():
            raise ValueError(f"The path {p} does not exist or is not a directory.")
        files.extend(p.glob("*.h5"))
        if not files:
            raise ValueError(f"No *.h5 files found in specified data directories: {data_dir}.")
        files.sort()
        with h5py.File(files[0], "r") as f:
            data_shape = f["data"].shape
        if len(data_shape) < 2:                   # sequence_length None: by sample
            raise ValueError(f"the data written to {files[0]} has rank 1")
        data_keys = ["data", "img_path", "img_data_loc"]
        vsources = {key: [] for key in data_keys}
        for filepath in files:
            with h5py.File(filepath, "r") as f:
                for key in data_keys:
                    dataset = f[key]
                    vsources[key].append(h5py.VirtualSource(dataset))
                    data_dtype = vsources[key][0].dtype
                    data_shape = vsources[key][0].shape
                    if data_dtype.kind != "S" and dataset.dtype != data_dtype:
                        raise ValueError(f"Expected all dataset H5 files to have the same dtype ({filepath})")
                    if dataset.shape[1:] != data_shape[1:]:
                        raise ValueError(f"Expected all dataset H5 files to have the same shape ({filepath})")
        self._vdataset = {key: _VirtualDataset(v) for key, v in vsources.items()}
        self.img_data_dir = img_data_dir
        self.image_data_size = [max_num_img, *image_data_size]        # insert(0, max_num_img)
        self.transforms = transform

    def __len__(self):
        return len(self._vdataset["data"])

    def preprocess_img(self, path_list):
        img_list = []
        for path in path_list:
            path = path.decode("utf-8")
            if path != "None":
                image_path = os.path.join(self.img_data_dir, path)
                image = Image.open(image_path).convert("RGB")
            else:
                image = Image.new(mode="RGB", size=(self.image_data_size[2], self.image_data_size[1]))
            img_list.append(self.transforms(image).unsqueeze(0))
        return torch.cat(img_list, dim=0)

    def __getitem__(self, i):
        data = {key: d[i] for key, d in self._vdataset.items()}
        data["data"] = data["data"].astype(np.int32)
        text_data, img_path, img_data_loc = data["data"], data["img_path"], data["img_data_loc"]
        img_data = self.preprocess_img(img_path)
        out = {feature: text_data[idx] for idx, feature in enumerate(FEATURES)}
        out["image_data"] = img_data
        out["image_data_loc"] = img_data_loc
        return out
