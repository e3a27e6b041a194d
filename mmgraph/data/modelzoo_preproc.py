"""``mmgraph preprocess --config FILE``: the Model Zoo's own preprocessing YAML.

Reads the ``setup`` / ``processing`` / ``dataset`` sections of its
``data_preparation/data_preprocessing`` configs (2.3 layout with ``read_hook_kwargs.data_keys``,
2.10 layout with the keys flat and ``setup.image_dir``) for the two LLaVA hooks:
``finetuning_llava_hook`` (chat template) and ``finetuning_llava_hook_prompt_completion``
(prompt + sep_token + completion). Nothing named in the file is imported or run: a
``custom_tokenizer`` class is not loaded, its ``tokenizer_params.pretrained_model_name_or_path``
is read as a local tokenizer folder. Keys that only steer the Model Zoo's own machinery
(processes, batch writing, resuming, text cleaning) are accepted and listed as not used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from mmgraph.core.errors import Problem, UserError, did_you_mean
from mmgraph.data.preprocess import Layout, PackOptions, Style

HOOKS = {"finetuning_llava_hook": "chat", "finetuning_llava_hook_prompt_completion": "prompt_completion"}
NOT_USED = {
    "setup": {"processes", "mode", "data"},
    "processing": {"write_in_batch", "resume_from_checkpoint", "write_remainder", "use_ftfy", "ftfy_normalizer",
                   "wikitext_detokenize", "UNSAFE_skip_jsonl_decoding_errors",
                   "display_pbar", "input_ids_dtype", "input_mask_dtype", "min_sequence_len"},
    "dataset": {"use_ftfy", "ftfy_normalizer", "wikitext_detokenize", "is_multimodal"},
}
USED = {
    "setup": {"output_dir", "image_dir", "data"},
    "processing": {"huggingface_tokenizer", "tokenizer_params", "custom_tokenizer", "max_seq_length", "read_hook", "read_hook_kwargs",
                   "shuffle_seed", "shuffle", "chat_template", "end_of_turn_token",
                   "pack_sequences", "pack_window", "pack_seed"},          # mmgraph's packing keys
    "dataset": {"image_dir", "num_patches", "max_num_img", "sep_token", "chat_template", "image_token"},
}


@dataclass
class Job:
    """What one Model Zoo config asks for, in mmgraph's terms."""

    config: dict
    inputs: list[str]
    output_dir: Optional[str]
    image_dir: Optional[str]
    tokenizer: Optional[str]
    phase: int
    layout: Layout
    style: Style
    shuffle_seed: Optional[int]
    notes: list[str] = field(default_factory=list)
    pack: Optional[PackOptions] = None        # processing.pack_sequences (mmgraph's key)


def _section(raw: dict, name: str, path: str) -> dict:
    value = raw.get(name, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(Problem(path, name, "must be a mapping"))
    return value


def _inputs(source: Optional[str], path: str) -> list[str]:
    if not source:
        return []
    p = Path(source)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.suffix in (".json", ".jsonl"))
        if not files:
            raise UserError(Problem(path, "setup.data.source", f"{source} holds no .json / .jsonl file"))
        return files
    return [source]


