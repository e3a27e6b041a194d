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

import torch

from mmgraph.core.config import Params
from mmgraph.core.errors import Problem, UserError
from mmgraph.core.h5schema import ROW_FIELDS, row_fields
from mmgraph.core.packing import real_token_share
from mmgraph.data.images import BadImage, UnsafePath, confined, open_image
from mmgraph.data.transforms import build_transforms
from mmgraph.runtime.distributed import RankSampler
from mmgraph.runtime.shards import Expect, data_params_problems, inspect_shard, read_sample


class MultimodalH5Dataset(torch.utils.data.Dataset):
    def __init__(self, data_dir, img_data_dir: Optional[str], transforms, max_seq_length: int,
                 max_num_img: int, num_patches: int, image_size: tuple[int, int, int],
                 vocab_size: Optional[int] = None, image_start_idx: int = 1, packed: bool = False):
        dirs = [data_dir] if isinstance(data_dir, (str, Path)) else list(data_dir)
        self.files = shard_files(dirs)
        self.img_dir = Path(img_data_dir) if img_data_dir else None
        self.S, self.I, self.P = max_seq_length, max_num_img, num_patches
        self.want = Expect(max_seq_length, max_num_img, num_patches, vocab_size, image_start_idx, packed)
        self.image_size = tuple(image_size)
        self.transform = build_transforms(transforms)
        self.index: list[tuple[int, int]] = []
        problems: list[Problem] = []
        for k, path in enumerate(self.files):
            n, bad = inspect_shard(path, self.want)
            problems += bad
            self.index += [(k, i) for i in range(n)]
        if problems:
            raise UserError(problems)
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def identity(self) -> dict:
        """What says two ranks read the same data: the shards (resolved paths and sizes) and the
        sample count."""
        return {"shards": [f"{p.resolve()} ({p.stat().st_size} bytes)" for p in self.files], "samples": len(self)}

    def _file(self, k: int):
        import h5py

        if k not in self._handles:
            self._handles[k] = h5py.File(self.files[k], "r")
        return self._handles[k]

    seed = 0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(i, len(self.index))          # the sampler's key: epoch * len + index
        k, row = self.index[i]
        where = f"sample {row}"
        try:
            data, names, loc = read_sample(self._file(k), self.files[k], row, self.want)
        except (ValueError, OSError) as err:
            raise UserError(Problem(str(self.files[k]), where, str(err))) from None
        images = torch.zeros((self.I, *self.image_size))
        for j, name in enumerate(names):
            if not name:
                continue
            try:
                img = open_image(confined(self.img_dir, name))
                images[j] = self.transform(img, random.Random(f"{self.seed}:{epoch}:{i}:{j}"))
            except (UnsafePath, BadImage) as err:
                raise UserError(Problem(str(self.files[k]), where, str(err))) from None
            except (RuntimeError, ValueError, TypeError) as err:
                raise UserError(Problem(str(self.files[k]), where, f"image {name} cannot be transformed to "
                                        f"{tuple(self.image_size)}: {err}")) from None
        data = torch.from_numpy(data)                                               # (5 or 7, S)
        out = {field: data[r] for r, field in enumerate(row_fields(data.shape[0] > len(ROW_FIELDS)))}
        out["image_data"] = images                                                  # (I, C, H, W)
        out["image_data_loc"] = torch.from_numpy(loc)                               # (I, P)
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def image_start_idx(params: Params) -> int:
    """The older ``llava`` model's ``model.image_start_idx`` (2.3 layout or ``trainer.init.model``)."""
    raw = params.raw if isinstance(params.raw, dict) else {}
    trainer = raw.get("trainer") if isinstance(raw.get("trainer"), dict) else {}
    init = trainer.get("init") if isinstance(trainer.get("init"), dict) else {}
    for model in (raw.get("model"), init.get("model")):
        if isinstance(model, dict) and isinstance(model.get("image_start_idx"), int):
            return model["image_start_idx"]
    return 1


def shard_files(dirs) -> list[Path]:
    """Every ``*.h5`` of the folders, sorted (as the Model Zoo's reader does)."""
    files: list[Path] = []
    for d in dirs:
        if not Path(d).is_dir():
            raise UserError(Problem(str(d), None, "data_dir does not exist (run mmgraph preprocess)"))
        files += sorted(Path(d).glob("*.h5"))
    if not files:
        raise UserError(Problem(str(dirs[0]), None, "no .h5 shards here (run mmgraph preprocess)"))
    return files


