"""Runtime speed and memory: the lowered program's training step against eager PyTorch.

On the CPU and, where there is one, on a CUDA GPU:

    python -m benchmarks.bench_runtime                  # small and medium on the CPU (and on CUDA)
    python -m benchmarks.bench_runtime --size medium    # one run (device: cuda when available, else cpu)
    python -m benchmarks.bench_runtime --device cpu --size small
    python -m benchmarks.bench_runtime --quick          # tiny config on the CPU, one repeat (tests)

Training step (one micro-batch, forward + loss + backward + gradient clipping + AdamW, the
params' freeze masks, fp32), the same weights, batch and optimizer for every variant:
- ``eager``: the nn.Module, ``torch.autograd.grad`` over the trainable parameters (the peer);
- ``torch.compile``: the same module under ``torch.compile`` (Inductor), same autograd;
- ``reference``: ``Runner.train_step`` executing the lowered program (clipping and AdamW by the
  runtime's optimizer, as for the peers);
- ``compiled``: ``Runner.train_step`` executing the lowered program with the update in it
  (``--optimizer_in_program``: forward, backward, clipping and AdamW in one graph) through
  torch.compile, which writes the new weights and optimizer state into their buffers;
- ``streaming``: ``Runner(..., weight_streaming=True)``: the program (compiled for cs2, as
  ``mmgraph run`` does, for its segments) run segment by segment from a parameter store in host
  memory (pinned on CUDA: each segment's weights copied in, the next prefetched on a side
  stream; gradients back to the store, where clipping and AdamW run). On the CPU nothing is
  copied: the figure is the split's overhead. Compared with ``reference`` (in memory).
Variants run interleaved, median of ``--repeats`` after warm-up (compilation is excluded and
reported separately); on CUDA each timed call is bracketed by ``torch.cuda.synchronize()``.
First call (building the program where it is built, compiling, one step): in each variant's
memory process, a fresh process with an empty Inductor cache of its own (so no variant reuses
another's kernels; ``compiled`` reuses its own across repeated layers); ``--rounds`` such
processes a variant (3), the variants interleaved, the median; also its CPU seconds, the
process's own and its compilers' (g++), which the machine's other jobs move far less.
Peak memory: each variant in a fresh process that has first compiled the step, so every
variant carries the same compiler residue. On the CPU: the high-water RSS during the measured
steps less the RSS after compiling (so: weights, optimizer state, gradients, activations and
workspace; the residue is reported beside). On CUDA: ``torch.cuda.max_memory_allocated`` during
the measured steps less the allocated memory after compiling (the same parts, on the device;
``streaming`` keeps its store in host memory, so only what it streams in counts).

Eval forward (loss + logits): the module under ``no_grad`` (peer), the ``reference`` executor on
the eval program, and (CPU only) ``onnxruntime`` on the ONNX export of the same step.

Targets (issue: runtime): reference <= 1.05x eager, compiled <= 0.8x eager, peak memory
<= 1.2x eager; on a GPU the same on a larger config, and streaming <= 1.3x in-memory at batch >= 8.
"""

from __future__ import annotations

import argparse
import json
import os
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
from benchmarks.targets_runtime import runtime_runs
from mmgraph.core.config import load_params

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
TRAIN = ("eager", "torch.compile", "reference", "compiled", "streaming")
SIZES = ("small", "medium")


def config_path(size: str, workdir: Path) -> Path:
    """The params file for ``size``: tiny and small are in configs/; medium widens small (batch 8)."""
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