def read_config(path: str) -> Job:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise UserError(Problem(path, None, f"cannot read the preprocessing config: {str(err).splitlines()[0]}")) from None
    if not isinstance(raw, dict):
        raise UserError(Problem(path, None, "a preprocessing config is a mapping with setup / processing / dataset"))
    if "dataset_processor" in (raw.get("setup") or {}):
        raise UserError(Problem(path, "setup.dataset_processor", "the older nlp/hdf5_preprocessing configs are not "
                                "read; use --phase 1 (plain) or --phase 2 (vicuna_v1) with --params"))
    setup, proc, data = (_section(raw, k, path) for k in ("setup", "processing", "dataset"))
    notes = _unused(raw, path)
    unknown = [Problem(path, None, n) for n in notes if ": unknown" in n or "not a section" in n]
    hook = str(proc.get("read_hook", "")).rsplit(":", 1)[-1]
    kw = dict(proc.get("read_hook_kwargs") or {})
    kw.update(kw.pop("data_keys", None) or {})               # 2.3 nests the data keys
    problems = []
    if hook not in HOOKS:
        problems.append(Problem(path, "processing.read_hook", f"{proc.get('read_hook')!r}: mmgraph reads the LLaVA "
                                f"hooks ({', '.join(HOOKS)})"))
    if kw.get("phase") not in (1, 2):
        problems.append(Problem(path, "processing.read_hook_kwargs.phase", "must be 1 or 2"))
    if problems:
        raise UserError(problems + unknown)
    tokenizer = proc.get("huggingface_tokenizer") or (proc.get("tokenizer_params") or {}).get(
        "pretrained_model_name_or_path")
    if proc.get("custom_tokenizer"):
        notes.append(f"processing.custom_tokenizer {proc['custom_tokenizer']} is not imported (mmgraph runs no code "
                     "named in a config); the tokenizer folder is used as it is")
    if kw.get("system_prompt_style") or kw.get("system_prompt"):
        notes.append("read_hook_kwargs.system_prompt_style: no system turn is added (as the Model Zoo's hook: "
                     "the chat template decides)")
    style = Style(template=HOOKS[hook], placement="turn_start",
                  chat_template=proc.get("chat_template") or data.get("chat_template"),
                  image_token=data.get("image_token", "<special_image_token>"), mark=kw.get("image_token", "<image>"),
                  sep_token=data.get("sep_token"), end_of_turn=proc.get("end_of_turn_token"),
                  pad_placeholders=True, one_image_per_turn=True,
                  conversations_key=kw.get("multi_turn_key", "conversations"), image_key=kw.get("image_key", "image"),
                  content_key=kw.get("multi_turn_content_key", "value"), role_key=kw.get("multi_turn_role_key", "from"))
    layout = Layout(_count(path, "processing.max_seq_length", proc.get("max_seq_length", 2048)),
                    _count(path, "dataset.num_patches", data.get("num_patches", 1)),
                    _count(path, "dataset.max_num_img", data.get("max_num_img", 1)))
    seed = int(proc.get("shuffle_seed", 0)) if proc.get("shuffle") else None
    source = (setup.get("data") or {}).get("source") if isinstance(setup.get("data"), dict) else None
    if isinstance(setup.get("data"), dict) and setup["data"].get("type", "local") != "local":
        notes.append("setup.data.type: only local input is read (nothing downloads); give --input_json")
        source = None
    pack = None
    if proc.get("pack_sequences"):
        pack = PackOptions(_count(path, "processing.pack_window", proc.get("pack_window", 1000)),
                           int(proc.get("pack_seed", 0)))
    return Job(raw, [] if source is None else [source], setup.get("output_dir"),
               setup.get("image_dir") or data.get("image_dir"), tokenizer, kw["phase"], layout, style, seed, notes,
               pack)


def _count(path: str, where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(Problem(path, where, f"must be a positive integer, not {value!r}"))
    return value


def _unused(raw: dict, path: str) -> list[str]:
    notes, accepted = [], []
    for name, value in raw.items():
        if name not in USED:
            notes.append(f"{name}: not a section mmgraph reads{did_you_mean(name, USED)}")
            continue
        for key in (value or {}):
            if key in NOT_USED[name] and key not in USED[name]:
                accepted.append(f"{name}.{key}")
            elif key not in USED[name]:
                notes.append(f"{name}.{key}: unknown, not used{did_you_mean(key, USED[name] | NOT_USED[name])}")
    if accepted:
        notes.insert(0, f"accepted, not used (the Model Zoo's own machinery): {', '.join(accepted)}")
    return notes


def job_inputs(job: Job, path: str) -> list[str]:
    return [f for s in job.inputs for f in _inputs(s, path)]
