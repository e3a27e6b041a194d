"""Writing folders so nothing already written is lost: build under a temporary name, then swap."""

from __future__ import annotations

import shutil
from pathlib import Path


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