def resolve_device(name: str | None) -> str:
    """``cpu`` or ``cuda``; ``auto`` (or none) is cuda when available."""
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def synchronizer(device: torch.device):
    """Waits for the device's queued work (CUDA); nothing on the CPU."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def lowered(params, streaming: bool, update: bool = False):
    """The lowered training step; for weight streaming compiled for cs2 (as `mmgraph run` does),
    whose segments the streaming executor runs (the graph is the same); ``update``: with the
    optimizer update in the program (``--optimizer_in_program``)."""
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.target import load_target

    return compile_step(params, target=load_target("cs2") if streaming else None,
                        optimizer_in_program=update)[-1].program


def _cpu_s() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of its waited-for children so far."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Train:
    """One training step per variant on the same weights, batch and optimizer settings, on ``device``;
    on the CPU every variant under the allocator setting the runtime makes (``keep_freed_memory``:
    it is the process's, so the peers share it)."""

    def __init__(self, params, variants, device: torch.device):
        from mmgraph.models import build_model, initial_weights, random_batch
        from mmgraph.models.anatomy import no_weight_decay
        from mmgraph.runtime.host_memory import keep_freed_memory
        from mmgraph.runtime.optim import Optimizer
        from mmgraph.runtime.regions import prepare
        from mmgraph.runtime.runner import Runner

        if device.type == "cpu":
            keep_freed_memory()         # the runtime's allocator setting, for every variant alike
        batch = random_batch(params.layout(), params.train_input.batch_size, seed=1)
        self.batch = {k: v.to(device) for k, v in batch.items()}
        self.steps, self.compile_s = {}, {}
        sync = synchronizer(device)
        seed = params.runconfig.seed
        programs = {}
        no_decay = no_weight_decay(build_model(params, device="meta")[0])    # every variant: the Model Zoo's rule
        for name in variants:
            start = time.perf_counter()
            if name in ("eager", "torch.compile"):
                model, _ = build_model(params, seed=seed)
                model.to(device)
                named = dict(model.named_parameters())
                train = [k for k, p in named.items() if p.requires_grad]
                opt = Optimizer(params.optimizer, {k: p.data for k, p in named.items()},
                                {k: False for k in no_decay})
                fn = torch.compile(model) if name == "torch.compile" else model
                self.steps[name] = self._eager_step(fn, named, train, opt)
            else:
                streaming, update = name == "streaming", name == "compiled"
                prepare(name, device)           # as `mmgraph run` does: its set-up overlaps the lowering
                if (streaming, update) not in programs:
                    programs[streaming, update] = lowered(params, streaming, update)
                runner = Runner(params, tempfile.mkdtemp(prefix="mmgraph-bench-"), train=programs[streaming, update],
                                device=str(device), executor=name, weight_streaming=streaming,
                                weights=initial_weights(params), no_decay=no_decay)
                self.steps[name] = lambda r=runner: r.train_step([self.batch])
            self.steps[name]()                               # first call: compiles where it does
            sync()
            self.compile_s[name] = time.perf_counter() - start

    def _eager_step(self, fn, named, train, opt):
        def step():
            loss = fn(**self.batch)
            grads = dict(zip(train, torch.autograd.grad(loss, [named[k] for k in train])))
            opt.clip(grads)
            opt.step(grads)
        return step


def time_steps(steps: dict, repeats: int, sync=lambda: None, warmup: int = 2) -> dict:
    """Interleaved rounds after ``warmup``; each call timed between ``sync()`` calls. Each
    variant's median, min and max, and its time in each round (``rounds_s``, for ``paired``)."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - start)
    return {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "rounds_s": v}
            for k, v in times.items()}


PEERS = ("eager", "torch.compile")


def paired(timed: dict, name: str) -> dict[str, float]:
    """``name``'s step against each peer (``PEERS``) timed with it: the median over rounds of its
    time over the peer's in the same round. A round runs the variants one after the other, so a
    change in the machine's speed between rounds (a busy VM's host) cancels, which a ratio of the
    two medians does not."""
    mine = timed[name]["rounds_s"]
    return {p: statistics.median(a / b for a, b in zip(mine, timed[p]["rounds_s"])) for p in PEERS if p in timed}


def eval_steps(params, device: torch.device) -> dict:
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.models import build_model, initial_weights, random_batch
    from mmgraph.runtime.runner import Runner

    eval_params = load_params(params.path, "eval")
    batch = random_batch(eval_params.layout("eval"), eval_params.eval_input.batch_size, seed=2)
    batch = {k: v.to(device) for k, v in batch.items()}
    program = compile_step(eval_params, "eval")[-1].program
    model, _ = build_model(eval_params, seed=eval_params.runconfig.seed)
    model.to(device).eval()
    out = {}

    def eager():
        with torch.no_grad():
            return model.compute_logits(batch["image_data"], batch["text_input_ids"], batch["image_data_loc"],
                                        batch["key_padding_mask"], batch["token_modality_idx"])
    out["eager"] = eager
    for name in ("reference", "onnxruntime") if device.type == "cpu" else ("reference",):
        runner = Runner(eval_params, tempfile.mkdtemp(prefix="mmgraph-bench-"), eval_program=program,
                        device=str(device), eval_executor=name, weights=initial_weights(eval_params))
        out[name] = lambda r=runner: r.eval_exec(r._inputs(program, batch))
    return out


def memory_child(path: str, variant: str, steps: int, device: str) -> dict:
    """Run in a fresh process: the peak memory of ``variant``'s steps above the baseline taken
    after compiling the step: high-water RSS on the CPU, CUDA's peak allocated memory on a GPU
    (where the compiler's residue, host memory, is not reported). On the CPU also what the
    process holds between steps (``held_mb``, RSS after two steps: weights, optimizer state,
    compiled code, and what the allocator kept), so a peak splits into that and the steps' rise.
    The first call also in CPU seconds (``first_call_cpu_s``: this process's, then its children's,
    the compilers Inductor runs), which other jobs on the machine move far less than its wall time."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mmgraph-inductor-")   # compiles from nothing
    params = load_params(path)
    cuda = device == "cuda"
    before = _rss_kb("VmRSS")
    lowered(params, variant == "streaming")   # every variant carries the compiler's residue: the baseline is after it
    base = torch.cuda.memory_allocated() if cuda else _rss_kb("VmRSS")
    cpu = _cpu_s()
    train = Train(params, [variant], torch.device(device))
    fn, first = train.steps[variant], train.compile_s[variant]
    cpu = [b - a for a, b in zip(cpu, _cpu_s())]
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        held = _rss_kb("VmRSS")         # what the process holds between steps: weights, state, compiled code
        Path("/proc/self/clear_refs").write_text("5")         # reset the high-water mark
    for _ in range(steps):
        fn()
    if cuda:
        torch.cuda.synchronize()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "compiler_mb": None,
                "first_call_s": first, "first_call_cpu_s": cpu}
    return {"peak_mb": (_rss_kb("VmHWM") - base) / 1024, "compiler_mb": (base - before) / 1024,
            "held_mb": (held - base) / 1024, "first_call_s": first, "first_call_cpu_s": cpu}


