"""Checkpoint conversion memory: peak RSS of `mmgraph convert` against the largest tensor.

    python -m benchmarks.bench_convert            # ~1.6 GB fp16 LLaVA checkpoint, 1 GB shards
    python -m benchmarks.bench_convert --quick    # a few MB (tests)

A LLaVA checkpoint in the transformers layout is written with random fp16 tensors (made one at
a time, never the whole model), sharded at 1 GB, then converted hf -> native in a fresh
process. The fixed overhead (Python, torch, transformers, the meta-device shape check) is the
peak RSS of the same command on a tiny checkpoint, measured in the same run.

Target (issue: checkpoint conversion): peak below 2x the largest tensor plus the fixed overhead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import finish

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # (vision hidden, vision layers, text hidden, text layers, vocab)
    "quick": (64, 2, 128, 2, 1000),
    "tiny": (32, 2, 64, 1, 256),       # two vision layers: vision_feature_layer -2 needs them
    "default": (1024, 8, 2048, 8, 32000),
}


def make_checkpoint(folder: Path, size: str, shard: str) -> dict:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mmgraph.core.tensorio import ShardWriter, parse_size

    vh, vl, th, tl, vocab = SIZES[size]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=vh, intermediate_size=4 * vh, num_hidden_layers=vl,
                                       num_attention_heads=max(vh // 64, 1), image_size=224, patch_size=14),
        text_config=LlamaConfig(vocab_size=vocab, hidden_size=th, intermediate_size=(8 * th) // 3 // 64 * 64 + 64,
                                num_hidden_layers=tl, num_attention_heads=max(th // 128, 1), max_position_embeddings=2048),
        image_token_index=vocab - 1, vision_feature_layer=-2)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    items = [(k, s, torch.float16, lambda s=s, i=i: torch.randn(s, generator=torch.Generator().manual_seed(i),
                                                                   dtype=torch.float32).half())
             for i, (k, s) in enumerate(shapes.items())]
    folder.mkdir(parents=True)
    files = ShardWriter(folder, parse_size(shard)).write(items)
    cfg.save_pretrained(folder)
    sizes = [torch.Size(s).numel() * 2 for s in shapes.values()]
    return {"total_bytes": sum(sizes), "largest_tensor_bytes": max(sizes), "shards": len(files)}


def convert_peak(src: Path, out: Path, shard: str) -> tuple[float, float]:
    """Peak RSS (bytes) and seconds of `mmgraph convert` in a fresh process."""
    # VmHWM, not ru_maxrss: Linux carries the forking parent's peak into the child's ru_maxrss.
    code = ("import re, sys; from mmgraph.cli import main; rc = main(sys.argv[1:]); "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", code, "convert", "--src-fmt", "hf", "--tgt-fmt", "native",
                          "--shard-size", shard, "--output-dir", str(out), str(src)],
                         capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    return int(res.stdout.strip().splitlines()[-1]) * 1024, seconds


def run(size: str, shard: str = "1GB") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_checkpoint(root / "tiny", "tiny", shard)
        overhead, _ = convert_peak(root / "tiny", root / "tiny_out", shard)
        facts = make_checkpoint(root / "big", size, shard)
        peak, seconds = convert_peak(root / "big", root / "big_out", shard)
        index = root / "big_out" / "model.safetensors.index.json"
        out_shards = len(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else 1
    largest = facts["largest_tensor_bytes"]
    return {"size": size, "shard": shard, **facts, "output_shards": out_shards, "peak_rss_bytes": peak,
            "fixed_overhead_bytes": overhead, "seconds": seconds,
            "peak_above_overhead_in_largest_tensors": (peak - overhead) / largest}


def format_table(r: dict) -> str:
    gb = 1 << 30
    return "\n".join([
        "| measure | value |", "|---|---|",
        f"| checkpoint (fp16, transformers layout) | {r['total_bytes'] / gb:.2f} GB in {r['shards']} shard(s) of <= {r['shard']} |",
        f"| largest tensor | {r['largest_tensor_bytes'] / gb:.3f} GB |",
        f"| `mmgraph convert --src-fmt hf --tgt-fmt native` | {r['seconds']:.1f} s, {r['output_shards']} output shard(s) |",
        f"| peak RSS | {r['peak_rss_bytes'] / gb:.3f} GB |",
        f"| fixed overhead (same command, tiny checkpoint) | {r['fixed_overhead_bytes'] / gb:.3f} GB |",
        f"| (peak - overhead) / largest tensor | {r['peak_above_overhead_in_largest_tensors']:.2f} (target < 2) |",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    result = run("quick", "200KB") if args.quick else run("default")
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
