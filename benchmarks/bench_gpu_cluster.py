"""LLaVA-1.5 7B's published training recipes on 8 A100s, predicted by the GPU cluster model
(weights resident, data parallel with ZeRO, gradient checkpointing), next to the times the
LLaVA authors published.

    python -m benchmarks.bench_gpu_cluster            # pretraining and finetuning, 8 A100s
    python -m benchmarks.bench_gpu_cluster --quick    # the tiny config (a plumbing check)

Predicted, not measured: the Model Zoo's LLaVA-1.5 7B params (Release_2.10.0: CLIP ViT-L/14-336,
feature layer -2, 576 image tokens, mlp2x-gelu projector, Vicuna-7B; phase 1 trains the projector,
phase 2 the projector and the LLM), changed to the published recipe (haotian-liu/LLaVA,
scripts/v1_5/pretrain.sh and finetune.sh: global batch 256 = 8 x 32 with ZeRO-2 and 128 = 8 x 16
with ZeRO-3, one micro-step, gradient checkpointing, bf16) and to the padded length of an average
batch (dynamic padding pads each batch to its longest sample; the static program is compiled at
that length), compiled with ``--target a100_80gb`` / ``a100_40gb --world_size 8 --remat full``.
The epoch time is the dataset's samples over ``world.samples_per_s``. The length statistics
are assumptions with their derivation in ``RECIPES``; nothing is fitted to the published times.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import finish, rel

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "tests" / "data" / "modelzoo" / "Release_2.10.0"
TINY = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
README = "haotian-liu/LLaVA README, 'Train'"
RECIPES = [
    {
        "name": "pretraining (LCS-558K captions, LLM frozen)",
        "params": ZOO / "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml",
        "samples": 558_128, "batch": 256, "per_gpu": 32, "zero": 2, "target": "a100_80gb",
        "mean_tokens": 595, "padded_tokens": 625,
        "lengths": "1 BOS + 576 image tokens + the caption + 1 separator (the 'plain' template drops the "
                   "instruction); captions average about 17 tokens: blip_laion_cc_sbu_558k.json is 181 MB for "
                   "558,128 samples (haotian-liu/LLaVA docs/Data.md), 324 bytes a sample of which about 250 are "
                   "keys, id, image path and the dropped instruction, leaving about 75 characters (about 4.4 "
                   "characters a LLaMA token). Padded: the longest of 32 random captions, assumed 45 tokens",
        "published_h": 3.5, "published": "around 3.5 hours for LLaVA-v1.5-7B on 8x A100 (80G) (pretraining; "
                                          "5.5 hours for 13B)",
    },
    {
        "name": "finetuning (665K conversations, LLM trained)",
        "params": ZOO / "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml",
        "samples": 665_298, "batch": 128, "per_gpu": 16, "zero": 3, "target": "a100_40gb",
        "mean_tokens": 900, "padded_tokens": 1000,
        "lengths": "576 image tokens in 624K of the 665K samples (LLaVA-1.5 paper, Table 7: 40K ShareGPT "
                   "conversations have no image): 541 on average; text about 300 tokens: llava_instruct_150k.json "
                   "is 229 MB for 157,712 conversations (docs/Data.md), 1,452 bytes each, about 1,300 characters "
                   "of text, assumed for the whole mix; the vicuna_v1 template adds its system prompt (about 35 "
                   "tokens) and role tags (about 25). Padded: group_by_modality_length batches samples of similar "
                   "length, assumed 10% above the mean",
        "published_h": 10.0, "published": "around 10 hours for LLaVA-v1.5-7B on 8x A100 (40G) (visual instruction "
                                           "tuning; 20 hours for 13B on 8x A100 80G)",
    },
]


def recipe_params(recipe: dict, folder: Path) -> Path:
    """The Model Zoo file with the published recipe's batch, per-GPU micro-batch and the padded length."""
    raw = yaml.safe_load(Path(recipe["params"]).read_text())
    if "trainer" in raw:
        loader = raw["trainer"]["fit"]["train_dataloader"]
        for cb in raw["trainer"]["init"].get("callbacks", []):
            if "ScopedTrainFlags" in cb:
                cb["ScopedTrainFlags"]["csx.performance.micro_batch_size"] = recipe["per_gpu"]
    else:
        loader = raw["train_input"]
        loader["micro_batch_size"] = recipe["per_gpu"]
    loader["batch_size"] = recipe["batch"]
    if recipe.get("padded_tokens"):
        loader["max_sequence_length"] = recipe["padded_tokens"]
    path = folder / f"{Path(recipe['params']).stem}_recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def predict(recipe: dict, world_size: int = 8) -> dict:
    from mmgraph.compiler.pipeline import compile_step
    from mmgraph.compiler.scaling import world_report
    from mmgraph.core.config import load_params
    from mmgraph.core.target import load_target

    with tempfile.TemporaryDirectory() as tmp:
        params = load_params(recipe_params(recipe, Path(tmp)))
    target = load_target(recipe["target"])
    seq = params.layout("train").max_sequence_length
    share = min(1.0, recipe["mean_tokens"] / seq)
    start = time.perf_counter()
    program = compile_step(params, target=target, micro_batch_size=recipe["per_gpu"], remat="full",
                           world_size=world_size, zero=recipe["zero"], real_share=share)[-1].program
    w = world_report(program, target, params.precision, world_size, recipe["zero"], recipe["batch"], seq, share)
    hours = recipe["samples"] / w["samples_per_s"] / 3600
    return {**{k: (rel(v) if isinstance(v, Path) else v) for k, v in recipe.items()},
            "world_size": world_size, "sequence": seq, "real_token_share": share, "world": w,
            "predicted_h": hours, "ratio": hours / recipe["published_h"], "compile_s": time.perf_counter() - start}