def measure_memory(path: Path, variants, steps: int, device: str, rounds: int = 1) -> dict:
    """``memory_child`` of every variant, ``rounds`` times, the variants interleaved (so a busy
    spell of the machine does not fall on one variant's first call only): each figure the
    median over the rounds (``rounds``: how many)."""
    got: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for v in variants:
            cmd = [sys.executable, "-m", "benchmarks.bench_runtime", "--memory-child", v, "--params", str(path),
                   "--steps", str(steps), "--device", device]
            res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
            got[v].append(json.loads(res.stdout.strip().splitlines()[-1]))
    out = {}
    for v, runs in got.items():
        row = {k: (None if runs[0][k] is None else statistics.median(r[k] for r in runs))
               for k in runs[0] if k != "first_call_cpu_s"}
        row["first_call_cpu_s"] = [statistics.median(r["first_call_cpu_s"][i] for r in runs) for i in (0, 1)]
        out[v] = {**row, "rounds": rounds}
    return out


def run(size: str, repeats: int, memory: bool = True, variants=TRAIN, device: str = "cpu", rounds: int = 3) -> dict:
    """One (device, size) run: the training step of every variant, the eval forward, peak memory
    and first calls (``rounds`` fresh processes a variant)."""
    start = time.perf_counter()
    dev = torch.device(device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = config_path(size, Path(tmp))
        params = load_params(path)
        bench = Train(params, variants, dev)
        train = time_steps(bench.steps, repeats, synchronizer(dev))
        ev = time_steps(eval_steps(params, dev), repeats, synchronizer(dev))
        measured = (measure_memory(path, variants, 3 if repeats > 1 else 1, device, rounds if repeats > 1 else 1)
                    if memory else {})
    mem = {k: v["peak_mb"] for k, v in measured.items()}
    residue = max((v["compiler_mb"] for v in measured.values() if v["compiler_mb"] is not None), default=None)
    base = train["eager"]["median_s"]
    rows = [{"variant": k, **v, "ratio": v["median_s"] / base, "paired": paired(train, k),
             "first_call_s": measured[k]["first_call_s"] if k in measured else bench.compile_s[k],
             "first_call_in_run_s": bench.compile_s[k],
             "first_call_cpu_s": measured[k]["first_call_cpu_s"] if k in measured else None,
             "first_call_rounds": measured[k]["rounds"] if k in measured else 1,
             "peak_mb": mem.get(k), "memory_ratio": mem[k] / mem["eager"] if mem else None,
             "held_mb": measured.get(k, {}).get("held_mb")}
            for k, v in train.items()]
    ebase = ev["eager"]["median_s"]
    erows = [{"variant": k, **v, "ratio": v["median_s"] / ebase} for k, v in ev.items()]
    streaming = (train["streaming"]["median_s"] / train["reference"]["median_s"]
                 if {"streaming", "reference"} <= set(train) else None)
    return {"device": device, "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "size": size, "batch": params.train_input.batch_size, "threads": torch.get_num_threads(),
            "repeats": repeats, "train": rows, "eval": erows, "streaming_vs_in_memory": streaming,
            "compiler_residue_mb": residue, "wall_s": time.perf_counter() - start}


def cases(size: str | None, device: str | None, quick: bool) -> list[tuple[str, str]]:
    """The (device, size) runs: tiny on the CPU when quick; one when either is named; else small
    and medium on the CPU, and on CUDA as well where there is a GPU."""
    if quick:
        return [(resolve_device(device) if device else "cpu", "tiny")]
    if size or device:
        return [(resolve_device(device), size or "small")]
    devices = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    return [(d, s) for d in devices for s in SIZES]


def _run_table(r: dict, cpu: str | None = None) -> str:
    cuda = r.get("device") == "cuda"
    where = f"CUDA ({r.get('gpu')})" if cuda else f"CPU ({cpu})" if cpu else "CPU"
    peak = "peak: CUDA memory allocated" if cuda else "peak: RSS"
    head = (f"Training step, {r['size']} config, {where}, batch {r['batch']}, {r['threads']} threads, "
            f"median of {r['repeats']} ({peak}; / eager and / torch.compile: the median of the rounds' ratios, "
            "each round running every variant once, one after the other):")
    lines = [head, "",
             "| variant | ms (median) | min | max | / eager | / torch.compile | first call s (fresh process) "
             "| its CPU s (own + compilers) | peak MB | memory / eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rounds = max((row.get("first_call_rounds", 1) for row in r["train"]), default=1)
    for row in r["train"]:
        mem = f"{row['peak_mb']:.0f} | {row['memory_ratio']:.2f}" if row["peak_mb"] is not None else "- | -"
        cpu = row.get("first_call_cpu_s")
        cpu = f"{sum(cpu):.0f} ({cpu[0]:.0f} + {cpu[1]:.0f})" if cpu else "-"
        pair = row.get("paired") or {}
        vs = " | ".join(f"{pair[p]:.2f}" if p in pair else "-" for p in PEERS)
        lines.append(f"| {row['variant']} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['max_s'] * 1e3:.1f} | {vs} | {row['first_call_s']:.1f} | {cpu} | {mem} |")
    if rounds > 1:
        lines += ["", f"First calls and peaks: the median of {rounds} fresh processes a variant, the variants "
                      "interleaved."]
    if r.get("streaming_vs_in_memory") is not None:
        how = ("store in pinned host memory: weights copied in per segment, gradients copied back, clipping "
               "and AdamW on the CPU; its peak is the device memory only" if cuda else
               "nothing is copied on the CPU: the cost of running the program segment by segment")
        lines += ["", (f"Weight streaming / in-memory (`reference`), batch {r['batch']}: "
                       f"**{r['streaming_vs_in_memory']:.2f}x** ({how}).")]
    if r.get("compiler_residue_mb") is not None:
        lines += ["", (f"Compiler residue held by every variant's process (not in the peaks above): "
                       f"{r['compiler_residue_mb']:.0f} MB.")]
    lines += ["", f"Eval forward (loss + logits), {r['size']} config, {where}:", "",
              "| variant | ms (median) | min | max | / eager |", "|---|---|---|---|---|"]
    for row in r["eval"]:
        lines.append(f"| {row['variant']} | {row['median_s'] * 1e3:.1f} | {row['min_s'] * 1e3:.1f} | "
                     f"{row['max_s'] * 1e3:.1f} | {row['ratio']:.2f} |")
    return "\n".join(lines)


def format_table(r: dict) -> str:
    """Every run of a results file (or one run), one after the other; the CPU's model where the
    file records it (the GEMM kernels, and so the compiled step's lead, depend on it)."""
    cpu = (r.get("meta") or {}).get("cpu")
    return "\n\n".join(_run_table(x, cpu) for x in runtime_runs(r))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small", "medium"),
                    help="one size (default, with neither --size nor --device: small and medium)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"),
                    help="one device (auto: cuda when available; default, with neither: the CPU and CUDA if any)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes a variant for first calls and peaks")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.params, args.memory_child, args.steps, args.device)))
        return 0
    runs = []
    for device, size in cases(args.size, args.device, args.quick):
        runs.append(run(size, 1 if args.quick else args.repeats, device=device, rounds=args.rounds))
        print(f"{device} {size}: {runs[-1]['wall_s']:.0f} s", file=sys.stderr)
    result = {"runs": runs, "versions": {"torch": torch.__version__}}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
