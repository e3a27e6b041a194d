"""The targets the issues set, judged from the benchmark results: met, missed (with the measured
number and the reason), or not measured yet. The runtime's are in benchmarks/targets_runtime.py;
``TARGETS`` has every benchmark's."""

from __future__ import annotations

from typing import Callable, Optional

from benchmarks.target import NOT_ANALYSED, Target, judged
from benchmarks.targets_runtime import SPEED, runtime_targets

BIG2 = "configs/params_mm_llava_llama2_7b_phase2.yaml"


# -- targets ------------------------------------------------------------------------------------
def compile_targets(r: Optional[dict]) -> list[Target]:
    src = "issue: compiler"
    out = [Target("compile", "7B phase-2 compile <= 30 s", src), Target("compile", "peak RSS <= 3 GB", src),
           Target("compile", "32 layers <= 4.5x the time of 8", src)]
    if not r:
        return out
    if r.get("params") != BIG2:
        for t in out:
            t.reason = f"this run compiled {r.get('params')}, not {BIG2}"
        return out
    rows = {row["depth"]: row for row in r["rows"]}
    if 32 in rows:
        s = rows[32]["seconds_median"]
        out[0].measured, out[0].status = f"{s:.2f} s (depth 32, median)", judged(s <= 30)
    peak = max(row.get("peak_rss_gb_max", row["peak_rss_gb_median"]) for row in r["rows"])
    out[1].measured, out[1].status = f"{peak:.2f} GB (highest run)", judged(peak <= 3)
    if 8 in rows and 32 in rows:
        ratio = rows[32]["seconds_median"] / rows[8]["seconds_median"]
        out[2].measured, out[2].status = f"{ratio:.2f}x", judged(ratio <= 4.5)
    for t in out:
        if t.status == "missed":
            t.reason = NOT_ANALYSED
    return out


def sim_measured(row: dict, key: str) -> Optional[dict]:
    """The measured column ``key`` (reference or eager) of a simulator row; files from before
    the reference column hold eager only, as ``measured_s_*``."""
    if key in row:
        return row[key]
    if key == "eager" and "measured_s_median" in row:
        return {"median_s": row["measured_s_median"], "min_s": row["measured_s_min"], "max_s": row["measured_s_max"]}
    return None


def _sim_column(row: dict) -> tuple[Optional[dict], str]:
    """The measured step the simulator target is judged against: the runtime's (reference
    executor); files from before that column only have eager."""
    if "reference" in row:
        return row["reference"], "the reference executor"
    m = sim_measured(row, "eager")
    return (m, "eager PyTorch: this file predates the reference column") if m else (None, "")


def simulator_targets(r: Optional[dict]) -> list[Target]:
    out = []
    rows = {row["config"]: row for row in r["rows"]} if r else {}
    for name in ("tiny", "small"):
        t = Target("simulator", f"{name}: host-target prediction within 25% of the measured step",
                   "issue: simulated target")
        row = rows.get(name)
        measured, against = _sim_column(row) if row else (None, "")
        if measured:
            ratio = row["predicted_s"] / measured["median_s"]
            off = ratio - 1
            t.measured = f"{ratio:.2f}: {abs(off):.0%} {'high' if off > 0 else 'low'}, against {against}"
            t.status = judged(abs(off) <= 0.25)
            if t.status == "missed":
                t.reason = _simulator_reason(row, measured, r)
        out.append(t)
    return out


def _simulator_reason(row: dict, measured: dict, r: dict) -> str:
    parts = [f"predicted {row['predicted_s'] * 1e3:.1f} ms against {measured['median_s'] * 1e3:.1f} ms measured"]
    if "reference_program" in row:
        prog = row["reference_program"]["median_s"]
        opt = row["reference"]["median_s"] - prog
        parts.append(f"the program alone (forward + backward) measured {prog * 1e3:.1f} ms against a predicted "
                     f"micro-step of {row['predicted_micro_step_s'] * 1e3:.1f} ms "
                     f"({row['predicted_micro_step_s'] / prog:.2f}x), clipping + AdamW {opt * 1e3:.1f} ms against "
                     f"{row['predicted_optimizer_s'] * 1e3:.1f} ms predicted")
        if opt > 1.5 * row["predicted_optimizer_s"] and "gradient_tensors" in row:
            parts.append("the optimizer is predicted as the trainable parameter count over an update rate "
                         "calibrated on one 4M-element tensor, with no per-tensor cost, while the runtime clips "
                         f"and updates tensor by tensor ({row['gradient_tensors']} gradient tensors)")
    if "predicted_overhead_s" in row:
        parts.append(f"of the prediction, {row['predicted_overhead_s'] * 1e3:.1f} ms is per-op dispatch overhead "
                     f"({row['ops']} ops x {r['target_figures']['overhead_s'] * 1e6:.1f} us, calibrated)")
    if row["config"] == "tiny" and row["predicted_s"] < measured["median_s"] and "reference" not in row:
        parts.append("eager PyTorch runs more ops than the lowered program (autograd's accumulation, AdamW's "
                     "per-tensor ops, module calls), which a step this small pays op by op: see the simulator "
                     "section")
    elif "reference_program" not in row:
        parts.append(NOT_ANALYSED)
    return "; ".join(parts)


