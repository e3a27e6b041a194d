"""The files beside the weights that make a transformers export usable as it is: the image
processor from the params' eval transforms, the processor config, a chat template that
reproduces the training prompt token for token, the generation config.

The prompt the preprocessing wrote (``mmgraph.data.preprocess.Encoder``):
- ``vicuna_v1``: ``<s>SYSTEM USER: [images]question ASSISTANT: answer</s>USER: ...``; a turn's
  images come before its text (the Model Zoo's placement; text pieces stripped and joined).
- ``plain``: ``<s>[images]caption</s>``: the human text is dropped.
- ``chat``: the tokenizer's own chat template.
``<s>`` is written by the template only when the tokenizer does not add it itself, so the
processor's ``apply_chat_template(tokenize=True)``, ``pipeline("image-text-to-text")`` and
lmms-eval (template to text, then the processor) all give one ``<s>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from mmgraph.core.errors import Problem, UserError

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant "
          "gives helpful, detailed, and polite answers to the user's questions.")
_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}

# One turn's content: a string with <image> marks, or a list of {"type": "image"} / {"type": "text"}
# items; the images first (as the preprocessing places them), then the text pieces, stripped.
_CONTENT = """{%- macro content(c, keep_text) -%}
{%- if c is string -%}
{{- IMG * (c.count(IMG)) -}}
{%- if keep_text -%}{{- c.split(IMG) | map('trim') | reject('equalto', '') | join(' ') -}}{%- endif -%}
{%- else -%}
{%- for item in c if item['type'] == 'image' -%}{{- IMG -}}{%- endfor -%}
{%- if keep_text -%}{{- c | selectattr('type', 'equalto', 'text') | map(attribute='text') | map('trim')
    | reject('equalto', '') | join(' ') -}}{%- endif -%}
{%- endif -%}
{%- endmacro -%}
"""

_VICUNA = """{%- set ns = namespace(system=SYSTEM) -%}
{%- for m in messages if m['role'] == 'system' -%}
{%- set ns.system = m['content'] if m['content'] is string else (m['content'] | map(attribute='text') | join(' ')) -%}
{%- endfor -%}
{{- BOS ~ ns.system ~ ' ' -}}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{- 'USER: ' ~ content(m['content'], true) -}}
{%- elif m['role'] == 'assistant' -%}{{- ' ASSISTANT: ' ~ content(m['content'], true) ~ eos_token -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- ' ASSISTANT: ' -}}{%- endif -%}
"""

_PLAIN = """{{- BOS -}}
{%- for m in messages -%}
{%- if m['role'] == 'user' -%}{{- content(m['content'], false) -}}
{%- elif m['role'] == 'assistant' -%}{{- content(m['content'], true) ~ eos_token -}}
{%- endif -%}
{%- endfor -%}
"""


def chat_template(template: str, tokenizer, image_token: str = "<image>") -> str:
    """The Jinja chat template reproducing the training prompt of ``template``."""
    if template == "chat":
        own = getattr(tokenizer, "chat_template", None)
        if not own:
            raise UserError(Problem(None, "--template", "chat: the tokenizer has no chat template to export"))
        return own
    bos = "" if _adds_bos(tokenizer) else "{{ bos_token }}"
    head = (f"{{%- set IMG = {json.dumps(image_token)} -%}}\n{{%- set SYSTEM = {json.dumps(SYSTEM)} -%}}\n"
            f"{{%- set BOS -%}}{bos}{{%- endset -%}}\n")
    return head + _CONTENT + (_VICUNA if template == "vicuna_v1" else _PLAIN)


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    ids = tokenizer("a").input_ids
    return bos is not None and bool(ids) and ids[0] == bos


def transforms_of(params: dict) -> list[dict]:
    data = params.get("eval_input") or params.get("train_input") or {}
    return [t for t in (data.get("transforms") or []) if isinstance(t, dict)]


def image_processor_config(params: Optional[dict], image_size: int, pad: Optional[bool] = None,
                           where: str = "params.yaml") -> tuple[dict, list[str]]:
    """A CLIP / LLaVA image processor config equivalent to the params' eval transforms (or CLIP's
    defaults at ``image_size`` when the params have none); notes for what does not carry over.
    ``pad`` None: a LlavaImageProcessor (``do_pad``) when the transforms pad to a square;
    False: a CLIPImageProcessor (the LLaVA repository pads by ``image_aspect_ratio``)."""
    cfg = {"do_resize": True, "size": {"shortest_edge": image_size}, "resample": 3,
           "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
           "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
           "do_convert_rgb": True}
    notes = []
    transforms = transforms_of(params or {})
    padded, background = False, None
    if transforms:
        cfg.update(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=False)
    for i, t in enumerate(transforms):
        name = t.get("name")
        if name == "expand_to_square":
            padded, background = True, t.get("background_color") or [0, 0, 0]
        elif name == "resize":
            size = t.get("size")
            cfg["size"] = {"shortest_edge": size} if isinstance(size, int) else {"height": size[0], "width": size[1]}
            cfg.update(do_resize=True, resample=_RESAMPLE.get(t.get("interpolation") or "bilinear", 2))
        elif name == "center_crop":
            size = t.get("size")
            h, w = (size, size) if isinstance(size, int) else size
            cfg.update(do_center_crop=True, crop_size={"height": h, "width": w})
        elif name == "to_tensor":
            cfg["do_rescale"] = True
        elif name == "normalize":
            cfg.update(do_normalize=True, image_mean=list(t["mean"]), image_std=list(t["std"]))
        else:
            notes.append(f"{where}: eval_input.transforms[{i}]: {name!r} has no image processor equivalent; "
                         "not carried over")
    if padded and pad is not False:
        expected = [int(m * 255) for m in cfg["image_mean"]]
        if list(background) != expected:
            notes.append(f"{where}: expand_to_square background_color {list(background)}: transformers' LLaVA "
                         f"image processor pads with the mean {expected}")
        cfg.update(image_processor_type="LlavaImageProcessor", do_pad=True)
    else:
        cfg["image_processor_type"] = "CLIPImageProcessor"
    return cfg, notes


def processor_config(patch_size: int, select_mode: str, image_token: str) -> dict:
    """LlavaProcessor's settings: images expand to (size / patch)^2 + 1 tokens, less the CLS
    token with the ``default`` strategy (``patch`` features)."""
    return {"processor_class": "LlavaProcessor", "patch_size": patch_size,
            "vision_feature_select_strategy": "default" if select_mode == "patch" else "full",
            "num_additional_image_tokens": 1, "image_token": image_token}


def generation_config(tokenizer, end_of_turn: Optional[str]) -> dict:
    eos = tokenizer.eos_token_id
    if end_of_turn:
        eot = tokenizer.convert_tokens_to_ids(end_of_turn)
        eos = eot if eot is not None and eot != tokenizer.unk_token_id else eos
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}


def write_processor_files(out: Path, tokenizer_dir: Path, template: str, preprocessor: dict, patch_size: int,
                          select_mode: str, image_token: str, end_of_turn: Optional[str]) -> None:
    """preprocessor_config.json (for ``LlavaProcessor``), processor_config.json,
    chat_template.jinja and generation_config.json in ``out`` (whose tokenizer files are
    already copied)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    _write_json(out / "preprocessor_config.json", {**preprocessor, "processor_class": "LlavaProcessor"})
    _write_json(out / "processor_config.json", processor_config(patch_size, select_mode, image_token))
    (out / "chat_template.jinja").write_text(chat_template(template, tok, image_token))
    _write_json(out / "generation_config.json", generation_config(tok, end_of_turn))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
