"""The ``mmgraph`` command line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from mmgraph import __version__
from mmgraph.errors import EXIT_USER_ERROR, UserError


def _cmd_check(args: argparse.Namespace) -> int:
    from mmgraph.check import check, format_summary

    print(format_summary(check(args.params, args.mode)))
    return 0


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
    check.add_argument("--params", required=True, metavar="FILE", help="params YAML")
    check.add_argument("--mode", choices=("train", "eval", "train_and_eval"), default="train",
                       help="which sections must be present (default: train)")
    check.add_argument("--debug", action="store_true", help="show tracebacks")
    check.set_defaults(func=_cmd_check)
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
    except KeyboardInterrupt:
        print("mmgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
