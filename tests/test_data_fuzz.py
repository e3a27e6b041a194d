"""Fuzz: a damaged shard (truncated, bytes flipped, datasets deleted, wrong dtypes or shapes) is an
exit 2 naming the shard from ``mmgraph check`` and a ``UserError`` naming it from the loader;
never a traceback. Damage that changes nothing readable may pass (exit 0)."""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.runtime.data import make_loader
from tests.test_data_errors import params_for, shards
from tests.conftest import FUZZ

REQUIRED = ("data", "img_path", "img_data_loc")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    from mmgraph.data.synth import synth
    root = tmp_path_factory.mktemp("fuzz")
    synth(root, num_train=8, num_eval=2, seed=6)
    out = shards(root, root / "out", n=4)
    return root, out


def _damage(shard: Path, kind: str, where: float, key: str, payload: bytes) -> bool:
    """Apply one damage; True when it must be refused (not only may)."""
    size = shard.stat().st_size
    if kind == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(int(size * where))
        return where < 0.5
    if kind == "flip":
        with open(shard, "r+b") as f:
            f.seek(min(int(size * where), size - len(payload)))
            f.write(bytes(b ^ 0xFF for b in payload))
        return False
    with h5py.File(shard, "a") as f:
        old = f[key][:]
        del f[key]
        if kind == "delete":
            return key in REQUIRED
        if kind == "dtype":
            f[key] = old.astype(np.float32) if old.dtype.kind in "iub" else np.zeros(old.shape, np.float32)
            return key in REQUIRED
        f[key] = old[..., :-1] if old.ndim > 1 and old.shape[-1] > 1 else old[:, None]          # shape
        return key in REQUIRED


@settings(FUZZ, max_examples=40)
@given(kind=st.sampled_from(["truncate", "flip", "delete", "dtype", "shape"]),
       where=st.floats(0.0, 0.999), key=st.sampled_from(["data", "img_path", "img_data_loc", "has_img"]),
       payload=st.binary(min_size=1, max_size=64))
def test_damaged_shard_is_named_never_a_traceback(pristine, tmp_path_factory, kind, where, key, payload):
    root, out = pristine
    case = tmp_path_factory.mktemp("case")
    data = case / "data"
    shutil.copytree(out, data)
    shard = data / "data-00000.h5"
    must_fail = _damage(shard, kind, where, key, payload)
    params = params_for(case, data, root / "images")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["check", "--params", str(params)])
    assert rc in (0, 2), err.getvalue()
    if rc == 2:
        assert f"mmgraph: error: {shard}" in err.getvalue()
    assert rc == 2 or not must_fail, (kind, key)
    try:
        loader, _ = make_loader(load_params(params), num_workers=0, batch_size=1)
        for _ in loader:
            pass
    except UserError as error:
        assert str(shard) in str(error)
    else:
        assert not must_fail, (kind, key)
