"""Sequence packing: real (non-pad) tokens/s of packed rows against one sample per padded row.

    python -m benchmarks.bench_packing               # small config on the CPU; 7B predicted on cs2
    python -m benchmarks.bench_packing --quick       # tiny config, one repeat, no 7B (tests)

Length distributions (in tokens of the full-size model, rows of 2048; not measured from the
datasets, which are not on this machine; assumptions stated so they can be replaced):
- phase 1 (LLaVA-Pretrain 558K, BLIP captions): 576 image tokens + caption and template tokens
  drawn uniformly from 24..74, i.e. 600-650 tokens a sample, as issue 18 states the data is;
- phase 2 (LLaVA-665K mix): 88% samples with one image: 576 + text drawn log-normal (median 180,
  sigma 0.9; multi-turn conversations), 12% text only (ShareGPT-like: log-normal median 500,
  sigma 0.9); every sample clipped to the row.
On the CPU the small config (64 image tokens instead of 576) runs rows scaled by 64/576 (228
tokens, the tiny config likewise with its own image tokens), every length scaled alike, so a
row holds as many samples as at full size. Packing: first-fit decreasing (``mmgraph.core.packing``)
with the row's image budget 3 (as many images as a row can hold).

Measured: the lowered training step (``compile_step`` + the program's gm run as the reference
executor runs it, ``executors.reference_graph``: functional copies as views, dead operands written
in place; forward, loss and backward; phase 1 trains the projector only, phase 2 the projector
and the LLM) on the same number of rows, unpacked (one sample per row) and packed; real
tokens/s = the batch's non-pad tokens / step time, median of ``--repeats`` interleaved after warm-up, timed ``--runs`` times (3): the run with the median
ratio is reported, every run's ratio beside it. Predicted: the 7B phase-1
and phase-2 programs compiled for cs2 at 2048 (their params' micro-batch), unpacked and packed, real tokens/s
= the simulated tokens/s x the real-token share of the sampled rows.

Targets (issue 18): phase 1 packed >= 2.5x unpacked real tokens/s, phase 2 >= 1.5x.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from benchmarks.common import finish, time_interleaved

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
BIG = {1: ROOT / "configs" / "params_mm_llava_llama2_7b_phase1.yaml",
       2: ROOT / "configs" / "params_mm_llava_llama2_7b_phase2.yaml"}
FULL_IMAGE, FULL_ROW, BUDGET = 576, 2048, 3      # 3 images of 576 fit a row of 2048


def sample_lengths(phase: int, n: int, seed: int) -> list[tuple[int, int]]:
    """(text tokens, images) of ``n`` full-size samples (see the module's docstring)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        if phase == 1:
            out.append((int(rng.integers(24, 75)), 1))
        elif rng.random() < 0.88:
            out.append((min(int(rng.lognormal(np.log(180), 0.9)), FULL_ROW - FULL_IMAGE), 1))
        else:
            out.append((max(min(int(rng.lognormal(np.log(500), 0.9)), FULL_ROW), 8), 0))
    return out


def scaled(samples, image_tokens: int, row: int) -> list[tuple[int, int]]:
    """The full-size lengths scaled to a row of ``row`` tokens with ``image_tokens`` per image."""
    f = row / FULL_ROW
    return [(max(int(round(text * f)), 3), images) for text, images in samples
            if max(int(round(text * f)), 3) + images * image_tokens <= row]


def unpacked_batch(samples, layout, seed: int) -> dict[str, torch.Tensor]:
    """One sample per row: ``<bos> [image] text``, text supervised (the image tokens not)."""
    g = torch.Generator().manual_seed(seed)
    b, s, p = len(samples), layout.max_sequence_length, layout.num_patches
    out = {"image_data": torch.randn((b, layout.max_num_img, *layout.image_data_size), generator=g),
           "text_input_ids": torch.zeros((b, s), dtype=torch.int64),
           "image_data_loc": torch.full((b, layout.max_num_img, p), s, dtype=torch.int64)}
    for k in ("labels", "loss_mask", "key_padding_mask", "token_modality_idx"):
        out[k] = torch.zeros((b, s), dtype=torch.int64)
    for r, (text, images) in enumerate(samples):
        n = text + images * p
        out["text_input_ids"][r, :n] = torch.randint(1, layout.vocab_size, (n,), generator=g)
        if images:
            out["image_data_loc"][r, 0] = torch.arange(1, 1 + p)
            out["token_modality_idx"][r, 1:1 + p] = 1
            out["text_input_ids"][r, 1:1 + p] = 0
        else:
            out["image_data"][r] = 0.0
        out["labels"][r, :n - 1] = out["text_input_ids"][r, 1:n]
        out["loss_mask"][r, images * p:n - 1] = 1
        out["key_padding_mask"][r, n:] = 1
    return out


def _params(path: Path, tmp: Path, phase: int, row: int, packed: bool, mbs: int):
    from mmgraph.core.config import load_params

    raw = yaml.safe_load(path.read_text())
    for key in ("train_input", "eval_input"):
        if key in raw:
            raw[key] = dict(raw[key], max_sequence_length=row, batch_size=mbs, micro_batch_size=mbs,
                            max_num_img=BUDGET if packed else 1, packed=packed)
    if phase == 1:
        raw["model"]["freeze"] = ["^image_model.image_model_list", "^text_model"]
    out = tmp / f"p{phase}{'packed' if packed else ''}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return load_params(out)


def measure(config: Path, phase: int, rows: int, repeats: int, seed: int = 0, runs: int = 3) -> dict:
    """Real tokens/s of the lowered step, unpacked and packed, on ``rows`` rows each: ``runs``
    timings of ``repeats`` interleaved rounds each (the same programs and batches), the run with
    the median ratio reported and every run's ratio beside it (is it stable?)."""
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.config import load_params
    from mmgraph.core.ir import InputKind
    from mmgraph.core.packing import assign
    from mmgraph.models import build_model, pack_batch
    from mmgraph.runtime.executors import reference_graph

    p = load_params(config).layout().num_patches
    row = int(round(FULL_ROW * p / FULL_IMAGE))
    with tempfile.TemporaryDirectory() as tmp:
        plain = _params(config, Path(tmp), phase, row, False, rows)
        packed = _params(config, Path(tmp), phase, row, True, rows)
    samples = scaled(sample_lengths(phase, 40 * rows, seed), p, row)
    groups = assign([t + i * p for t, i in samples], [i for _, i in samples], row, BUDGET, seed)[:rows]
    chosen = [i for g in groups for i in g]
    batch_u = unpacked_batch([samples[i] for i in range(rows)], plain.layout(), seed)
    everyone = unpacked_batch([samples[i] for i in chosen], plain.layout(), seed)
    index = {i: k for k, i in enumerate(chosen)}
    batch_p = pack_batch(everyone, [[index[i] for i in g] for g in groups], packed.layout())
    calls, real = {}, {}
    for name, params, batch in (("unpacked", plain, batch_u), ("packed", packed, batch_p)):
        program = compile_step(params)[-1].program
        model, _ = build_model(params, seed=0)
        state = dict(model.named_parameters())
        flat = [state[s.name].detach() if s.kind == InputKind.PARAM else batch[s.name] for s in program.inputs]
        gm = reference_graph(program.gm, torch.device("cpu"))
        calls[name] = (lambda gm=gm, args=flat: _no_grad(gm, args))
        real[name] = int((batch["key_padding_mask"] == 0).sum())
    timed = [time_interleaved(calls, repeats, warmup=1 if i == 0 else 0) for i in range(runs)]
    ratios = [real["packed"] / t["packed"]["median_s"] / (real["unpacked"] / t["unpacked"]["median_s"]) for t in timed]
    times = timed[sorted(range(runs), key=ratios.__getitem__)[runs // 2]]
    out = {"row": row, "rows": rows, "image_tokens": p, "phase": phase, "config": config.name, "runs": ratios}
    for name in calls:
        out[name] = {**times[name], "real_tokens": real[name], "real_share": real[name] / (rows * row),
                     "real_tokens_per_s": real[name] / times[name]["median_s"]}
    out["samples_per_row_packed"] = len(chosen) / rows
    out["ratio"] = out["packed"]["real_tokens_per_s"] / out["unpacked"]["real_tokens_per_s"]
    return out


def _no_grad(gm, args):
    with torch.no_grad():
        return gm(*args)


def predict_cs2(phase: int, seed: int = 0) -> dict:
    """7B at 2048 on cs2: simulated tokens/s x the sampled rows' real-token share."""
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.core.packing import assign
    from mmgraph.core.target import load_target

    samples = [(t, i) for t, i in sample_lengths(phase, 4000, seed) if t + i * FULL_IMAGE <= FULL_ROW]
    lengths = [t + i * FULL_IMAGE for t, i in samples]
    groups = assign(lengths, [i for _, i in samples], FULL_ROW, BUDGET, seed)
    share = {"unpacked": sum(lengths) / (len(lengths) * FULL_ROW),
             "packed": sum(lengths) / (len(groups) * FULL_ROW)}
    out = {"phase": phase, "params": str(BIG[phase].relative_to(ROOT))}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("unpacked", "packed"):
            raw = yaml.safe_load(BIG[phase].read_text())
            for key in ("train_input", "eval_input"):
                if key in raw:
                    raw[key] = dict(raw[key], packed=name == "packed", max_num_img=BUDGET if name == "packed" else 1)
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(yaml.safe_dump(raw))
            from mmgraph.core.config import load_params
            sched = compile_step(load_params(path), target=load_target("cs2"))[-1].program.schedule
            out["micro_batch_size"] = sched.micro_batch_size
            out[name] = {"tokens_per_s": sched.tokens_per_s, "real_share": share[name],
                         "real_tokens_per_s": sched.tokens_per_s * share[name], "step_s": sched.step_s}
    out["ratio"] = out["packed"]["real_tokens_per_s"] / out["unpacked"]["real_tokens_per_s"]
    return out


def format_table(r: dict) -> str:
    lines = ["Sequence packing: real (non-pad) tokens/s of the lowered training step, the same number of rows",
             "", "| data | config | row | rows | samples/row packed | real share unpacked | real share packed | "
             "unpacked real tok/s | packed real tok/s | packed / unpacked | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, target in (("phase1", 2.5), ("phase2", 1.5)):
        m = r.get(key)
        if not m:
            continue
        u, p = m["unpacked"], m["packed"]
        lines.append(f"| {key} | {m['config']} | {m['row']} | {m['rows']} | {m['samples_per_row_packed']:.2f} | "
                     f"{u['real_share']:.1%} | {p['real_share']:.1%} | {u['real_tokens_per_s']:,.0f} | "
                     f"{p['real_tokens_per_s']:,.0f} | {m['ratio']:.2f}x{_runs(m)} | >= {target}x |")
    for key in ("cs2_phase1", "cs2_phase2"):
        m = r.get(key)
        if m:
            u, p = m["unpacked"], m["packed"]
            lines.append(f"| {key} (predicted) | {m['params']} | 2048 | {m.get('micro_batch_size', '-')} | - | "
                         f"{u['real_share']:.1%} | "
                         f"{p['real_share']:.1%} | {u['real_tokens_per_s']:,.0f} | {p['real_tokens_per_s']:,.0f} | "
                         f"{m['ratio']:.2f}x | - |")
    return "\n".join(lines)


def _runs(m: dict) -> str:
    """Every run's ratio, when there were several (the reported one is the median run)."""
    runs = m.get("runs") or []
    return f" (runs: {', '.join(f'{x:.2f}' for x in runs)})" if len(runs) > 1 else ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs", type=int, default=3, help="timings of --repeats rounds each (stability)")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--no_cs2", action="store_true", help="skip the 7B cs2 predictions")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    config, repeats, rows, runs = (TINY, 1, 2, 1) if args.quick else (SMALL, args.repeats, args.rows, args.runs)
    result = {"phase1": measure(config, 1, rows, repeats, runs=runs), "phase2": measure(config, 2, rows, repeats, runs=runs),
              "threads": torch.get_num_threads(), "quick": args.quick}
    if not args.quick and not args.no_cs2:
        result["cs2_phase1"], result["cs2_phase2"] = predict_cs2(1), predict_cs2(2)
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