def data_targets(r: Optional[dict]) -> list[Target]:
    src = "issue: data"
    a = Target("data", "preprocessing >= 1,000 caption samples/s on 2 cores", src)
    b = Target("data", "loader >= 2x faster than the training step consumes", src)
    if r:
        rate = r["preprocess_samples_per_s"]
        a.measured, a.status = f"{rate:,.0f} samples/s ({r['workers']} workers)", judged(rate >= 1000)
        v = r["loader_vs_step"]
        b.measured, b.status = f"{v:.1f}x", judged(v >= 2)
        for t in (a, b):
            if t.status == "missed":
                t.reason = NOT_ANALYSED
    return [a, b]


def convert_targets(r: Optional[dict]) -> list[Target]:
    t = Target("conversion", "peak memory < 2x the largest tensor above the fixed overhead",
               "issue: checkpoint conversion")
    if r:
        x = r["peak_above_overhead_in_largest_tensors"]
        t.measured, t.status = f"{x:.2f}x the largest tensor", judged(x < 2)
        if t.status == "missed":
            t.reason = NOT_ANALYSED
    return [t]


def generate_targets(r: Optional[dict]) -> list[Target]:
    t = Target("generation", "cached generation tokens/s >= 1.0x transformers `generate`", "issue: model family")
    if r:
        x = r["ratio"]
        t.measured, t.status = f"{x:.2f}x", judged(x >= 1.0)
        if t.status == "missed":
            t.reason = NOT_ANALYSED
    out = [t]
    if r and r.get("cuda"):
        x = r["cuda"]["ratio"]
        out.append(Target("generation (GPU)", "the same on a CUDA GPU", "issue: model family", f"{x:.2f}x",
                          judged(x >= 1.0), "" if x >= 1.0 else NOT_ANALYSED))
    return out


REMAT_FULL_FLOPS_REASON = (
    "the Model Zoo's phase-2 file as shipped freezes the LLM too (`freeze: ['^image_model.image_model_list', "
    "'^text_model']`): the backward has no weight-gradient matmuls, so one recomputed forward is a larger share "
    "of the step than the 1/3 of a step that trains its weights (the 35% budget assumes forward:backward = 1:2)")


def _trained_llm_note(r: dict) -> str:
    ctx = r.get("trained_llm")
    row = next((x for x in ctx["rows"] if x["policy"] == "full"), None) if ctx else None
    return f"; with the LLM trained too (same file and micro-batch), full costs {row['extra_flops_share']:.1%}" if row else ""


