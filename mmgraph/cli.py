"""The ``mmgraph`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

from mmgraph import __version__
from mmgraph.errors import EXIT_USER_ERROR, UserError


def _cmd_check(args: argparse.Namespace) -> int:
    from mmgraph.check import check, format_summary

    print(format_summary(check(args.params, args.mode)))
    return 0


def _cmd_compile(args: argparse.Namespace) -> int:
    from mmgraph.compile_cmd import run_compile

    return run_compile(args.params, args.model_dir, args.mode, args.validate_only, args.verify, args.target)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from mmgraph.inspect_cmd import run_inspect

    return run_inspect(args.model_dir, args.pass_name, args.kernel, args.diff)


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from mmgraph.calibrate import run_calibrate

    return run_calibrate(args.output, args.device, args.size)


def _common(sub: argparse.ArgumentParser, params: bool = True) -> None:
    if params:
        sub.add_argument("--params", required=True, metavar="FILE", help="params YAML")
    sub.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgraph",
        description="Compile and train LLaVA-family multimodal models for dataflow hardware.",
    )
    parser.add_argument("--version", action="version", version=f"mmgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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
    comp.add_argument("--validate_only", action="store_true",
                      help="stop after params validation and tracing; write nothing")
    comp.add_argument("--verify", action="store_true",
                      help="check every pass: structure always; loss and gradients against eager "
                           "PyTorch when the model is small enough to run")
    comp.set_defaults(func=_cmd_compile)

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