class NamedErrorsLoader(torch.utils.data.DataLoader):
    """A DataLoader whose workers' data errors arrive as the worker raised them (``FILE: sample N:
    what``), not wrapped in the worker's traceback text."""

    def __iter__(self):
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except UserError as err:
                text = str(err)
                if "Traceback" not in text:
                    raise
                lines = [line.split("UserError: ", 1)[1] for line in text.splitlines() if "UserError: " in line]
                raise UserError(Problem(None, None, lines[-1] if lines else text.splitlines()[0])) from None
            yield batch


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
                batch_size: Optional[int] = None, ranks=None):
    """A DataLoader of micro-batches with the model's batch fields, from the params' input section.
    Data parallel (``ranks`` of a world size > 1): this rank's part of every global batch
    (``batch_size``), from whole global batches only (an epoch's last partial one is dropped)."""
    data = params.input_for(mode)
    layout = params.layout(mode)
    problems = []
    if data.img_data_dir and not Path(data.img_data_dir).is_dir():
        problems.append(Problem(params.path, f"{'eval_input' if mode == 'eval' else 'train_input'}.img_data_dir",
                                f"{data.img_data_dir} does not exist"))
    try:
        ds = MultimodalH5Dataset(data.data_dir, data.img_data_dir, data.transforms, layout.max_sequence_length,
                                 layout.max_num_img, layout.num_patches, layout.image_data_size, layout.vocab_size,
                                 image_start_idx(params), layout.packed)
    except UserError as err:
        raise UserError(problems + err.problems) from None
    if problems:
        raise UserError(problems)
    ds.seed = data.shuffle_seed or 0
    mbs = batch_size or (data.micro_batch_size if isinstance(data.micro_batch_size, int) else data.batch_size)
    sampler = ResumableSampler(len(ds), mbs, data.shuffle, data.shuffle_seed, data.drop_last)
    drop_last = data.drop_last
    if ranks is not None and ranks.world_size > 1:

        base = ResumableSampler(len(ds), data.batch_size, data.shuffle, data.shuffle_seed, drop_last=True)
        sampler, drop_last = RankSampler(base, data.batch_size, ranks), False
    workers = data.num_workers if num_workers is None else num_workers
    loader = NamedErrorsLoader(ds, batch_size=mbs, sampler=sampler, num_workers=workers,
                               drop_last=drop_last, persistent_workers=False)
    return loader, sampler


def check_data(params: Params, mode: str = "train") -> tuple[int, list[Problem]]:
    """Check the data the params point to: (samples, every problem found).

    Shards readable and shaped as the params say (sequence length, ``max_num_img``, tokens per
    image), ``data_params.json`` consistent with them, every sample's token ids and image
    positions in range, every image present inside ``img_data_dir``, of an allowed format and a size
    that decodes (and pads to a square) safely. Images are verified, not decoded."""
    data = params.input_for(mode)
    if data is None or not data.data_dir:
        return 0, []
    layout = params.layout(mode)
    section = "eval_input" if mode == "eval" and params.eval_input else "train_input"
    want = Expect(layout.max_sequence_length, layout.max_num_img, layout.num_patches, layout.vocab_size,
                  image_start_idx(params), layout.packed)
    problems: list[Problem] = []
    if data.img_data_dir and not Path(data.img_data_dir).is_dir():
        problems.append(Problem(params.path, f"{section}.img_data_dir", f"{data.img_data_dir} does not exist"))
    dirs = [data.data_dir] if isinstance(data.data_dir, (str, Path)) else list(data.data_dir)
    try:
        files = shard_files(dirs)
    except UserError as err:
        return 0, problems + err.problems
    for d in dirs:
        problems += data_params_problems(Path(d), want)
    total = 0
    for path in files:
        n, bad = inspect_shard(path, want)
        problems += bad
        if not bad:
            problems += _check_rows(path, n, want, data.img_data_dir)
            total += n
    return total, problems


def _check_rows(path: Path, n: int, want: Expect, img_dir: Optional[str], limit: int = 20) -> list[Problem]:
    """Every sample of one shard (at most ``limit`` problems from it, then a count)."""
    import h5py

    problems: list[Problem] = []
    more = 0
    try:
        with h5py.File(path, "r") as f:
            for row in range(n):
                try:
                    _, names, _ = read_sample(f, path, row, want)
                    for name in filter(None, names):
                        image = confined(img_dir, name)
                        if not image.is_file():
                            raise ValueError(f"image {name} not found in {img_dir}")
                        open_image(image, decode=False)      # format, size, padded size; BadImage
                except ValueError as err:          # UnsafePath is a ValueError
                    if len(problems) < limit:
                        problems.append(Problem(str(path), f"sample {row}", str(err)))
                    else:
                        more += 1
    except OSError as err:
        problems.append(Problem(str(path), None, f"cannot be read ({err})"))
    if more:
        problems.append(Problem(str(path), None, f"{more} more samples with problems"))
    return problems


def describe_data(params: Params, mode: str = "train") -> Optional[str]:
    """``mmgraph check``'s data line: None when the params' data_dir does not exist (yet);
    otherwise the sample count, or a ``UserError`` listing every problem of the data.
    ``train_and_eval`` checks both sections."""
    lines, problems, seen = [], [], set()
    for m in (("train", "eval") if mode == "train_and_eval" else (mode,)):
        data = params.input_for(m)
        if data is None or not data.data_dir:
            continue
        dirs = [data.data_dir] if isinstance(data.data_dir, (str, Path)) else list(data.data_dir)
        key = (tuple(map(str, dirs)), data.img_data_dir)
        if key in seen or not all(Path(d).is_dir() for d in dirs):
            continue
        seen.add(key)
        count, found = check_data(params, m)
        problems += found
        lines.append(f"data ({m}): {count:,} {'packed rows' if params.layout(m).packed else 'samples'} in "
                     f"{', '.join(map(str, dirs))} (shards, layout and images checked)" + _real_share_note(params, m))
    if problems:
        raise UserError(problems)
    return "\n".join(lines) or None


def _real_share_note(params: Params, mode: str) -> str:
    """``; real tokens 62% of each row`` from the data's statistics (real tokens/s = tokens/s x it)."""

    data = params.input_for(mode)
    share = real_token_share(data.data_dir, params.layout(mode).max_sequence_length)
    return "" if share is None else f"; real (non-pad) tokens {share:.0%} of each row: real tokens/s = tokens/s x {share:.2f}"