def remat_targets(r: Optional[dict]) -> list[Target]:
    """Issue 21: 7B phase 2 at micro-batch 24 on cs2 and cs3; the CPU small config at batch 8."""
    src = "issue 21: activation recomputation"
    out = []
    for t in (r or {}).get("predicted", []) or [{"target": "cs2"}, {"target": "cs3"}]:
        name = t["target"]
        rows = {row["policy"]: row for row in t.get("rows", [])}
        fits = Target("remat", f"7B phase 2 at micro-batch 24 fits on {name}", src)
        full = Target("remat", f"{name}: full recompute <= 35% extra FLOPs", src)
        sel = Target("remat", f"{name}: selective <= 5% extra FLOPs whenever it fits", src)
        speed = Target("remat", f"{name}: samples/s at 24 >= 2x the largest micro-batch fitting without recompute", src)
        if rows:
            auto = rows["auto"]
            fits.measured, fits.status = (f"{'fits' if auto['fits'] else 'does not fit'}: peak "
                                          f"{auto['peak_bytes'] / 1e9:.2f} GB (auto: "
                                          f"{', '.join(f'{n} {p}' for p, n in auto['layers'].items() if n)})"), judged(auto["fits"])
            x = rows["full"]["extra_flops_share"]
            full.measured, full.status = f"{x:.1%}", judged(x <= 0.35)
            full.reason = "" if x <= 0.35 else REMAT_FULL_FLOPS_REASON + _trained_llm_note(r)
            y = rows["selective"]["extra_flops_share"]
            sel.measured = f"{y:.1%} ({'fits' if rows['selective']['fits'] else 'does not fit at 24'})"
            sel.status = judged(y <= 0.05 or not rows["selective"]["fits"])
            sel.reason = "" if sel.status == "met" else NOT_ANALYSED
            if t.get("speedup") is not None:
                base = t["no_recompute"]["micro_batch_size"]
                speed.measured, speed.status = f"{t['speedup']:.2f}x (vs {base}; {auto['bottleneck']}-bound)", \
                    judged(t["speedup"] >= 2)
                speed.reason = "" if speed.status == "met" else NOT_ANALYSED
        out += [fits, full, sel, speed]
    m = (r or {}).get("measured", {}).get("ratios", {})
    limits = (("full / none peak", 0.5), ("full / none time", 1.35), ("selective / none peak", 0.75),
              ("selective / none time", 1.10))
    for key, limit in limits:
        t = Target("remat", f"CPU small, batch 8: {key} <= {limit}x", src)
        if key in m:
            peer = m.get("eager+checkpoint / eager " + key.split()[-1])
            t.measured = f"{m[key]:.2f}x" + (f" (torch.utils.checkpoint: {peer:.2f}x)" if peer else "")
            t.status = judged(m[key] <= limit)
            t.reason = "" if t.status == "met" else NOT_ANALYSED
        out.append(t)
    return out


def packing_targets(r: Optional[dict]) -> list[Target]:
    src = "issue 18: sequence packing"
    out = [Target("packing", "phase-1-like real tokens/s packed >= 2.5x unpacked (CPU, small)", src),
           Target("packing", "phase-2-like real tokens/s packed >= 1.5x unpacked (CPU, small)", src)]
    for t, key, goal in ((out[0], "phase1", 2.5), (out[1], "phase2", 1.5)):
        if r and r.get(key):
            x = r[key]["ratio"]
            t.measured, t.status = f"{x:.2f}x", judged(x >= goal)
            if t.status == "missed":
                m = r[key]
                share = m["packed"]["real_share"] / m["unpacked"]["real_share"]
                spread = max(m[v]["max_s"] / m[v]["min_s"] for v in ("packed", "unpacked"))
                t.reason = (f"at most the real-share ratio {share:.2f}x less the encoder's work on the packed rows' "
                            f"extra images; this run's step times spread {spread:.1f}x (max / min): see the notes")
    return out


def data_parallel_targets(r: Optional[dict]) -> list[Target]:
    src = "issue 17: data parallel"
    out = [Target("data parallel", "communication hidden under the backward >= 70% (CPU, 2 gloo ranks)", src),
           Target("data parallel", "ZeRO-1 optimizer state per rank <= 0.55x DDP's (2 ranks)", src)]
    if r:
        hidden = r["hidden_share"]
        out[0].measured, out[0].status = f"{hidden:.0%}", judged(hidden >= 0.70)
        if out[0].status == "missed":
            o = r["ddp"][0]["overlap"]
            out[0].reason = (f"the data-parallel micro-step takes {o['dp_s']['median_s'] * 1e3:.1f} ms against "
                             f"{o['plain_s']['median_s'] * 1e3:.1f} ms without its collectives, more than the "
                             f"all-reduces alone ({o['comm_s']['median_s'] * 1e3:.1f} ms). The collectives are "
                             f"asynchronous (a standalone check on the same 2 cores: 12 all-reduces of 1 MB issued "
                             f"before 150 ms of matmuls add nothing); why the buckets issued one by one during the "
                             f"backward do not hide is not established yet (2 ranks' compute and gloo's threads "
                             f"share 2 cores)")
        ratio = r["zero1_state_ratio"]
        out[1].measured, out[1].status = f"{ratio:.2f}x", judged(ratio <= 0.55)
    half = Target("data parallel", "communication hidden >= 50% (CPU, 2 gloo ranks), or measured why the CPU "
                  "cannot", SPEED)
    out.append(half)
    if r:
        hidden = r["hidden_share"]
        half.measured, half.status = f"{hidden:.0%}", judged(hidden >= 0.5)
        cpu = [x["overlap"].get("comm_cpu_share") for x in r.get("ddp", []) if x.get("overlap")]
        if half.status == "missed" and all(c is not None for c in cpu) and cpu:
            least = min(cpu)        # the rank with the most room: even it cannot hide half
            why = (f"gloo's all-reduces are CPU work: each rank's process spends {least:.0%}-{max(cpu):.0%} of their "
                   f"wall time on CPU in them alone (copies, sums, socket I/O in gloo's threads). With both ranks' "
                   f"backward keeping both cores busy that work can only take the cores from the backward, so at most "
                   f"{1 - least:.0%} (the waiting) could hide; the GPU run must check it with NCCL, whose reductions "
                   f"do not use the host's cores")
            if 1 - least < 0.5:     # the alternative: measured why the CPU cannot
                half.measured, half.status = f"{hidden:.0%} (at most {1 - least:.0%} possible)", "met"
            half.reason = why
            out[0].reason = why
        elif half.status == "missed":
            half.reason = ("this results file predates the CPU-time measurement (`comm_cpu_share`); a probe on the same "
                           "2 cores with the small config's 19 buckets (docs/runtime.md) found each rank spending 57% of "
                           "the all-reduces' wall time on the CPU in gloo's threads: on cores the backward keeps busy, "
                           "at most the rest could hide")
    return out


