"""Generation speed: cached greedy decoding against transformers' ``generate`` on the same model.

    python -m benchmarks.bench_generate            # small config, 64 new tokens (CPU; and CUDA if present)
    python -m benchmarks.bench_generate --quick    # tiny config, 8 new tokens (tests)

The small config's model (seeded weights) is converted with ``mmgraph convert`` to a
``LlavaForConditionalGeneration`` folder, so both sides run the same weights on the same prompt
(one image, the same token ids): ``mmgraph.commands.generate.Generator`` (KV cache allocated once) and
``LlavaForConditionalGeneration.generate`` (greedy, its default cache), both for exactly N new
tokens (end-of-sequence ignored), interleaved, median of the repeats after a warm-up. The tokens
are compared too (same weights, greedy: they should agree). Where CUDA is present the same
comparison runs again on the GPU (both models and inputs there, each call timed between
``torch.cuda.synchronize()``), stored under ``cuda`` in the results.

Target (issue: model family): tokens/s of cached generation >= 1.0x transformers generate.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import finish

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "configs" / "params_mm_llava_small.yaml"


def _single_image(path: Path, out: Path) -> Path:
    """The config with one image per sample (what the HF model takes) and the whole position
    range as context (so the prompt plus the new tokens fit)."""
    raw = yaml.safe_load(path.read_text())
    for section in ("train_input", "eval_input"):
        if section in raw:
            raw[section]["max_num_img"] = 1
            raw[section]["max_sequence_length"] = raw["model"]["text_model"]["max_position_embeddings"]
    out.write_text(yaml.safe_dump(raw))
    return out


def run(config: Path, new_tokens: int, repeats: int, device: str = "cpu") -> dict:
    from transformers import LlavaForConditionalGeneration

    from mmgraph.commands.generate import Generator
    from mmgraph.convert.convert import convert
    from mmgraph.core.config import load_params
    from mmgraph.data.synth import synth
    from mmgraph.models import build_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synth(root / "data", num_train=2, num_eval=2, seed=0)
        path = _single_image(config, root / "params.yaml")
        params = load_params(path)
        model, _ = build_model(params, seed=0)
        native = root / "native"
        native.mkdir()
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(native / "model.safetensors"))
        (native / "params.yaml").write_text(path.read_text())
        vocab = params.model.text_model.vocab_size
        convert(str(native), "native", "hf", str(root / "hf"), image_token_id=vocab - 1)
        hf = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval().to(device)

        gen = Generator(params, str(native / "model.safetensors"), str(root / "data" / "tokenizer"), device=device)
        gen.encoder.eos = -1                                      # exactly new_tokens tokens
        image = str(sorted((root / "data" / "images").glob("*.png"))[0])
        prompt = "what colour is the shape ?"
        ids, locs, pixels = gen.prompt_inputs(prompt, [image])
        input_ids = torch.tensor([ids])
        for positions in locs:
            input_ids[0, positions] = vocab - 1
        hf_inputs = {k: v.to(device) for k, v in dict(input_ids=input_ids, pixel_values=pixels[:, 0],
                                                        attention_mask=torch.ones_like(input_ids)).items()}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def ours():
            return gen.generate(prompt, [image], new_tokens)

        def theirs():
            with torch.no_grad():
                out = hf.generate(**hf_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=0)
            return out[0, input_ids.shape[1]:].tolist()

        a, b = ours(), theirs()                                   # warm-up
        if len(a) != new_tokens or len(b) != new_tokens:
            raise RuntimeError(f"generated {len(a)} and {len(b)} tokens, not {new_tokens}")
        same = sum(x == y for x, y in zip(a, b))
        times = {"mmgraph": [], "transformers": []}
        for _ in range(repeats):
            for name, fn in (("mmgraph", ours), ("transformers", theirs)):
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)
    rows = {k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                "tokens_per_s": new_tokens / statistics.median(v)} for k, v in times.items()}
    return {"config": config.name, "prompt_tokens": len(ids), "new_tokens": new_tokens, "repeats": repeats,
            "rows": rows, "ratio": rows["mmgraph"]["tokens_per_s"] / rows["transformers"]["tokens_per_s"],
            "tokens_agree": same, "threads": torch.get_num_threads(), "device": device,
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def format_table(r: dict) -> str:
    where = f"CUDA ({r['gpu']})" if r.get("device") == "cuda" else f"CPU, {r['threads']} threads"
    lines = [f"Greedy generation, {r['config']}, one image, prompt {r['prompt_tokens']} tokens, "
             f"{r['new_tokens']} new tokens, {where}, median of {r['repeats']}:", "",
             "| generator | tokens/s | s (median) | min | max |", "|---|---|---|---|---|"]
    for name, row in r["rows"].items():
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
                     f"{row['max_s']:.3f} |")
    lines += ["", f"mmgraph / transformers tokens/s: {r['ratio']:.2f} (target >= 1.0); "
                  f"{r['tokens_agree']} of {r['new_tokens']} greedy tokens identical"]
    if r.get("cuda"):
        lines += ["", format_table(r["cuda"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    tiny = ROOT / "configs" / "params_mm_llava_tiny_phase2.yaml"
    result = run(tiny, 8, 1) if args.quick else run(SMALL, args.new_tokens, args.repeats)
    if torch.cuda.is_available() and not args.quick:
        result["cuda"] = run(SMALL, args.new_tokens, args.repeats, device="cuda")
    return finish(result, format_table(result), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
