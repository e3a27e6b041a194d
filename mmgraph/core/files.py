"""Writing folders so nothing already written is lost: build under a temporary name, then swap."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def swap_folder(tmp: Path, final: Path) -> Path:
    """Put the finished folder ``tmp`` in place of ``final``: the old one is renamed aside, the
    new one renamed in, then the old one removed (a kill in between leaves a whole folder)."""
    old = final.with_name("." + final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def scratch(final: Path) -> Path:
    """A new, empty folder beside ``final`` to build it in (``.NAME.tmp-XXXX``); leftovers of
    earlier builds that did not finish (a kill, a full disk) are removed first. Callers hold
    the model_dir lock, so no other build of ``final`` is under way."""
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp*"):
        shutil.rmtree(stale, ignore_errors=True)
    legacy = final.with_name(final.name + ".tmp")          # the name earlier releases built in
    if legacy.is_dir():
        shutil.rmtree(legacy, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


@contextlib.contextmanager
def building(final: Path) -> Iterator[Path]:
    """``with building(final) as tmp:`` write the folder into ``tmp``; when the block ends
    normally ``tmp`` replaces ``final``, otherwise (an error, a full disk) ``tmp`` is removed
    and ``final`` is as it was."""
    tmp = scratch(final)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    swap_folder(tmp, final)
