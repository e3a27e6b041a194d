"""The prose of BENCHMARKS.md (benchmarks/report.py renders it around the tables): each
section's title and introduction, and the notes that depend on a results file (what a figure
means, why a target is missed)."""

from __future__ import annotations

from benchmarks.targets_runtime import runtime_runs

# -- texts ---------------------------------------------------------------------------------------
TITLES = {
    "modelzoo": "mmgraph and the Model Zoo's trainer (`benchmarks/bench_modelzoo.py`)",
    "compile": "Compile (`benchmarks/bench_compile.py`)",
    "simulator": "Simulator fidelity (`benchmarks/bench_simulator.py`)",
    "runtime": "Runtime speed and memory (`benchmarks/bench_runtime.py`)",
    "freeze": "Freezing: phase 1 against phase 2 (`benchmarks/bench_freeze.py`)",
    "data": "Data (`benchmarks/bench_data.py`)",
    "convert": "Checkpoint conversion memory (`benchmarks/bench_convert.py`)",
    "generate": "Generation (`benchmarks/bench_generate.py`)",
    "remat": "Activation recomputation (`benchmarks/bench_remat.py`)",
    "packing": "Sequence packing (`benchmarks/bench_packing.py`)",
    "data_parallel": "Data parallelism (`benchmarks/bench_data_parallel.py`)",
    "startup": "Start-up with the program artifact (`benchmarks/bench_startup.py`)",
    "legalize": "Legalization for the wafer and the vendor's lowering (`benchmarks/bench_legalize.py`)",
    "memory": "The memory model on the Model Zoo's micro-batches (`benchmarks/bench_memory.py`)",
    "gpu_cluster": "LLaVA-1.5 on 8 A100s: predicted against published (`benchmarks/bench_gpu_cluster.py`)",
}