def format_table(r: dict) -> str:
    lines = ["| recipe | GPUs | ZeRO | per-GPU batch | tokens (mean / padded) | samples/s | per GPU GB (fits) | "
             "predicted | published | predicted / published |",
             "|---|---|---:|---:|---|---:|---|---:|---:|---:|"]
    for x in r["rows"]:
        w = x["world"]
        lines.append(f"| {x['name']} | {x['world_size']} x {x['target']} | {x['zero']} | {x['per_gpu']} | "
                     f"{x['mean_tokens']} / {x['sequence']} | {w['samples_per_s']:,.1f} | "
                     f"{w['peak_bytes'] / 1e9:.1f} of {w['memory_bytes'] / 1e9:.0f} ({'yes' if w['fits'] else 'NO'}) | "
                     f"{x['predicted_h']:.2f} h | {x['published_h']:.1f} h | {x['ratio']:.2f} |")
    lines.append("")
    for x in r["rows"]:
        w = x["world"]
        lines.append(f"- {x['name']}: step {w['step_s'] * 1e3:,.0f} ms for {x['batch']} samples; per GPU weights "
                     f"{w['weights_bytes'] / 1e9:.2f} GB, gradients {w['gradients_bytes'] / 1e9:.2f} GB, optimizer "
                     f"{w['optimizer_bytes'] / 1e9:.2f} GB, activations {w['activations_bytes'] / 1e9:.2f} GB"
                     + (f", gathered weights {w['gathered_bytes'] / 1e9:.2f} GB" if w["gathered_bytes"] else "")
                     + f"; collectives {w['gather_s'] * 1e3:,.0f} ms gathers + {w['reduce_s'] * 1e3:,.0f} ms "
                     f"reductions at {w['bus_bandwidth'] / 1e9:.0f} GB/s bus bandwidth, {w['exposed_s'] * 1e3:,.0f} "
                     f"ms exposed; optimizer {w['optimizer_s'] * 1e3:,.0f} ms. Lengths: {x['lengths']}. Published: "
                     f"{x['published']} ({README}).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny config, 2 GPUs")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        tiny = {**RECIPES[1], "name": "tiny", "params": TINY, "batch": 8, "per_gpu": 4, "mean_tokens": 48,
                "padded_tokens": None, "samples": 800}
        rows = [predict(tiny, world_size=2)]
    else:
        rows = [predict(recipe) for recipe in RECIPES]
    result = {"rows": rows}
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
