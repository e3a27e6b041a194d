"""What every benchmark script shares: the machine it ran on, timing statistics, and the end
(print the table, write the JSON with the machine, versions and date beside the figures)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "torch-mlir", "onnx", "onnxruntime", "transformers")


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else platform.machine()


def _memory_gb() -> Optional[float]:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return int(m.group(1)) / (1 << 20) if m else None


def _version(name: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git() -> Optional[str]:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def environment() -> dict:
    """The machine, the versions and the date of a run (recorded in every result file)."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gb": _memory_gb(),
        "torch_threads": torch.get_num_threads(), "gpu": gpu,
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PACKAGES},
        "git": _git(), "argv": sys.argv[1:],
    }


def rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (as results name their configs)."""
    return os.path.relpath(path, ROOT) if Path(path).resolve().is_relative_to(ROOT) else str(path)


def summary(values: list[float]) -> dict:
    """Median, min and max of repeated measurements (seconds)."""
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values),
            "repeats": len(values)}


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict:
    """Each function ``warmup`` times, then ``repeats`` rounds calling every function once per
    round (so drift hits them all alike); per function the :func:`summary` of its seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: summary(v) for k, v in times.items()}


def finish(result: dict, table: str, out: Optional[Path]) -> int:
    print(table)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**result, "meta": environment()}, indent=2) + "\n")
    return 0