INTRO = {
    "memory": """\
Every multimodal params file of the Model Zoo (Release_2.3.1 on cs2, Release_2.10.0 on cs3)
compiled at the micro-batch it ships, with the memory plan the compiler chose among the target's
mechanisms (docs/targets.md, "The memory model of weight streaming"): activation recomputation per
layer, segments that run their micro-batch in pieces (how many segments, the smallest piece in
samples), layers whose kept activations are offloaded to MemoryX (and the bytes that go out and
come back per micro-step). The peak is the simulated one, the planner's estimate in parentheses.
Predicted, not measured: the vendor publishes no step times for these files. The choice rests on
two assumptions stated in the target files: a piece costs 10 us per segment, and offload moves at
the weight link's rate. Then `micro_batch_size: explore` on the two 7B phase-2 files: every
micro-batch from 1 to the batch size, from one trace.""",
    "gpu_cluster": """\
The LLaVA-1.5 7B recipes (haotian-liu/LLaVA `scripts/v1_5/pretrain.sh`, `finetune.sh`) on 8 A100s,
predicted by the GPU cluster model (weights resident, data parallel with ZeRO-2 / ZeRO-3,
gradient checkpointing, eager PyTorch kernels at published microbenchmark efficiencies:
docs/targets.md) next to the times the LLaVA authors published in their README. The model is the
Model Zoo's LLaVA-1.5 7B (Release_2.10.0 params) with the recipe's global batch and per-GPU batch,
compiled at the padded length of an average batch, with the dataset's mean real tokens. The
length statistics are assumptions, derived below from the data files' published sizes; nothing
is fitted to the published times. The published times are wall-clock runs that include data
loading (images decoded and transformed on the CPU), logging and checkpointing, which the
prediction does not model.""",
    "compile": """\
`mmgraph compile` (default target cs2) of the LLaVA-7B phase-2 params (CLIP ViT-L/14-336 +
LLaMA-2-7B, train step: forward + loss + backward, micro-batch 2 at sequence 2048, no weights
allocated; all six passes and every dump, report.html included), with the LLM's depth set to
8, 16 and 32 layers. Each run is a fresh process, so the time includes Python start-up and
imports (about 3 s) and the peak RSS is the whole process; one untimed warm-up run first.

Peers, on the small config (`configs/params_mm_llava_small.yaml`), in the same run:

- **torch.compile**: the same training step (the nn.Module from `build_model`, one micro-batch
  from `random_batch`, `loss = model(**batch)`, `torch.autograd.grad` over the trainable
  parameters); the first call of `torch.compile(model)` forward + backward, each in a fresh
  process with a fresh, empty Inductor cache folder and the FX-graph and AOT-autograd caches
  off. Timed from after imports, model build and one eager step. Against it, `mmgraph compile`
  of the same params in a fresh process, timed from after `import torch` and mmgraph's modules.
  The two do different work towards the same step: mmgraph traces, lowers, simulates and writes
  every dump and report.html but generates no code; Inductor generates and compiles C++ kernels
  for the forward and the backward. The ratio is what a user waits before the first step.
  torch.compile's first call takes tens of seconds on 2 cores, so it is repeated **3 times**,
  not 5; `mmgraph compile` 5 times; the two alternate.
- **torch-mlir**: `mmgraph.report.formats.to_mlir` (torch-mlir's FX importer, into the torch dialect)
  of the lowered program, against our own trace (`trace_step`: torch.export and the joint
  forward + backward trace under fake tensors) and the whole `compile_step` (trace and passes),
  alternating in one process after a warm-up of each; 5 repeats. It imports a graph we have
  already traced, so it is the cost of the MLIR dump, not a second way to get the graph.""",
    "simulator": """\
The step time predicted on the `host` target (calibrated right before, in the same run: the
figures `mmgraph calibrate` writes, measured in the benchmark's process) against the measured
step on the same machine, two ways, interleaved: the runtime executing the lowered program
(`Runner.train_step`, reference executor: forward + loss + backward, gradient clipping, AdamW)
and eager PyTorch (the nn.Module, forward + backward + `torch.optim.AdamW`, the same weights
and batch). fp32, one micro-batch of 8; median after 3 warm-ups, with min and max. The target
is judged against the runtime's step, the thing the schedule predicts; eager is shown beside it.
The runtime's step is also split as the schedule splits it: the program alone
(`Runner.micro_step`, timed in the same rounds) against the predicted micro-step, and the rest
(clipping and AdamW) against the predicted optimizer time. The host target's figures are
measured, not fitted to these configs: the per-op overhead and the share of its roofline an op
reaches inside a step (op efficiency) are solved from two generic `torch.nn.TransformerEncoder`
training steps traced to ATen and run the way the runtime runs a program; the optimizer figures
from the runtime's own clipping + AdamW over generic tensors. Calibration and measurement each
take seconds of a shared machine, and a calibration that lands in a slow spell is far off, so the
whole (calibrate, predict, measure) runs in rounds (3 in `make bench`): the median round is
reported, with every round's ratio.""",
    "runtime": """\
Training step (one micro-batch, forward + loss + backward + gradient clipping + AdamW, the
params' freeze masks, fp32), the same weights, batch and optimizer for every variant: `eager`
(the nn.Module, `torch.autograd.grad` over the trainable parameters: the peer),
`torch.compile` (the same module under Inductor), `Runner.train_step` executing the lowered
program with the `reference` and `compiled` executors, and `streaming` (`--weight_streaming`:
the program, compiled for cs2's segments, run segment by segment from a parameter store in host
memory, pinned on CUDA, with each segment's weights copied in and the next prefetched on a side
stream; on the CPU nothing is copied), compared with `reference` (in memory) at the same batch.
Each (device, size) is one run: small and medium on the CPU, and on CUDA where there is a GPU.
Variants interleaved, median after warm-up (on CUDA each timed call is bracketed by
`torch.cuda.synchronize()`); a step's ratio to a peer (eager, torch.compile) is the median over
rounds of its time over the peer's in the same round (each round runs every variant once, one
after the other), so a change in a shared machine's speed between rounds cancels; the first call (compilation where there is one) is reported
separately, with Inductor's default on-disk cache, which an earlier run may have filled (the cold
compile is measured in the compile section). Peak memory: each variant in a fresh process that has
first compiled the step (so every variant carries the same compiler residue); on the CPU the
high-water RSS during the measured steps less the RSS after compiling (the residue reported
beside), on CUDA `torch.cuda.max_memory_allocated()` less the allocated memory after compiling
(`streaming`'s store is in host memory: only what it streams in counts). Eval forward (loss +
logits): the module under `no_grad` (the peer), the `reference` executor on the eval program,
and, on the CPU, onnxruntime on the ONNX export of the same step.""",
    "freeze": """\
The small config with `model.freeze` set to phase 1 (`^image_model.image_model_list`,
`^text_model`: only the projector trains) and to phase 2 (`^image_model.image_model_list`), each
compiled (`compile_step`) and its lowered program executed by `Runner` (reference executor) on
the same seeded weights and batch. Measured, interleaved across the phases, median after
warm-up: the program alone (forward + loss + backward, `Runner.micro_step`) and the whole
training step (`Runner.train_step`: program, clipping, AdamW). Analytic, from the lowered
programs: forward and backward FLOPs, gradient outputs and their bytes. Phase 2 is the peer.""",
    "remat": """\
Predicted by the cost pass (no measurement): the Model Zoo's own
`params_mm_llava_llama2_7b_phase2.yaml` (Release_2.3.1, copied verbatim to `tests/data/modelzoo/`:
micro-batch 24 of 216, sequence 2048, bf16) compiled for cs2 and cs3 with each remat policy at
micro-batch 24, and without recomputation at the largest micro-batch that fits; extra FLOPs are
the recomputed FLOPs over the step's model FLOPs. Measured on the CPU: the small config at batch 8
(fp32), the lowered program of each policy (forward + loss + backward) against the eager module
plainly and with `torch.utils.checkpoint` around every transformer layer, the same weights and
batch; time interleaved, median after warm-up; peak = bytes the CPU allocator holds above the
step's start (`torch.profiler` memory events in time order).""",
    "data": """\
4,000 synthetic caption samples (`mmgraph data synth`) preprocessed with the small config's
layout (every image opened and verified), 2 workers, median of 5 runs after a warm-up run; then
the loader over those shards with the small config (batch 8, 64 px images through the params'
transforms, sequence 128), 2 workers, median of 40 batches after start-up, against the eager
training step of the small config on one of those batches (median of 5 after 3 warm-ups): the
peer the loader has to outrun.""",
    "convert": """\
A LLaVA checkpoint in the transformers layout is written with random fp16 tensors (made one at a
time, never the whole model), sharded at 1 GB, then converted hf -> native (`mmgraph convert`) in
a fresh process. The peer is the same command on a tiny checkpoint in the same run: its peak is
the fixed overhead (Python, torch, transformers, the meta-device shape check). One conversion:
peak memory, not time, is the figure.""",
    "generate": """\
The small config's model (seeded weights) converted with `mmgraph convert` to a
`LlavaForConditionalGeneration` folder, so both sides run the same weights on the same prompt (one
image, the same token ids): `mmgraph.commands.generate.Generator` (KV cache allocated once) against
`LlavaForConditionalGeneration.generate` (greedy, its default cache), both for exactly N new
tokens, interleaved, median after a warm-up.""",
}

