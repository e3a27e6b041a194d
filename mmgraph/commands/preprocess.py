"""``mmgraph preprocess``'s arguments (and a Model Zoo config) to one ``preprocess`` call."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from mmgraph.core.config import load_params
from mmgraph.core.errors import Problem, UserError
from mmgraph.data.modelzoo_preproc import job_inputs, read_config
from mmgraph.data.preprocess import Layout, PackOptions, Style, preprocess


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(Problem(path, None, f"cannot read the chat template: {err}")) from None


def _layout_from_params(path: str) -> Layout:
    lay = load_params(path, "train").layout("train")
    return Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img)


def run_preprocess(args: argparse.Namespace) -> tuple[dict, str]:
    job = None
    if args.config:

        job = read_config(args.config)
        for note in job.notes:
            print(f"mmgraph: note: {args.config}: {note}", file=sys.stderr)
    inputs = [args.input_json] if args.input_json else (job_inputs(job, args.config) if job else [])
    image_dir = args.image_dir or (job.image_dir if job else None)
    tokenizer = args.tokenizer or (job.tokenizer if job else None)
    output_dir = args.output_dir or (job.output_dir if job else None)
    phase = args.phase or (job.phase if job else None)
    missing = [name for name, v in (("--input_json", inputs), ("--image_dir", image_dir), ("--tokenizer", tokenizer),
                                    ("--output_dir", output_dir), ("--phase", phase)) if not v]
    if missing:
        raise UserError(Problem(None, missing[0], "required" + (" (the config does not say)" if job else "")))
    for flag, value in (("--samples_per_file", args.samples_per_file), ("--num_workers", args.num_workers)):
        if value < 1:
            raise UserError(Problem(None, flag, f"must be at least 1, not {value}"))
    layout = _layout(args, job)
    style = job.style if job else Style(template=args.template)
    changes = {"placement": args.image_placement}
    if args.template:
        changes["template"] = args.template
    if args.chat_template:
        changes.update(template="chat", chat_template=_read_template(args.chat_template))
    style = dataclasses.replace(style, **changes)
    stats = preprocess(inputs, image_dir, tokenizer, output_dir, phase, layout, args.samples_per_file,
                       args.num_workers, args.on_error, args.on_long, progress=sys.stderr.isatty(), style=style,
                       shuffle_seed=job.shuffle_seed if job else None, config=job.config if job else None,
                       pack=_pack(args, job))
    return stats, output_dir


def _layout(args: argparse.Namespace, job) -> Layout:
    if args.params:
        return _layout_from_params(args.params)
    values = {"max_seq_length": args.max_seq_length, "num_patches": args.num_patches,
              "max_num_img": args.max_num_img}
    if job is not None:
        values = {k: v if v is not None else getattr(job.layout, k) for k, v in values.items()}
    missing = [f"--{k}" for k, v in values.items() if v is None]
    if missing:
        raise UserError(Problem(None, None, f"give --params or {', '.join(missing)}"))
    for k, v in values.items():
        if v <= 0:
            raise UserError(Problem(None, f"--{k}", f"must be positive, not {v}"))
    return Layout(**values)


def _pack(args: argparse.Namespace, job) -> "PackOptions | None":
    """``--pack`` (with ``--pack_window``, ``--pack_seed``) or the config's ``pack_sequences``."""
    base = job.pack if job is not None else None
    if not getattr(args, "pack", False) and base is None:
        return None
    base = base or PackOptions()
    window = args.pack_window if getattr(args, "pack_window", None) is not None else base.window
    seed = args.pack_seed if getattr(args, "pack_seed", None) is not None else base.seed
    if window < 1:
        raise UserError(Problem(None, "--pack_window", f"must be at least 1, not {window}"))
    return PackOptions(window, seed)
