"""The ``mmgraph`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from mmgraph import __version__
from mmgraph.core.errors import EXIT_USER_ERROR, Problem, UserError


def _cmd_check(args: argparse.Namespace) -> int:
    from mmgraph.commands.check import check, format_summary

    print(format_summary(check(args.params, args.mode)))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from mmgraph.commands.compile import run_compile

    return run_compile(args.params, args.model_dir, args.mode, args.validate_only, args.verify, args.target,
                       remat=args.remat, world_size=args.world_size, zero=args.zero,
                       bucket_bytes=_bucket_bytes(args.bucket_mb), real_tokens=_real_tokens(args.real_tokens),
                       optimizer_in_program=args.optimizer_in_program)


def _real_tokens(n: Optional[float]) -> Optional[float]:
    if n is not None and not n > 0:
        raise UserError(Problem(None, "--real_tokens", f"must be positive, not {n}"))
    return n


def _bucket_bytes(mb: float) -> int:
    if not mb > 0:
        raise UserError(Problem(None, "--bucket_mb", f"must be positive, not {mb}"))
    return int(mb * 1024 * 1024)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mmgraph.commands.inspect import run_inspect

    return run_inspect(args.model_dir, args.pass_name, args.kernel, args.diff)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from mmgraph.commands.calibrate import run_calibrate

    return run_calibrate(args.output, args.device, args.size)


def _cmd_preprocess(args: argparse.Namespace) -> int:
    import json as _json

    from mmgraph.commands.preprocess import run_preprocess

    stats, output_dir = run_preprocess(args)
    print(_json.dumps(stats, indent=2))
    print(f"wrote {output_dir} ({stats['samples_written']} samples; stats.json and data_params.json beside the shards)")
    if "packing" in stats:
        p = stats["packing"]
        print(f"packed: {p['rows_before']} rows -> {p['rows_after']} rows; real tokens "
              f"{p['real_token_share_before']:.1%} -> {p['real_token_share_after']:.1%} of each row")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from mmgraph.data.synth import synth

    counts = synth(args.output_dir, args.num_train, args.num_eval, args.seed)
    for name, n in counts.items():
        print(f"{args.output_dir}/{name}: {n} samples")
    print(f"{args.output_dir}/images/, {args.output_dir}/tokenizer/")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from mmgraph.commands.run import RunOptions, run

    return run(args.params, args.model_dir, args.mode, RunOptions(
        device=args.device, checkpoint_path=args.checkpoint_path, max_steps=args.max_steps, target=args.target,
        executor=args.executor, eval_executor=args.eval_executor, weight_streaming=args.weight_streaming,
        remat=args.remat, zero=args.zero, bucket_bytes=_bucket_bytes(args.bucket_mb), program_dir=args.program,
        optimizer_in_program=args.optimizer_in_program))


def _cmd_convert(args: argparse.Namespace) -> int:
    from mmgraph.convert.convert import convert, describe

    if args.src == "list" or args.src is None:
        print(describe())
        return 0
    missing = [f for f, v in (("--src-fmt", args.src_fmt), ("--tgt-fmt", args.tgt_fmt),
                              ("--output-dir", args.output_dir)) if v is None]
    if missing:
        raise UserError(Problem(None, missing[0], "required"))
    out = convert(args.src, args.src_fmt, args.tgt_fmt, args.output_dir, args.config, args.hf_layout,
                  args.shard_size, args.image_token_id, args.model, args.tokenizer, args.template)
    print(f"wrote {out} ({args.tgt_fmt})")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from mmgraph.commands.generate import run_generate

    return run_generate(args.params, args.checkpoint_path, args.image or [], args.prompt, args.max_new_tokens,
                        args.temperature, args.top_p, args.tokenizer, args.template, args.question_file,
                        args.image_folder, args.answers_file, args.seed, args.chat_template)


def _common(sub: argparse.ArgumentParser, params: bool = True) -> None:
    if params:
        sub.add_argument("--params", required=True, metavar="FILE", help="params YAML")
    sub.add_argument("--debug", action="store_true", help="show tracebacks")


def _bucket_arg(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--bucket_mb", type=float, default=25.0, metavar="MB",
                     help="data parallel: the gradient buckets' cap in MB (default 25, as DDP's bucket_cap_mb); "
                          "smaller buckets start communicating earlier in the backward")


def _add_check(sub) -> None:
    check = sub.add_parser(
        "check", help="validate a params file and summarize the model",
        description="Validate a params YAML (Model Zoo 2.3 multimodal schema) and print the "
                    "parameters per component (total / trainable / frozen), what each freeze "
                    "pattern matched, and the sequence layout. Builds the model on the meta "
                    "device: no weights are allocated.")
    _common(check)
    check.add_argument("--mode", choices=("train", "eval", "train_and_eval"), default="train",
                       help="which sections must be present (default: train)")
    check.set_defaults(func=_cmd_check)


def _optimizer_flag(parser) -> None:
    parser.add_argument("--optimizer_in_program", action="store_true",
                        help="the training program also holds the optimizer update (weights, optimizer state, "
                             "learning rate and step in; new weights and state out), as cstorch traces a step; "
                             "one rank, one micro-step per step (docs/compiler.md)")


def _add_compile(sub) -> None:
    comp = sub.add_parser(
        "compile", help="trace the step to one graph, run the passes, dump every stage",
        description="Trace the whole training (or eval) step of the params' model to one static "
                    "ATen graph (no weights allocated), run the passes in order (freeze_masks, "
                    "cleanup, fusion, weight_streaming, cost) and write every stage, the lowered program as Python and "
                    "report.json under MODEL_DIR/compile/.")
    _common(comp)
    comp.add_argument("--model_dir", default="./model_dir", metavar="DIR",
                      help="where compile/ is written (default: ./model_dir)")
    comp.add_argument("--mode", choices=("train", "eval"), default="train",
                      help="train: forward + loss + backward; eval: forward + loss")
    comp.add_argument("--target", default="cs2", metavar="NAME",
                      help="hardware to simulate: cs2 (default), cs3, h100, h200, host (after "
                           "mmgraph calibrate) or a target YAML")
    _optimizer_flag(comp)
    comp.add_argument("--validate_only", action="store_true",
                      help="stop after params validation and tracing; write nothing")
    comp.add_argument("--verify", action="store_true",
                      help="check every pass: structure always; loss and gradients against eager "
                           "PyTorch when the model is small enough to run")
    comp.add_argument("--remat", choices=("none", "selective", "full", "auto"), metavar="POLICY",
                      help="activation recomputation: none, selective, full or auto (default: the "
                           "params' model.activation_checkpointing, auto)")
    comp.add_argument("--world_size", type=int, default=1, metavar="N",
                      help="compile the training step for N data-parallel ranks: gradient reduction "
                           "(bucketed all-reduce) in the graph, as `torchrun ... mmgraph run` executes it")
    _bucket_arg(comp)
    comp.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, metavar="STAGE",
                      help="with --world_size: 2 compiles ZeRO-2's reduce-scatter of the gradients instead of "
                           "an all-reduce (1 changes only the runtime's optimizer); 3 (simulated only, on GPU "
                           "targets): weights sharded too, all-gathered per layer")
    comp.add_argument("--real_tokens", type=float, metavar="N",
                      help="mean real (non-pad) tokens per sample of the data, for real tokens/s (default: "
                           "the data's stats.json, else every token); with dynamic padding, compile at the "
                           "padded length (max_sequence_length) and give the mean here")
    comp.set_defaults(func=_cmd_compile)


def _add_inspect(sub) -> None:
    ins = sub.add_parser(
        "inspect", help="read compile dumps back: summary, one pass, one kernel, a diff",
        description="Read MODEL_DIR/compile/ back for a person: a summary by default, one "
                    "pass's dump, one kernel with its ops and shapes, or a diff of two passes.")
    ins.add_argument("model_dir", metavar="MODEL_DIR")
    what = ins.add_mutually_exclusive_group()
    what.add_argument("--pass", dest="pass_name", metavar="NAME", help="print one pass's dump")
    what.add_argument("--kernel", type=int, metavar="ID", help="print one kernel of the fused program")
    what.add_argument("--diff", nargs=2, metavar=("PASS_A", "PASS_B"), help="diff two passes' dumps")
    _common(ins, params=False)
    ins.set_defaults(func=_cmd_inspect)


def _add_run(sub) -> None:
    runp = sub.add_parser(
        "run", help="train / evaluate the lowered program on CPU or GPU",
        description="Compile the params' step (dumps in MODEL_DIR/compile) and execute the lowered "
                    "program: training with the params' optimizer and schedule, checkpoints every "
                    "checkpoint_steps (resumes from the latest in MODEL_DIR), metrics.jsonl, and "
                    "evaluation (loss, perplexity, token accuracy) over eval_input.")
    runp.add_argument("device", nargs="?", choices=("CPU", "GPU"), help="default: CPU")
    runp.add_argument("--mode", choices=("train", "eval", "train_and_eval"), default="train")
    _common(runp)
    runp.add_argument("--model_dir", default="./model_dir", metavar="DIR")
    runp.add_argument("--checkpoint_path", metavar="PATH",
                      help="initial weights (a checkpoint folder or .safetensors) when model_dir has no checkpoint")
    runp.add_argument("--max_steps", type=int, help="override runconfig.max_steps")
    runp.add_argument("--target", default="cs2", help="target simulated in the compile report (default cs2)")
    runp.add_argument("--executor", default="reference", choices=("reference", "compiled"),
                      help="reference: the program's ATen code (default); compiled: torch.compile/Inductor")
    runp.add_argument("--eval_executor", choices=("reference", "compiled", "onnxruntime"),
                      help="executor for eval (default: --executor)")
    runp.add_argument("--weight_streaming", action="store_true",
                      help="keep weights and optimizer state in host memory and stream each segment's "
                           "weights to the device when it runs (the target's partition)")
    runp.add_argument("--remat", choices=("none", "selective", "full", "auto"), metavar="POLICY",
                      help="activation recomputation: none, selective, full or auto (default: the "
                           "params' model.activation_checkpointing, auto)")
    _optimizer_flag(runp)
    runp.add_argument("--program", metavar="DIR",
                      help="run the saved programs in DIR (a MODEL_DIR/programs folder written by `mmgraph compile`); "
                           "refused when they were compiled from other params, target or versions. Default: "
                           "MODEL_DIR/programs when it matches, else compile")
    _bucket_arg(runp)
    runp.add_argument("--zero", type=int, choices=(0, 1, 2), default=0, metavar="STAGE",
                      help="data parallel (torchrun): 1 shards the optimizer state across ranks, 2 also the "
                           "gradients (reduce-scatter); 0, the default: every rank holds everything")
    runp.set_defaults(func=_cmd_run)


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate", help="answer a question about images (streams the tokens)",
        description="Greedy or sampled decoding with a key-value cache; images are placed where the "
                    "prompt's <image> marks stand (one is put first when there is none). Batch mode "
                    "(--question_file) writes LLaVA's answer JSONL.")
    _common(gen)
    gen.add_argument("--checkpoint_path", metavar="PATH",
                     help="a model_dir (its latest checkpoint), a checkpoint folder or .safetensors file")
    gen.add_argument("--image", action="append", metavar="IMG", help="an image (repeat for several)")
    gen.add_argument("--prompt", metavar="TEXT")
    gen.add_argument("--max_new_tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top_p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", metavar="DIR", help="default: the tokenizer beside the checkpoint or the data")
    gen.add_argument("--template", choices=("vicuna_v1", "plain", "chat"), default="vicuna_v1",
                     help="the conversation template training used (phase 2: vicuna_v1, phase 1: plain; chat: "
                          "the tokenizer's chat template)")
    gen.add_argument("--chat_template", metavar="FILE", help="a Jinja chat template (implies --template chat)")
    gen.add_argument("--question_file", metavar="FILE", help="LLaVA question JSONL (question_id, image, text)")
    gen.add_argument("--image_folder", metavar="DIR", help="batch mode: images are relative to it")
    gen.add_argument("--answers_file", metavar="FILE", help="batch mode: answers JSONL to write")
    gen.set_defaults(func=_cmd_generate)


def _add_convert(sub) -> None:
    conv = sub.add_parser(
        "convert", help="checkpoints between native, Hugging Face and the LLaVA layout",
        description="Convert a checkpoint (the Model Zoo's convert_checkpoint.py interface), tensor "
                    "by tensor and bit for bit. `mmgraph convert list` lists the formats. The output "
                    "folder is written beside its final name and renamed at the end.")
    conv.add_argument("src", nargs="?", metavar="SRC", help="checkpoint folder or file, a model_dir (its latest "
                                                           "checkpoint), or `list`")
    conv.add_argument("--model", default=None, help="mm_simple or mmsimple-llava (the same: the multimodal_simple "
                      "model), or llava (the Model Zoo's llava model: its names in a .mdl); default: the source's")
    conv.add_argument("--src-fmt", dest="src_fmt", metavar="FMT", help="native, hf, llava or cs-X.Y (= native)")
    conv.add_argument("--tgt-fmt", dest="tgt_fmt", metavar="FMT", help="native, hf, llava or cs-X.Y (= native)")
    conv.add_argument("--output-dir", dest="output_dir", metavar="OUT")
    conv.add_argument("--config", metavar="CFG", help="native source: its params YAML (default: params.yaml "
                                                      "beside it); hf source: the folder holding its configs")
    conv.add_argument("--hf-layout", dest="hf_layout", choices=("llava", "two_folder"),
                      help="hf output: a LlavaForConditionalGeneration folder (default, unless the source "
                           "was two-folder) or image_model/ + text_model/")
    conv.add_argument("--shard-size", dest="shard_size", default="5GB", help="largest output shard (default 5GB)")
    conv.add_argument("--image-token-id", dest="image_token_id", type=int,
                      help="hf output: the <image> token id when the source does not say")
    conv.add_argument("--tokenizer", metavar="DIR", help="the training tokenizer (default: the data's record "
                                                        "data_params.json, or tokenizer/ beside the weights or data)")
    conv.add_argument("--template", choices=("plain", "vicuna_v1", "chat"),
                      help="the training prompt the exported chat template reproduces (default: the data's record; "
                           "plain for phase 1, else vicuna_v1)")
    _common(conv, params=False)
    conv.set_defaults(func=_cmd_convert)


def _add_preprocess(sub) -> None:
    pre = sub.add_parser(
        "preprocess", help="LLaVA-format JSON conversations to H5 shards",
        description="Turn LLaVA-format conversations (a JSON list of {id, image, conversations}) "
                    "into H5 shards in the Model Zoo's multimodal layout. Phase 1 uses the plain "
                    "template (captions), phase 2 vicuna_v1 (only assistant replies supervised), or "
                    "the tokenizer's chat template; --config takes the Model Zoo's own preprocessing "
                    "YAML. With --params, the sequence layout comes from the params file.")
    pre.add_argument("--config", metavar="FILE",
                     help="a Model Zoo preprocessing YAML (setup / processing / dataset); the options below "
                          "override its paths")
    pre.add_argument("--input_json", metavar="FILE")
    pre.add_argument("--image_dir", metavar="DIR", help="images are relative to it")
    pre.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer folder")
    pre.add_argument("--output_dir", metavar="DIR")
    pre.add_argument("--phase", type=int, choices=(1, 2))
    pre.add_argument("--template", choices=("plain", "vicuna_v1", "chat"),
                     help="default: plain for phase 1, vicuna_v1 for phase 2; chat: the tokenizer's chat template")
    pre.add_argument("--chat_template", metavar="FILE", help="a Jinja chat template (implies --template chat)")
    pre.add_argument("--image_placement", choices=("turn_start", "inline"), default="turn_start",
                     help="turn_start: a turn's images before its text, as the Model Zoo (default); "
                          "inline: where the <image> marks stand")
    pre.add_argument("--params", metavar="FILE", help="take the layout from this params file")
    pre.add_argument("--num_patches", type=int)
    pre.add_argument("--max_seq_length", type=int)
    pre.add_argument("--max_num_img", type=int)
    pre.add_argument("--samples_per_file", type=int, default=1000)
    pre.add_argument("--num_workers", type=int, default=1)
    pre.add_argument("--on_error", choices=("fail", "skip"), default="fail",
                     help="a bad sample stops the run (default) or is skipped and counted")
    pre.add_argument("--on_long", choices=("truncate", "skip"), default="truncate",
                     help="samples longer than max_seq_length are truncated (default) or skipped")
    pre.add_argument("--pack", action="store_true",
                     help="pack several samples per row (segment_ids, position_ids); train with "
                          "train_input.packed: true")
    pre.add_argument("--pack_window", type=int, help="samples packed together (first-fit decreasing; default 1000)")
    pre.add_argument("--pack_seed", type=int, help="seed of the packer's tie-breaks and row order (default 0)")
    _common(pre, params=False)
    pre.set_defaults(func=_cmd_preprocess)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="datasets: `mmgraph data synth`")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    syn = data_sub.add_parser(
        "synth", help="write the built-in synthetic shapes dataset and its tokenizer",
        description="Write the embedded default dataset: coloured-shape images, phase-1 captions "
                    "and phase-2 questions (some with two images) in LLaVA JSON, and a word-level "
                    "tokenizer folder. Answers depend only on the images.")
    syn.add_argument("--output_dir", required=True, metavar="DIR")
    syn.add_argument("--num_train", type=int, default=2000)
    syn.add_argument("--num_eval", type=int, default=200)
    syn.add_argument("--seed", type=int, default=0)
    _common(syn, params=False)
    syn.set_defaults(func=_cmd_synth)


def _add_calibrate(sub) -> None:
    cal = sub.add_parser(
        "calibrate", help="measure this machine and write the host target",
        description="Measure matmul FLOP/s, memory bandwidth, per-op overhead and the AdamW "
                    "update rate, and write the `host` target (default: $MMGRAPH_HOME/targets/"
                    "host.yaml, else ~/.cache/mmgraph/targets/host.yaml).")
    cal.add_argument("--output", metavar="FILE", help="where to write the target YAML")
    cal.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    cal.add_argument("--size", type=int, default=1024, help="matmul size (default 1024)")
    _common(cal, params=False)
    cal.set_defaults(func=_cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgraph",
        description="Compile and train LLaVA-family multimodal models for dataflow hardware.",
    )
    parser.add_argument("--version", action="version", version=f"mmgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_check(sub)
    _add_compile(sub)
    _add_inspect(sub)
    _add_run(sub)
    _add_generate(sub)
    _add_convert(sub)
    _add_preprocess(sub)
    _add_data(sub)
    _add_calibrate(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as err:
        if getattr(args, "debug", False):
            raise
        for problem in err.problems:
            print(f"mmgraph: error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # output piped into head/less that closed early
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("mmgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