INTRO["modelzoo"] = """\
Training steps/s of `mmgraph run` and of the real Cerebras Model Zoo 2.10 trainer (`cszoo fit`,
cerebras-pytorch 2.10.0, torch 2.4.0, CPU) on the same tiny config, data and initial weights: the
parity fixture (`tests/fixtures/modelzoo`, mm_simple: 3-block ViT on 32 px, 2-layer LLaMA with hidden
size 64, batch 4, fp32), from its `initial.mdl` with its 2.10 params file. The tools run in fresh
processes, alternating (the order flips every round), one torch thread each; a step's time is the
time between the arrivals of the step-1 and step-10 log lines, over 9 steps (set-up, compilation and
the first step excluded). Both report the same first loss: the same model, weights and batch. The
Model Zoo runs only where its venv is (docs/params.md has the recipe); otherwise the row says
skipped. At this size both are dominated by per-step overheads, not arithmetic."""

INTRO["packing"] = """\
Real (non-pad) tokens/s of the lowered training step (`compile_step` + the program's gm as the
reference executor runs it, functional copies as views and dead operands written in place: forward, loss, backward) on the same number of rows, one sample per padded row against rows packed
first-fit decreasing (`mmgraph.core.packing`), the small config with rows scaled by its image tokens
(64 of 576: rows of 228 hold as many samples as rows of 2048 at full size). Lengths: phase 1 =
576 image tokens + 24..74 caption tokens (the issue's 600-650 a sample; an assumption, the
LLaVA-Pretrain data is not on this machine), phase 2 = a LLaVA-665K-like mix (88% one image +
log-normal text of median 180, 12% text only of median 500; an assumption likewise). The 7B
rows are predictions: the cs2 simulation of the packed and unpacked 7B programs at 2048 times
the sampled rows' real-token share. Each CPU ratio is timed in 3 runs of 7 interleaved rounds
(the median run reported, every run's ratio in brackets)."""

