"""One `run` or `compile` at a time per model_dir (issue 14 item 3): an OS file lock, with
real processes, hard timeouts, and a kill -9 that leaves no stale lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import ROOT, TINY2
from tests.test_runtime import shards  # noqa: F401 - the module's data fixture

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file locks")

HOLDER = """
import sys
from mmgraph.core.lock import model_dir_lock
with model_dir_lock(sys.argv[1], "test-holder"):
    print("locked", flush=True)
    sys.stdin.read()                      # hold until stdin closes (or the process is killed)
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _holder(model_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(model_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout.readline() == "locked\n"          # the lock is held: synchronised, no sleep
    return proc


def _mmgraph(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "mmgraph", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)


def test_a_second_compile_is_refused_while_the_model_dir_is_held(tmp_path):
    md = tmp_path / "md"
    holder = _holder(md)
    try:
        done = _mmgraph("compile", "--params", str(TINY2), "--model_dir", str(md))
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"mmgraph: error: {md}: in use by mmgraph test-holder (pid {holder.pid}); ")
        assert "Traceback" not in done.stderr and not (md / ".compile.tmp").exists()
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0


def test_a_second_run_is_refused_and_a_killed_holder_leaves_no_stale_lock(shards, tmp_path):  # noqa: F811
    md = tmp_path / "md"
    holder = _holder(md)
    done = _mmgraph("run", "--params", str(shards), "--model_dir", str(md), "--max_steps", "1")
    assert done.returncode == 2, done.stderr
    assert f"mmgraph: error: {md}: in use by mmgraph test-holder" in done.stderr
    assert not (md / "checkpoints").exists()
    holder.send_signal(signal.SIGKILL)                    # kill -9: the OS drops the lock with the process
    assert holder.wait(timeout=60) == -signal.SIGKILL
    done = _mmgraph("run", "--params", str(shards), "--model_dir", str(md), "--max_steps", "1")
    assert done.returncode == 0, done.stderr
    assert (md / "checkpoints" / "ckpt-000001" / "state.json").is_file()


def test_the_lock_is_released_and_an_unused_model_dir_not_left_behind(tmp_path):
    from mmgraph.core.errors import UserError
    from mmgraph.core.lock import model_dir_lock
    md = tmp_path / "md"
    with pytest.raises(UserError):
        with model_dir_lock(md, "run"):
            raise UserError("bad input")                  # nothing written: no folder left
    assert not md.exists()
    with model_dir_lock(md, "run"):
        (md / "kept").write_text("x")
    with model_dir_lock(md, "compile"):                   # released: the same process takes it again
        pass
    assert (md / "kept").is_file()
