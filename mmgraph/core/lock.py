"""An exclusive lock on a model_dir for ``run`` and ``compile``: an OS file lock
(``fcntl.flock`` on ``MODEL_DIR/.lock``) held by the process, released by the OS when the
process ends in any way (kill -9 included), so a lock is never stale."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from mmgraph.core.errors import Problem, UserError

LOCK_FILE = ".lock"


@contextmanager
def model_dir_lock(model_dir: str | Path, command: str):
    """Hold the lock for the block; a second holder gets exit 2 naming the model_dir."""
    try:
        import fcntl
    except ImportError:                          # not POSIX: no lock, as before
        yield
        return
    model_dir = Path(model_dir)
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(Problem(str(model_dir), None, f"in use by {holder}; one mmgraph run or compile "
                                    "at a time per model_dir (wait for it, or use another --model_dir)")) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"mmgraph {command} (pid {os.getpid()})\n".encode(), 0)
        yield
    finally:
        if created and [p.name for p in model_dir.iterdir()] == [LOCK_FILE]:
            (model_dir / LOCK_FILE).unlink()     # nothing written (e.g. bad input): leave no folder
            model_dir.rmdir()
        os.close(fd)                             # closing releases the lock
