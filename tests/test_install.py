"""A non-editable install works: the wheel carries everything `mmgraph compile` needs.

Builds the wheel from a copy of the source tree, installs it into a temporary folder and compiles
the tiny config on cs2 from outside the source tree (the shipped targets and the model folder
are found through the installed package, not the checkout's layout).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SKIP = shutil.ignore_patterns(".venv", ".git", "model_dir", "build", "*.egg-info", "__pycache__",
                               ".pytest_cache", ".hypothesis", "results", "plots")


def _run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_install_compiles_tiny_on_cs2(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    built = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                  "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("mmgraph-*.whl"))
    site = tmp_path / "site"
    installed = _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                      str(wheel)], cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr

    # The installed copy comes first on the path; run from a folder that is not the checkout.
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = _run([sys.executable, "-c", "import mmgraph.passes, mmgraph.configs; "
                  "print(mmgraph.passes.__file__); print(mmgraph.configs.__file__)"], cwd=tmp_path, env=env)
    assert where.returncode == 0, where.stderr
    assert all(line.startswith(str(site)) for line in where.stdout.split()), where.stdout

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "configs" / "params_mm_llava_tiny_phase1.yaml", params)
    out = _run([sys.executable, "-m", "mmgraph", "compile", "--params", str(params), "--model_dir",
                str(tmp_path / "md"), "--target", "cs2"], cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "on cs2" in out.stdout
    assert (tmp_path / "md" / "compile" / "report.json").is_file()