INTRO["data_parallel"] = """\
Two gloo ranks (torchrun, one thread each) against one process with two threads, the same global
batch of 8 and micro-batch 4, through the runtime (`Runner.train_step` of the lowered programs, the
data-parallel one with its bucketed all-reduces as graph nodes) on random batches of the small
config. The hidden share of communication compares, per rank, the data-parallel micro-step with
the same program whose all-reduces and waits are replaced by their inputs, and with the buckets'
all-reduces alone: `1 - max(t_dp - t_without, 0) / t_comm`. ZeRO: the optimizer state each rank
holds after the steps. The 7B rows are simulated (`compiler/scaling.py`): SwarmX for cs2, a ring
all-reduce over InfiniBand with bucketed overlap for h100."""

INTRO["startup"] = """\
`mmgraph run CPU --max_steps 1` in a fresh process, from its start to its first step's line (Python
and torch imports, params, data, the program, one step), in a model_dir whose `programs/` matches
(the run loads the artifact `mmgraph compile` saved: no tracing) and in one without (the run traces
and lowers), interleaved, medians. The 7B row is the LLaVA-7B phase-2 train step traced and lowered
for cs2 on the meta device against saving and loading its artifact."""

INTRO["legalize"] = """\
What the `legalize` pass costs and gives (docs/compiler.md, "Legality per target"). Compile: the
LLaVA-7B phase-2 train step for cs2 through `compile_step` in one process, with legalization (cs2's
op set `cirh-2.10.0`) and without (the same target with no op set), interleaved. CPU step: the small
config's program compiled for a GPU target (h100: no rewrite, fused attention kept: the host
program), for cs2 without legalization (the program as before) and legalized for cs2 (what `mmgraph
run` executes with its default target), each run by `Runner.train_step` on the CPU. Lowering:
every train and eval program of `configs/` and the Model Zoo's multimodal params files (train,
micro-batch 1), legalized for cs2, through Cerebras's own `torch-cirh-opt -refine-types
-torch-to-cirh-pipeline` (strict-soundness mode for mixed precision)."""

TINY_EAGER_NOTE = """\
Why tiny is low against eager PyTorch: its step is dominated by per-op overhead, and eager runs
more than the lowered program: 928 ATen ops (676 forward/backward + 252 AdamW) against the
program's 639, including autograd's gradient accumulation (`add_`, `copy_`, `fill_`: about
0.7 ms by the profiler) and Python module-call overhead the program does not have (profiled on
2026-11-25). Per op, the profile and the prediction agree closely (matmuls 3.75 vs 3.40 ms,
attention and elementwise within about 20%). The runtime's step, which runs the program's ops
and nothing else, is the comparison the target asks for."""


