"""Writing preprocess output without losing what was there.

Everything goes into a temporary folder beside the output (``.NAME.preprocess-PID``); only a run
that completes with at least one shard swaps it in place of the output folder, and the old
folder is removed after the swap. Each shard is built in memory by HDF5 and written with plain
file writes, so a full disk is an ``OSError`` here (named, exit 2), never an HDF5 crash.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np

from mmgraph.core.h5schema import DATA, HAS_IMG, IMG_DATA_LOC, IMG_PATH
from mmgraph.core.errors import Problem, UserError

OURS = ("stats.json", "data_params.json")


class OutputFolder:
    def __init__(self, output_dir: str):
        self.out = Path(output_dir)
        if self.out.exists() and not self.out.is_dir():
            raise UserError(Problem(output_dir, None, "exists and is not a folder"))
        if self.out.is_dir():
            foreign = [p.name for p in self.out.iterdir()
                       if p.suffix != ".h5" and p.name not in OURS and p.name != ".preprocess.tmp"]
            if foreign:
                raise UserError(Problem(output_dir, None, f"holds files preprocess did not write ({foreign[0]}, ...): "
                                        "choose an empty or new --output_dir"))
        self.tmp = self.out.parent / f".{self.out.name}.preprocess-{os.getpid()}"
        self.shards = 0

    def __enter__(self) -> "OutputFolder":
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as err:
            raise UserError(Problem(str(self.out), None, f"cannot write here: {err.strerror}")) from None
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(value, OSError):
                raise UserError(Problem(str(self.out), None, f"cannot write the output ({value.strerror or value}); "
                                        "nothing was changed")) from None
        return False

    def _write(self, name: str, payload: bytes) -> None:
        with open(self.tmp / name, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    def write_json(self, name: str, value: dict) -> None:
        self._write(name, (json.dumps(value, indent=4, sort_keys=True, default=str) + "\n").encode())

    def write_shard(self, rows: np.ndarray, paths: list[list[str]], locs: np.ndarray, attrs: dict) -> None:
        """One shard in the Model Zoo's layout: ``"None"`` for empty image slots."""
        import h5py

        n = rows.shape[0]
        buffer = io.BytesIO()
        with h5py.File(buffer, "w") as f:
            f.create_dataset(DATA, data=rows, dtype="i4", chunks=(1, *rows.shape[1:]), compression="gzip")
            names = np.array([[p.encode() for p in row] for row in paths], dtype="S").reshape(n, -1)
            f.create_dataset(IMG_PATH, data=names, dtype=h5py.string_dtype("utf-8"),
                             chunks=(1, names.shape[1]), compression="gzip")
            f.create_dataset(HAS_IMG, data=np.array([[any(p != "None" for p in row)] for row in paths]),
                             dtype=np.bool_, chunks=(1, 1), compression="gzip")
            f.create_dataset(IMG_DATA_LOC, data=locs, dtype="i4", chunks=(1, *locs.shape[1:]), compression="gzip")
            f.attrs.update(attrs)
            f.attrs["n_examples"] = n
        self._write(f"data-{self.shards:05d}.h5", buffer.getvalue())
        self.shards += 1

    def commit(self) -> None:
        """Swap the finished folder in place of the output (the old one goes only after)."""
        old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
        had = self.out.exists()
        if had:
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError:
            if had:
                os.replace(old, self.out)               # the earlier output back in place
            raise
        shutil.rmtree(old, ignore_errors=True)
