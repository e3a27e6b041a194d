"""Start-up: ``mmgraph run --max_steps 1`` with a matching program artifact against tracing.

    python -m benchmarks.bench_startup            # small config; 7B-shaped compile vs artifact load
    python -m benchmarks.bench_startup --quick    # tiny config, one repeat, no 7B (tests)

Measured: a fresh ``mmgraph run CPU --max_steps 1`` process, from its start to the moment its
first step's line is printed (so Python and torch imports, params, data, program, one step), in
a model_dir whose ``programs/`` matches (the run loads the artifact) and in one without (the run
traces and lowers); repeats interleaved, medians; each repeat starts from a fresh model_dir
(copied artifact or none), so nothing resumes. Also the 7B-shaped figure: the LLaVA-7B phase-2
train step traced and lowered for cs2 on the meta device (``compile_step``) against
``artifact.save`` and ``artifact.load`` of its program.

Target (issue 16): start-up with the artifact <= 0.3x start-up with tracing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import finish, rel, summary

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
BIG2 = ROOT / "configs" / "params_mm_llava_llama2_7b_phase2.yaml"


def _data(config: Path, folder: Path) -> Path:
    """Synthetic conversations preprocessed for ``config``'s layout; a params file reading them."""
    from mmgraph.core.config import load_params
    from mmgraph.data.preprocess import Layout, preprocess
    from mmgraph.data.synth import synth

    synth(folder, num_train=32, num_eval=4, seed=3)
    lay = load_params(config).layout()
    preprocess(str(folder / "phase1_train.json"), str(folder / "images"), str(folder / "tokenizer"),
               str(folder / "train"), 2, Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img),
               progress=False)
    raw = yaml.safe_load(config.read_text())
    raw["train_input"].update(data_dir=str(folder / "train"), img_data_dir=str(folder / "images"), num_workers=0)
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _to_first_step(params: Path, model_dir: Path) -> tuple[float, str]:
    """Seconds from process start to its first step's line, and how it got its program."""
    cmd = [sys.executable, "-m", "mmgraph", "run", "CPU", "--params", str(params), "--model_dir", str(model_dir),
           "--max_steps", "1"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    how, seconds = "?", None
    for line in proc.stdout:
        if line.startswith("loaded program"):
            how = "artifact"
        elif line.startswith("compiling train"):
            how = "traced"
        if line.startswith("step 1/1") and seconds is None:
            seconds = time.perf_counter() - start
    if proc.wait(timeout=900) != 0 or seconds is None:
        raise RuntimeError(f"{' '.join(cmd)} failed")
    return seconds, how


def measure(config: Path, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mmgraph-bench-startup-") as tmp:
        folder = Path(tmp)
        params = _data(config, folder)
        built = folder / "built"
        subprocess.run([sys.executable, "-m", "mmgraph", "compile", "--params", str(params), "--model_dir",
                        str(built)], check=True, capture_output=True, timeout=900)
        times: dict[str, list[float]] = {"artifact": [], "traced": []}
        for i in range(repeats + 1):                  # the first round warms the file cache
            for how in ("artifact", "traced"):
                md = folder / f"run-{how}-{i}"
                if how == "artifact":
                    shutil.copytree(built / "programs", md / "programs")
                seconds, got = _to_first_step(params, md)
                if got != how:
                    raise RuntimeError(f"expected the run to be {how}, it was {got}")
                if i:
                    times[how].append(seconds)
                shutil.rmtree(md)
    out = {k: summary(v) for k, v in times.items()}
    return {"config": rel(config), **out, "ratio": out["artifact"]["median_s"] / out["traced"]["median_s"]}


def big(config: Path = BIG2) -> dict:
    """The 7B-shaped program: trace + lower against saving and loading its artifact."""
    from mmgraph.compiler import artifact
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    params = load_params(config)
    start = time.perf_counter()
    program = compile_step(params, "train", target=load_target("cs2"))[-1].program
    compile_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        where = artifact.save(Path(tmp) / "train", program, artifact.fingerprint(params, "train", target="cs2"))
        save_s = time.perf_counter() - start
        start = time.perf_counter()
        artifact.load(where)
        load_s = time.perf_counter() - start
        size = (where / "program.json").stat().st_size
    return {"config": rel(config), "ops": len(program.ops()), "compile_s": compile_s, "save_s": save_s,
            "load_s": load_s, "artifact_mb": size / 1e6, "ratio": load_s / compile_s}


def format_table(r: dict) -> str:
    a, t = r["artifact"], r["traced"]
    lines = [f"Start-up of `mmgraph run --max_steps 1` ({r['config']}): process start to the first step's line, "
             f"median of {a['repeats']}", "",
             "| program | median (s) | min | max |", "|---|---|---|---|",
             f"| loaded from the artifact | {a['median_s']:.2f} | {a['min_s']:.2f} | {a['max_s']:.2f} |",
             f"| traced and lowered | {t['median_s']:.2f} | {t['min_s']:.2f} | {t['max_s']:.2f} |",
             "", f"Artifact / tracing: {r['ratio']:.2f}x (target <= 0.3x)."]
    b = r.get("big")
    if b:
        lines += ["", f"7B-shaped ({b['config']}, {b['ops']:,} ops): trace + lower {b['compile_s']:.1f} s; artifact "
                  f"save {b['save_s']:.1f} s, load {b['load_s']:.1f} s ({b['artifact_mb']:.0f} MB of JSON): "
                  f"load / compile {b['ratio']:.2f}x."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, one repeat, no 7B")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 5)
    result = measure(TINY if args.quick else SMALL, repeats)
    if not args.quick:
        result["big"] = big()
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    sys.exit(main())
