"""The runtime keeps freed host memory for the next step (``runtime/host_memory.py``): glibc's
defaults unmap a step's large freed blocks, so the next step faults them in again."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

STEPS = """
import resource, sys
import numpy as np
from mmgraph.runtime.host_memory import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():                      # a step's activations: blocks allocated, written, freed at its end
    blocks = [np.ones(1 << 20, dtype=np.float32) for _ in range(6)]
    del blocks
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


def _faults(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    kept, faults = out.stdout.split()
    return kept, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_step_memory_stays_in_the_process():
    """Six 4 MB blocks a step: under glibc's defaults the blocks are unmapped or trimmed when
    freed and every page faults in again the next step (about 6,000 faults); kept, next to none
    (a fault count, not a time: the same on a busy machine)."""
    kept, default = _faults("default")
    assert kept == "False" and default >= 1000, default
    kept, faults = _faults("keep")
    assert kept == "True" and faults <= default // 10, (faults, default)
