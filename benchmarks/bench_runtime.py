"""Runtime speed and memory: the lowered program's training step against eager PyTorch.

    python -m benchmarks.bench_runtime                  # small config (the issue's), CPU
    python -m benchmarks.bench_runtime --size medium    # a wider, deeper one
    python -m benchmarks.bench_runtime --quick          # tiny config, one repeat (tests)

Training step (one micro-batch, forward + loss + backward + gradient clipping + AdamW, the
params' freeze masks, fp32), the same weights, batch and optimizer for every variant:
- ``eager``: the nn.Module, ``torch.autograd.grad`` over the trainable parameters (the peer);
- ``torch.compile``: the same module under ``torch.compile`` (Inductor), same autograd;
- ``reference`` / ``compiled``: ``Runner.train_step`` executing the lowered program with that
  executor.
Variants run interleaved, median of ``--repeats`` after warm-up (compilation is excluded and
reported separately). Peak memory: each variant in a fresh process that has first compiled the
step (so every variant carries the same compiler residue: imported toolchain, the program's
graph; reported beside the table); the high-water RSS during the measured steps less the RSS
after that (so: weights, optimizer state, gradients, activations and workspace).

Eval forward (loss + logits): the module under ``no_grad`` (peer), the ``reference`` executor on
the eval program, and ``onnxruntime`` on the ONNX export of the same step.

Targets (issue: runtime): reference <= 1.05x eager, compiled <= 0.8x eager, peak memory
<= 1.2x eager.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import finish
from mmgraph.config import load_params

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
TRAIN = ("eager", "torch.compile", "reference", "compiled")
EVAL = ("eager", "reference", "onnxruntime")


def config_path(size: str, workdir: Path) -> Path:
    """The params file for ``size``: tiny and small are in configs/; medium widens small."""
    if size == "tiny":
        return TINY
    if size == "small":
        return SMALL
    raw = yaml.safe_load(SMALL.read_text())
    vit = raw["model"]["image_model_list"]["image_models"][0]["image_model"][0]
    vit.update(hidden_size=256, num_hidden_layers=4, num_heads=8, filter_size=1024)
    proj = raw["model"]["image_model_list"]["global_image_projection"]
    proj.update(input_unit=256, layers_units=[512, 512])
    raw["model"]["text_model"].update(hidden_size=512, num_hidden_layers=8, num_heads=8, filter_size=1376,
                                      rotary_dim=64, vocab_size=4096)
    path = workdir / "medium.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Train:
    """One training step per variant on the same weights, batch and optimizer settings."""

    def __init__(self, params, variants):
        from mmgraph.models import build_model, random_batch
        from mmgraph.pipeline import compile_step
        from mmgraph.runtime.optim import Optimizer
        from mmgraph.runtime.runner import Runner

        self.batch = random_batch(params.layout(), params.train_input.batch_size, seed=1)
        self.steps, self.compile_s = {}, {}
        seed = params.runconfig.seed
        program = None
        for name in variants:
            start = time.perf_counter()
            if name in ("eager", "torch.compile"):
                model, _ = build_model(params, seed=seed)
                named = dict(model.named_parameters())
                train = [k for k, p in named.items() if p.requires_grad]
                opt = Optimizer(params.optimizer, {k: p.data for k, p in named.items()})
                fn = torch.compile(model) if name == "torch.compile" else model
                self.steps[name] = self._eager_step(fn, named, train, opt)
            else:
                if program is None:
                    program = compile_step(params)[-1].program
                runner = Runner(params, tempfile.mkdtemp(prefix="mmgraph-bench-"), train=program, executor=name)
                self.steps[name] = lambda r=runner: r.train_step([self.batch])
            self.steps[name]()                               # first call: compiles where it does
            self.compile_s[name] = time.perf_counter() - start

    def _eager_step(self, fn, named, train, opt):
        def step():
            loss = fn(**self.batch)
            grads = dict(zip(train, torch.autograd.grad(loss, [named[k] for k in train])))
            opt.clip(grads)
            opt.step(grads)
        return step


def time_steps(steps: dict, repeats: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)} for k, v in times.items()}


def eval_steps(params) -> dict:
    from mmgraph.models import build_model, random_batch
    from mmgraph.pipeline import compile_step
    from mmgraph.runtime.runner import Runner

    eval_params = load_params(params.path, "eval")
    batch = random_batch(eval_params.layout("eval"), eval_params.eval_input.batch_size, seed=2)
    program = compile_step(eval_params, "eval")[-1].program
    model, _ = build_model(eval_params, seed=eval_params.runconfig.seed)
    model.eval()
    out = {}

    def eager():
        with torch.no_grad():
            return model.compute_logits(batch["image_data"], batch["text_input_ids"], batch["image_data_loc"],
                                        batch["key_padding_mask"], batch["token_modality_idx"])
    out["eager"] = eager
    for name in ("reference", "onnxruntime"):
        runner = Runner(eval_params, tempfile.mkdtemp(prefix="mmgraph-bench-"), eval_program=program,
                        eval_executor=name)
        out[name] = lambda r=runner: r.eval_exec(r._inputs(program, batch))
    return out


def memory_child(path: str, variant: str, steps: int) -> dict:
    """Run in a fresh process: peak RSS of ``variant``'s steps above the pre-model baseline."""
    from mmgraph.pipeline import compile_step

    params = load_params(path)
    before = _rss_kb("VmRSS")
    compile_step(params)          # every variant carries the compiler's residue: the baseline is after it
    base = _rss_kb("VmRSS")
    bench = Train(params, [variant])
    fn = bench.steps[variant]
    fn()
    Path("/proc/self/clear_refs").write_text("5")             # reset the high-water mark
    for _ in range(steps):
        fn()
    return {"peak_mb": (_rss_kb("VmHWM") - base) / 1024, "compiler_mb": (base - before) / 1024}


