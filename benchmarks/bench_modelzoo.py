"""Training steps/s of mmgraph and of the Cerebras Model Zoo 2.10 trainer on the same tiny config,
data and initial weights (the parity fixture: ``tests/fixtures/modelzoo``, mm_simple).

    python -m benchmarks.bench_modelzoo                 # 5 alternating rounds of 10 steps each
    python -m benchmarks.bench_modelzoo --quick         # mmgraph only, 1 round of 3 steps (tests)

Each round runs both tools in fresh processes, one after the other (the order flips every
round, so drift hits both alike), from the fixture's ``initial.mdl`` with its 2.10 params file:
``mmgraph run CPU --mode train`` and ``cszoo fit --target_device CPU``. A step's time is measured
the same way for both: the arrival of the tool's step-1 log line to that of its last step's line
(unbuffered output read as it comes), over the steps after the first (which holds warm-up);
set-up, compilation and the first step are excluded. One torch thread for both
(``OMP_NUM_THREADS=1``). The figure is the median over rounds of steps/s, and mmgraph's ratio to
the Model Zoo.

The Model Zoo runs only where its venv is: ``$MODELZOO_VENV`` (a venv with cerebras-pytorch 2.10
and the Model Zoo installed, ``bin/cszoo``), else ``/work/mz/venv``; docs/params.md has the
recipe. Without it the Model Zoo's figure is recorded as skipped.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from benchmarks.common import ROOT, finish

FIX = ROOT / "tests" / "fixtures" / "modelzoo"
PARAMS = FIX / "params_mm_simple_tiny_phase2.yaml"
INITIAL = FIX / "mm_simple" / "initial.mdl"
_MMGRAPH_STEP = re.compile(r"^step (\d+)/\d+\s+loss ([0-9.]+)")
_MZ_STEP = re.compile(r"Train Device=\S+, Step=(\d+), Loss=([0-9.]+)")


def modelzoo_cli() -> Optional[Path]:
    for venv in (os.environ.get("MODELZOO_VENV"), "/work/mz/venv"):
        if venv and (Path(venv) / "bin" / "cszoo").is_file():
            return Path(venv) / "bin" / "cszoo"
    return None


def _timed_run(cmd: list[str], pattern: re.Pattern, steps: int, env: dict) -> dict:
    """Run ``cmd`` in the fixture folder; the arrival time and loss of each step's line."""
    seen: dict[int, tuple[float, float]] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=FIX, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        tail = (tail + [line])[-20:]
        m = pattern.search(line)
        if m and int(m.group(1)) not in seen:
            seen[int(m.group(1))] = (now, float(m.group(2)))
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0 or 1 not in seen or steps not in seen:
        raise RuntimeError(f"{cmd[0]} failed (rc {rc}, steps seen {sorted(seen)}):\n{''.join(tail)}")
    timed = seen[steps][0] - seen[1][0]
    return {"steps_per_s": (steps - 1) / timed, "seconds_per_step": timed / (steps - 1), "wall_s": wall,
            "first_loss": seen[1][1], "losses": [seen[k][1] for k in sorted(seen)]}


def run_mmgraph(out: Path, steps: int, env: dict) -> dict:
    cmd = [str(Path(sys.executable).parent / "mmgraph"), "run", "CPU", "--mode", "train", "--params", str(PARAMS),
           "--model_dir", str(out), "--checkpoint_path", str(INITIAL), "--max_steps", str(steps)]
    result = _timed_run(cmd, _MMGRAPH_STEP, steps, env)
    import json  # the printed loss has 4 decimals; metrics.jsonl all
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    result["first_loss"], result["losses"] = losses[0], losses
    return result


def run_modelzoo(cli: Path, out: Path, steps: int, env: dict) -> dict:
    cmd = [str(cli), "fit", str(PARAMS), "--target_device", "CPU", "-o", str(out), "--checkpoint_path", str(INITIAL)]
    return _timed_run(cmd, _MZ_STEP, steps, env)


def run(rounds: int, steps: int, with_modelzoo: bool = True) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cli = modelzoo_cli() if with_modelzoo else None
    runs: dict[str, list[dict]] = {"mmgraph": [], "modelzoo": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            order = ["mmgraph", "modelzoo"] if r % 2 == 0 else ["modelzoo", "mmgraph"]
            for tool in order:
                out = Path(tmp) / f"{tool}_{r}"
                if tool == "mmgraph":
                    runs[tool].append(run_mmgraph(out, steps, env))
                elif cli is not None:
                    runs[tool].append(run_modelzoo(cli, out, steps, env))
    result: dict = {"config": "tests/fixtures/modelzoo/params_mm_simple_tiny_phase2.yaml", "rounds": rounds,
                    "steps": steps, "runs": runs, "loadavg": os.getloadavg()}
    for tool, rs in runs.items():
        if rs:
            v = [x["steps_per_s"] for x in rs]
            result[tool] = {"median_steps_per_s": statistics.median(v), "min": min(v), "max": max(v),
                            "first_loss": rs[0]["first_loss"], "median_wall_s": statistics.median(x["wall_s"] for x in rs)}
    if runs["mmgraph"] and runs["modelzoo"]:
        result["ratio"] = result["mmgraph"]["median_steps_per_s"] / result["modelzoo"]["median_steps_per_s"]
    else:
        result["modelzoo_skipped"] = ("not asked (--quick)" if not with_modelzoo else
                                      "no Model Zoo venv ($MODELZOO_VENV or /work/mz/venv with bin/cszoo)")
    return result


def format_table(r: dict) -> str:
    rows = ["| tool | steps/s (median) | min | max | wall per run (set-up included) | first loss |",
            "|---|---|---|---|---|---|"]
    for tool, name in (("mmgraph", "mmgraph (`mmgraph run`, reference executor)"),
                       ("modelzoo", "Model Zoo 2.10 (`cszoo fit`, CPU)")):
        s = r.get(tool)
        if s:
            rows.append(f"| {name} | {s['median_steps_per_s']:.2f} | {s['min']:.2f} | {s['max']:.2f} | "
                        f"{s['median_wall_s']:.1f} s | {s['first_loss']:.7g} |")
        else:
            rows.append(f"| {name} | skipped: {r.get('modelzoo_skipped', '?')} | | | | |")
    text = "\n".join(rows)
    if "ratio" in r:
        text += (f"\n\nmmgraph / Model Zoo: **{r['ratio']:.1f}x** the steps/s ({r['rounds']} alternating rounds of "
                 f"{r['steps']} steps, steps 2-{r['steps']} timed; load average {r['loadavg'][0]:.1f} on "
                 f"{os.cpu_count()} cores at the end: other work shared the machine). The Model Zoo logs its loss "
                 "with 5 decimals.")
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="mmgraph only, 1 round of 3 steps")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run(1, 3, with_modelzoo=False) if args.quick else run(args.rounds, 10)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