def startup_targets(r: Optional[dict]) -> list[Target]:
    t = Target("start-up", "`mmgraph run --max_steps 1` with a matching artifact <= 0.3x with tracing (small, CPU)",
               "issue 16: program as interface")
    if r:
        t.measured, t.status = f"{r['ratio']:.2f}x", judged(r["ratio"] <= 0.3)
        if t.status == "missed":
            t.reason = (f"what both share (Python and torch imports, data, the step: about "
                        f"{r['artifact']['median_s']:.1f} s) is most of the small config's start-up; tracing adds "
                        f"{r['traced']['median_s'] - r['artifact']['median_s']:.1f} s")
    return [t]


def legalize_targets(r: Optional[dict]) -> list[Target]:
    src = "issue 26: legalize for the wafer"
    out = [Target("legalize", "every train and eval program of configs/ and the Model Zoo's params files lowers "
                              "with torch-cirh-opt, no op rejected", src),
           Target("legalize", "CPU step time of the host program not worse (host/GPU program / before)", src),
           Target("legalize", "7B compile time with legalization against without (reported)", src)]
    if not r or r.get("quick"):
        return out
    rows = r["lowering"]["rows"]
    checked = [x for x in rows if x["ok"] is not None]
    out[0].measured = f"{sum(bool(x['ok']) for x in checked)} of {len(rows)} lower"
    out[0].status = judged(len(checked) == len(rows) and all(x["ok"] for x in checked))
    if out[0].status == "missed":
        bad = [x for x in rows if not x["ok"]]
        out[0].reason = "; ".join(f"{x['params']} {x['mode']}: {x.get('error') or 'no tool'}" for x in bad[:3])
    step = {x["program"]: x for x in r["step"]["rows"]}
    host = step["host/GPU (h100)"]
    ratio = host["median_s"] / step["cs2 not legalized"]["median_s"]
    out[1].measured, out[1].status = f"{ratio:.3f}x", judged(ratio <= 1.05)
    if out[1].status == "missed":
        out[1].reason = NOT_ANALYSED
    c = r["compile"]
    out[2].measured, out[2].status = f"{c['ratio']:.2f}x ({c['with']['median_s']:.1f} s / {c['without']['median_s']:.1f} s)", "met"
    return out


TARGETS: dict[str, Callable[[Optional[dict]], list[Target]]] = {
    "compile": compile_targets, "simulator": simulator_targets, "data": data_targets,
    "runtime": runtime_targets, "convert": convert_targets, "generate": generate_targets,
    "remat": remat_targets,
    "packing": packing_targets,
    "data_parallel": data_parallel_targets,
    "startup": startup_targets,
    "legalize": legalize_targets,
}


def targets_table(targets: list[Target], full: bool = True) -> str:
    """The targets as a table; ``full`` adds the area and where each target was set."""
    head = "| area | target | from | measured | | reason |" if full else "| target | measured | | reason |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for t in targets:
        status = {"missed": "**missed**"}.get(t.status, t.status)
        cells = ([t.area, t.text, t.source] if full else [t.text]) + [t.measured, status, t.reason]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
