"""The multimodal data loader over H5 shards made by ``mmgraph preprocess``.

Map-style: an index of (shard, row) built from the shards' ``n_examples`` (nothing loaded
whole); rows and images are read when asked for; images are read relative to ``img_data_dir``
and go through the params' ``transforms``. Sampling (``shuffle`` with ``shuffle_seed``,
``drop_last``) is a resumable sampler whose position a checkpoint saves and restores.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image

from mmgraph.config import Params
from mmgraph.errors import Problem, UserError
from mmgraph.runtime.transforms import build_transforms

FIELDS = ("text_input_ids", "loss_mask", "labels", "key_padding_mask", "token_modality_idx")


class MultimodalH5Dataset(torch.utils.data.Dataset):
    def __init__(self, data_dir, img_data_dir: Optional[str], transforms, max_seq_length: int,
                 max_num_img: int, num_patches: int, image_size: tuple[int, int, int]):
        dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
        self.files: list[Path] = []
        for d in dirs:
            if not Path(d).is_dir():
                raise UserError(Problem(str(d), None, "data_dir does not exist (run mmgraph preprocess)"))
            self.files += sorted(Path(d).glob("*.h5"))
        if not self.files:
            raise UserError(Problem(str(dirs[0]), None, "no .h5 shards here (run mmgraph preprocess)"))
        self.img_dir = Path(img_data_dir) if img_data_dir else None
        self.S, self.I, self.P = max_seq_length, max_num_img, num_patches
        self.image_size = tuple(image_size)
        self.transform = build_transforms(transforms)
        self.index: list[tuple[int, int]] = []
        for k, path in enumerate(self.files):
            n = self._check_shard(path)
            self.index += [(k, i) for i in range(n)]
        self._handles: dict[int, object] = {}

    def _check_shard(self, path: Path) -> int:
        import h5py

        want = {"data": (5, self.S), "img_path": (self.I,), "has_img": (1,), "img_data_loc": (self.I, self.P)}
        try:
            with h5py.File(path, "r") as f:
                for key, tail in want.items():
                    if key not in f:
                        raise UserError(Problem(str(path), key, "dataset missing (not an mmgraph/Model Zoo 2.3 shard)"))
                    if tuple(f[key].shape[1:]) != tail:
                        raise UserError(Problem(str(path), key, f"shape {tuple(f[key].shape)} does not match the params "
                                                f"(expected N x {' x '.join(map(str, tail))})"))
                n = int(f.attrs.get("n_examples", f["data"].shape[0]))
                if f["data"].shape[0] != n:
                    raise UserError(Problem(str(path), "n_examples", f"{n} but data has {f['data'].shape[0]} rows"))
                return n
        except OSError as err:
            raise UserError(Problem(str(path), None, f"not a readable HDF5 file: {err}")) from None

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, k: int):
        import h5py

        if k not in self._handles:
            self._handles[k] = h5py.File(self.files[k], "r")
        return self._handles[k]

    seed = 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(i, len(self.index))          # the sampler's key: epoch * len + index
        k, row = self.index[i]
        f = self._file(k)
        data = torch.from_numpy(f["data"][row].astype(np.int64))                 # (5, S)
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["img_path"][row]]
        loc = torch.from_numpy(f["img_data_loc"][row].astype(np.int64))         # (I, P)
        images = torch.zeros((self.I, *self.image_size))
        for j, name in enumerate(paths):
            if name:
                path = self.img_dir / name if self.img_dir else Path(name)
                try:
                    with Image.open(path) as img:
                        images[j] = self.transform(img, random.Random(f"{self.seed}:{epoch}:{i}:{j}"))
                except (OSError, ValueError) as err:
                    raise UserError(Problem(str(path), None, f"cannot read image of {self.files[k].name} row {row}: {err}")) from None
        out = {name: data[r] for r, name in enumerate(FIELDS)}
        out["image_data"] = images
        out["image_data_loc"] = loc
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class ResumableSampler(torch.utils.data.Sampler):
    """Shuffled (or sequential) indices per epoch, seeded; ``state_dict`` is the position."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last
        self.epoch, self.consumed = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        usable = (self.n // self.batch_size) * self.batch_size if self.drop_last else self.n
        return order[:usable]

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        start = self.consumed
        for pos in range(start, len(order)):
            self.consumed = pos + 1
            yield self.epoch * self.n + order[pos]     # the dataset derives its transform RNG from it
        self.epoch += 1
        self.consumed = 0

    def __len__(self) -> int:
        return len(self._order()) - self.consumed

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


def make_loader(params: Params, mode: str = "train", num_workers: Optional[int] = None,
                batch_size: Optional[int] = None):
    """A DataLoader of micro-batches with the model's batch fields, from the params' input section."""
    data = params.input_for(mode)
    layout = params.layout(mode)
    problems = []
    if data.img_data_dir and not Path(data.img_data_dir).is_dir():
        problems.append(Problem(params.path, f"{'eval_input' if mode == 'eval' else 'train_input'}.img_data_dir",
                                f"{data.img_data_dir} does not exist"))
    try:
        ds = MultimodalH5Dataset(data.data_dir, data.img_data_dir, data.transforms, layout.max_sequence_length,
                                 layout.max_num_img, layout.num_patches, layout.image_data_size)
    except UserError as err:
        raise UserError(problems + err.problems) from None
    if problems:
        raise UserError(problems)
    ds.seed = data.shuffle_seed or 0
    mbs = batch_size or (data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size)
    sampler = ResumableSampler(len(ds), mbs, data.shuffle, data.shuffle_seed, data.drop_last)
    workers = data.num_workers if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(ds, batch_size=mbs, sampler=sampler, num_workers=workers,
                                         drop_last=data.drop_last, persistent_workers=False)
    return loader, sampler
