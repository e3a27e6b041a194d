"""The LLaVA ``config.json`` conventions, as the Model Zoo's ``mmsimple-llava`` converter reads
and writes them (Release_2.3.1 / 2.10.0 ``checkpoint_converters/llava.py``, ``mm_simple.py``).

Read (Hugging Face -> mmgraph): omitted keys take the converter's defaults
(``mm_projector_type: mlp2x_gelu``, ``mm_vision_select_layer: -2``,
``mm_vision_select_feature: patch``, ``tune_mm_mlp_adapter: false``); ``mm_hidden_size`` must be
the vision tower's width; ``mm_use_im_start_end`` and ``mm_use_im_patch_token`` must be false;
``tune_mm_mlp_adapter`` becomes ``freeze``. A LLaVA-NeXT config (``image_aspect_ratio: anyres``)
converts to a single-tile model, and a note says what is not carried over.

Written (mmgraph -> Hugging Face): the converter's defaults for the LLaVA config
(``model_type: llava``, ``image_aspect_ratio: pad``, ...) and a ``preprocessor_config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mmgraph.core.errors import Problem, UserError

# The Model Zoo's defaults for keys a LLaVA config.json may omit (HF side, read).
READ_DEFAULTS = {
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "tune_mm_mlp_adapter": False,
}
# ... and the ones it writes when the configuration does not say otherwise (HF side, write).
WRITE_DEFAULTS = {
    "model_type": "llava",
    "architectures": ["LlavaLlamaForCausalLM"],
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "image_aspect_ratio": "pad",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "freeze_mm_mlp_adapter": False,
    "freeze_mm_vision_resampler": False,
    "tune_mm_vision_resampler": False,
    "unfreeze_mm_vision_tower": False,
    "use_cache": True,
}
# mm_simple's parameter names: the vision tower and the language model (the projector is
# image_model.projection, which the Model Zoo's '^image_model' would also freeze).
FREEZE_VISION, FREEZE_TEXT = "^image_model.image_model_list", "^text_model"
# Keys of LLaVA-NeXT's any-resolution tiling that a single-tile model does not carry.
_ANYRES_KEYS = ("image_grid_pinpoints", "mm_patch_merge_type")


@dataclass
class LlavaSettings:
    """What a LLaVA config.json says about the multimodal model, defaults applied."""

    projector_type: str
    select_layer: int
    select_feature: str
    freeze: list[str]


def read_llava_config(cfg: dict, vision_hidden: Optional[int], where: str) -> LlavaSettings:
    """The Model Zoo's reading of a LLaVA config.json; every problem at once."""
    get = {**READ_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None}}.get
    problems = []
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and vision_hidden is not None and mm_hidden != vision_hidden:
        problems.append(Problem(where, "mm_hidden_size", f"{mm_hidden} is not the vision tower's hidden_size "
                                f"({vision_hidden}): the projector takes the vision features"))
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if get(key) is not False:
            problems.append(Problem(where, key, f"{get(key)!r}: image start/end and patch tokens are not "
                                    "supported (the Model Zoo's converter requires false)"))
    tune = get("tune_mm_mlp_adapter")
    if not isinstance(tune, bool):
        problems.append(Problem(where, "tune_mm_mlp_adapter", f"{tune!r} is not true or false"))
    if problems:
        raise UserError(problems)
    freeze = [FREEZE_VISION, FREEZE_TEXT] if tune else [FREEZE_VISION]
    return LlavaSettings(get("mm_projector_type"), get("mm_vision_select_layer"), get("mm_vision_select_feature"),
                         freeze)


def anyres_note(cfg: dict, where: str, newline_weight: bool = False) -> Optional[str]:
    """One line when the config describes LLaVA-NeXT (any-resolution tiles), else None."""
    aspect = cfg.get("image_aspect_ratio")
    anyres = isinstance(aspect, str) and aspect.startswith("anyres")
    if not anyres and not newline_weight:
        return None
    pinpoints = cfg.get("image_grid_pinpoints")
    merge = cfg.get("mm_patch_merge_type", "flat")
    dropped = []
    if anyres:
        dropped.append(f"image_aspect_ratio {aspect!r} tiles" + (f" (image_grid_pinpoints {pinpoints})"
                                                                 if pinpoints else ""))
    if merge != "flat":
        dropped.append(f"mm_patch_merge_type {merge!r}")
    dropped.append("the image_newline weight" if newline_weight else "image_newline")
    return (f"{where}: LLaVA-NeXT: not carried over: {', '.join(dropped)}; the converted model is a single-tile "
            "LLaVA-1.5 model (one image of the vision tower's size, padded to a square, no newline tokens)")


def llava_config_for_hf(base: dict, freeze: list[str]) -> dict:
    """A LLaVA config.json to write: ``base`` (the source's, when known, and the model's values)
    with the Model Zoo's defaults where it says nothing, ``tune_mm_mlp_adapter`` from ``freeze``
    (true when the language model is frozen, as the Model Zoo maps it), and any-resolution
    tiling removed (the model is single-tile)."""
    out = {**WRITE_DEFAULTS, **base}
    out["tune_mm_mlp_adapter"] = any("text_model" in p for p in freeze)
    aspect = out.get("image_aspect_ratio")
    if isinstance(aspect, str) and aspect.startswith("anyres"):
        out["image_aspect_ratio"] = "pad"
    for key in _ANYRES_KEYS:
        out.pop(key, None)
    return out


def preprocessor_defaults(image_size: int) -> dict:
    """The Model Zoo's ``preprocessor_config.json`` (CLIP's processor) for this image size."""
    return {
        "crop_size": {"height": image_size, "width": image_size},
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_processor_type": "CLIPImageProcessor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": image_size,
    }