def notes(name: str, r: dict) -> list[str]:
    """Texts that depend on the results: what a figure means, why a target is missed."""
    out = []
    if name == "compile" and "torch_compile" not in r:
        out.append("The peers (torch.compile, torch-mlir) are not in this results file: it predates them.")
    if name == "simulator":
        tiny = next((row for row in r["rows"] if row["config"] == "tiny"), None)
        if tiny:
            eager = tiny.get("eager") or {"median_s": tiny.get("measured_s_median")}
            if eager.get("median_s") and tiny["predicted_s"] / eager["median_s"] < 0.75:
                out.append(TINY_EAGER_NOTE)
        if not any("reference" in row for row in r["rows"]):
            out.append("This results file predates the reference-executor column: the prediction is "
                       "compared with eager PyTorch only.")
    if name == "freeze":
        ra = r["ratios"]
        out.append(
            f"Phase 1 keeps the backward through the LLM (the projector's gradient needs it) but drops the "
            f"LLM's weight gradients: analytic total FLOPs {ra['flops_total']:.2f}x, backward FLOPs "
            f"{ra['flops_backward']:.2f}x, gradient bytes {ra['gradient_bytes']:.3f}x of phase 2. Measured: "
            f"the program takes {ra['program_time']:.2f}x and the whole step {ra['step_time']:.2f}x phase 2's "
            f"time; the step also saves the optimizer's update of the frozen LLM.")
    if name == "packing":
        for key in ("phase1", "phase2"):
            m = r.get(key)
            if m:
                share = m["packed"]["real_share"] / m["unpacked"]["real_share"]
                u, p = m["unpacked"], m["packed"]
                out.append(f"{key}: the LLM's shapes are the same packed and unpacked, so the ratio can reach the "
                           f"real-share ratio {share:.2f}x, less the encoder's work on the packed rows' extra images "
                           f"(up to 3 a row against 1); measured {m['ratio']:.2f}x (step medians "
                           f"{u['median_s']:.3f} s unpacked, min-max {u['min_s']:.3f}-{u['max_s']:.3f}; "
                           f"{p['median_s']:.3f} s packed, {p['min_s']:.3f}-{p['max_s']:.3f}).")
    if name == "legalize" and not r.get("quick"):
        dates = {part: r[part]["measured"][:10] for part in ("compile", "step", "lowering")
                 if isinstance(r.get(part), dict) and r[part].get("measured")}
        if dates:
            out.append("Parts measured in an earlier run of the script (`--parts` reruns the others): "
                       + ", ".join(f"{k} on {v}" for k, v in dates.items()) + ".")
        out.append(
            "The 2-core machine was shared while these ran (load average 2 to 13): the 7B compile took two to "
            "three times its time on a quiet machine (the Compile section), both variants alike; the ratios "
            "are of interleaved runs. The host/GPU program is the program as it was (its code is identical), "
            "so its step differs from the unlegalized cs2 program's by noise only. The legalized cs2 program, "
            "what `mmgraph run` executes with its default target, runs its functional copies as views on the "
            "CPU (the executors' `AS_VIEW`; 1.3x without) and is left with the 0-d constants of the Tensor "
            "overloads and attention as bmm/softmax: about 20% more ops.")
    if name == "memory" and r.get("explore"):
        out.append("In the explore tables samples/s is a step function of the micro-batch: the batch splits into "
                   "`ceil(batch / micro-batch)` micro-steps, each costed at the full micro-batch (the last is "
                   "smaller on the system, so this is a bound), and a micro-step costs about the same whatever its "
                   "size while the weight link bounds it; so the largest micro-batch of each number of micro-steps "
                   "wins, among those that fit. Past 73 on cs3, kept activations need offload, whose weight-link "
                   "time the backward pays.")
    if name == "gpu_cluster" and r.get("rows"):
        ratios = ", ".join(f"{x['ratio']:.2f}" for x in r["rows"])
        out.append(f"Predicted / published: {ratios}. The model counts the GPU kernels (at measured peak-shape "
                   "efficiencies, so an upper bound on speed), the collectives and the optimizer; the published "
                   "times are whole runs with data loading (JPEG decoding and CLIP preprocessing of every image on "
                   "the CPU), Python and launch overheads of eager training, logging and checkpoint saving, which "
                   "it does not model. The length statistics are the largest uncertainty: the step time is close "
                   "to linear in the padded length at these lengths.")
    if name == "runtime" and any(row["peak_mb"] is None for x in runtime_runs(r) for row in x["train"]):
        out.append("Peak memory was not measured in this run.")
    return out