def measure_memory(path: Path, variants, steps: int) -> dict:
    out = {}
    for v in variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_runtime", "--memory-child", v, "--params", str(path),
               "--steps", str(steps)]
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
        out[v] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def run(size: str, repeats: int, memory: bool = True, variants=TRAIN) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = config_path(size, Path(tmp))
        params = load_params(path)
        bench = Train(params, variants)
        train = time_steps(bench.steps, repeats)
        ev = time_steps(eval_steps(params), repeats)
        measured = measure_memory(path, variants, 3 if repeats > 1 else 1) if memory else {}
    mem = {k: v["peak_mb"] for k, v in measured.items()}
    residue = max((v["compiler_mb"] for v in measured.values()), default=None)
    base = train["eager"]["median_s"]
    rows = [{"variant": k, **v, "ratio": v["median_s"] / base, "first_call_s": bench.compile_s[k],
             "peak_mb": mem.get(k), "memory_ratio": mem[k] / mem["eager"] if mem else None}
            for k, v in train.items()]
    ebase = ev["eager"]["median_s"]
    erows = [{"variant": k, **v, "ratio": v["median_s"] / ebase} for k, v in ev.items()]
    return {"size": size, "batch": params.train_input.batch_size, "threads": torch.get_num_threads(),
            "repeats": repeats, "train": rows, "eval": erows, "compiler_residue_mb": residue,
            "versions": {"torch": torch.__version__}}


def format_table(r: dict) -> str:
    lines = [f"Training step, {r['size']} config, batch {r['batch']}, {r['threads']} threads, median of {r['repeats']}:",
             "", "| variant | ms (median) | min | max | / eager | first call s | peak MB | memory / eager |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["train"]:
        mem = f"{row['peak_mb']:.0f} | {row['memory_ratio']:.2f}" if row["peak_mb"] is not None else "- | -"
        lines.append(f"| {row['variant']} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['max_s'] * 1e3:.1f} | {row['ratio']:.2f} | {row['first_call_s']:.1f} | {mem} |")
    if r.get("compiler_residue_mb") is not None:
        lines += ["", f"Compiler residue held by every variant's process (not in the peaks above): "
                      f"{r['compiler_residue_mb']:.0f} MB."]
    lines += ["", "Eval forward (loss + logits):", "", "| variant | ms (median) | min | max | / eager |",
              "|---|---|---|---|---|"]
    for row in r["eval"]:
        lines.append(f"| {row['variant']} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['max_s'] * 1e3:.1f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small", "medium"), default="small")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.params, args.memory_child, args.steps)))
        return 0
    result = run("tiny", 1) if args.quick else run(args.size, args.repeats)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
