"""A params file in a given Model Zoo release's layout: what an .mdl written for that release
embeds (``__metadata__``), and the params file written beside it.

- 2.3: the section layout (``train_input``, ``eval_input``, ``model``, ``optimizer``,
  ``runconfig``); the llava model in its own keys.
- 2.4 and later: ``trainer: {init, fit}`` (the inverse of ``layouts.normalize``'s trainer
  table), with what Model Zoo 2.10's validator requires: ``model.name``
  (``multimodal_simple`` / ``llava``), ``image_models[i].image_encoder`` as a mapping (and
  ``projection_layer``), no ``bos_token_id`` / ``pad_token_id`` in the dataloaders.

A source file already in the target's layout is kept as written (keys mmgraph ignores stay),
with only those fixes applied. Either way the keys whose defaults differ between mmgraph and
the Model Zoo (dropout rates, ``rotary_dim``, the patch embedding's kind) are written with the
values mmgraph built the model with, so the Model Zoo builds the same model.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Optional

from mmgraph.core.config.layouts import normalize
from mmgraph.core.config.model import ModelConfig
from mmgraph.core.errors import Problem, UserError

OLDEST, NEWEST = (2, 3), (2, 10)
_TRAINER_FROM = (2, 4)
_DATA_DROP = ("bos_token_id", "pad_token_id")
_MODEL_DROP = ("label_smoothing", "z_loss_eps")
_SCHEDULERS = {"Linear": "LinearLR", "CosineDecay": "CosineDecayLR", "Constant": "ConstantLR",
               "Exponential": "ExponentialLR"}
_PRECISION_KEYS = ("loss_scaling_factor", "initial_loss_scale", "steps_per_increase", "min_loss_scale",
                   "max_loss_scale", "max_gradient_norm")
_OPT_KEYS_NOT_ARGS = {"optimizer_type", "learning_rate", *_PRECISION_KEYS, "log_summaries"}
_RELEASE = re.compile(r"cs-(\d+)\.(\d+)")


def parse_release(fmt: str, flag: str) -> tuple[int, int]:
    """``cs-2.10`` -> (2, 10); a release mmgraph has no layout for is an error naming the flag."""
    m = _RELEASE.fullmatch(fmt)
    release = (int(m.group(1)), int(m.group(2))) if m else None
    if release is None or not OLDEST <= release <= NEWEST:
        raise UserError(Problem(None, flag, f"{fmt!r}: the Model Zoo's .mdl is read and written for releases "
                                f"cs-{OLDEST[0]}.{OLDEST[1]} to cs-{NEWEST[0]}.{NEWEST[1]}"))
    return release


def version_string(release: tuple[int, int]) -> str:
    return f"{release[0]}.{release[1]}.0"


def model_class(cfg: ModelConfig) -> str:
    """The trainer's model class name recorded in the .mdl's ``__metadata__``."""
    return "LlavaModel" if cfg.name == "llava" else "MMSimpleModel"


def params_for_release(raw: Optional[dict], sections: dict, cfg: ModelConfig,
                       release: tuple[int, int]) -> dict:
    """The params for ``release``: ``raw`` (the user's file, any layout; None when the source had
    none) and ``sections`` (its normalized 2.3 sections, or mmgraph's defaults)."""
    trainer = release >= _TRAINER_FROM
    if raw is not None and ("trainer" in raw) == trainer:
        out = copy.deepcopy(raw)
    else:
        out = _to_trainer(sections, raw) if trainer else _to_23(sections, raw)
    model = _model_of(out)
    _explicit_defaults(model, cfg)
    if trainer:
        init = out["trainer"]["init"]
        init["model"] = model = {"name": model.get("name", cfg.name), **{k: v for k, v in model.items()
                                                                         if k != "name"}}
        for entry in (model.get("image_model_list") or {}).get("image_models") or []:
            if isinstance(entry, dict) and isinstance(entry.get("image_model"), list):
                parts = entry.pop("image_model")
                entry["image_encoder"] = parts[0]
                if len(parts) > 1:
                    entry["projection_layer"] = parts[1]
        for key in _MODEL_DROP:                 # keys 2.10 does not have, at the only value mmgraph takes
            if model.get(key) == 0.0:
                model.pop(key)
        fit = out["trainer"].get("fit") or {}
        for name in ("train_dataloader", "val_dataloader"):
            loaders = fit.get(name)
            for loader in loaders if isinstance(loaders, list) else [loaders]:
                if isinstance(loader, dict):
                    for key in _DATA_DROP:
                        loader.pop(key, None)
                    if cfg.name == "llava":     # the llava model's loader: one image per sample
                        loader["data_processor"] = "LlavaHDF5MapDataProcessor"
                        loader.pop("max_num_img", None)
    return out


def _model_of(params: dict) -> dict:
    if "trainer" in params:
        return params["trainer"]["init"]["model"]
    return params["model"]


def _explicit_defaults(model: dict, cfg: ModelConfig) -> None:
    """Write the values mmgraph built the model with where the defaults differ between releases
    and tools (2.10: dropout 0.1 and rotary_dim = head_dim / 4 when omitted)."""
    t = cfg.text_model
    text = model.setdefault("text_model", {})
    text["rotary_dim"] = t.rotary_dim or t.head_dim
    text["dropout_rate"] = t.dropout_rate
    text["attention_dropout_rate"] = t.attention_dropout_rate
    text["embd_pdrop"] = t.embd_pdrop or t.embedding_dropout_rate          # two names of one rate
    text.pop("embedding_dropout_rate", None)
    if cfg.name == "llava":
        vits = [model.get("image_model")]
    else:
        vits = []
        for entry in (model.get("image_model_list") or {}).get("image_models") or []:
            parts = entry.get("image_model") or [entry.get("image_encoder")]
            vits.append(parts[0] if isinstance(parts, list) else parts)
    for vit, entry in zip(vits, cfg.image_model_list.image_models):
        if not isinstance(vit, dict):
            continue
        enc = entry.encoder
        vit["dropout_rate"] = enc.dropout_rate
        vit["attention_dropout_rate"] = enc.attention_dropout_rate
        vit["embedding_dropout_rate"] = enc.embedding_dropout_rate
        vit["use_conv_patchified_embedding"] = enc.use_conv_patchified_embedding


def _carried(raw: Optional[dict]) -> dict:
    """Model keys mmgraph ignores but the Model Zoo uses, from the user's file."""
    if not isinstance(raw, dict):
        return {}
    model = raw.get("model")
    if "trainer" in raw:
        model = ((raw.get("trainer") or {}).get("init") or {}).get("model")
    return {k: model[k] for k in ("image_start_idx",) if isinstance(model, dict) and k in model}


def _llava_model(model: dict) -> dict:
    """mmgraph's one-encoder model as the llava model's keys (the inverse of ``_from_llava``)."""
    out = {k: v for k, v in model.items() if k not in ("image_model_list", "name")}
    lst = model["image_model_list"]
    vit = dict(lst["image_models"][0]["image_model"][0])
    idx = vit.pop("image_layer_idx", None)
    proj = dict(lst.get("global_image_projection") or {})
    if proj.get("kernel_initializer") == {"name": "kaiming_uniform", "a": 5 ** 0.5}:
        proj.pop("kernel_initializer")                   # the llava model's own default, put in on reading
    if proj.get("bias_initializer") == "zeros":
        proj.pop("bias_initializer")
    return {"image_model": vit, "text_model": out.pop("text_model"), "projector": {"image_model": proj},
            **out, "image_feature_select_layer_idx": -1 if idx is None else idx,
            "image_feature_select_mode": lst.get("image_feature_select_mode", "patch")}


def _model_section(sections: dict, raw: Optional[dict]) -> dict:
    model = copy.deepcopy(sections["model"])
    if model.get("name") == "llava":
        model = _llava_model(model)
        model.update(_carried(raw))
    model.pop("name", None)
    return model


def _to_23(sections: dict, raw: Optional[dict]) -> dict:
    out = {k: copy.deepcopy(v) for k, v in sections.items() if k != "model"}
    out = {"train_input": out.pop("train_input", None), "eval_input": out.pop("eval_input", None),
           "model": _model_section(sections, raw), **out}
    return {k: v for k, v in out.items() if v is not None}


def _schedulers(lr: Any) -> tuple[Optional[float], Optional[list]]:
    if isinstance(lr, (int, float)):
        return float(lr), None
    items = lr if isinstance(lr, list) else [lr]
    named = []
    for s in items:
        args = {k: v for k, v in s.items() if k != "scheduler" and v is not None}
        name = s["scheduler"]
        named.append({_SCHEDULERS.get(name, name): args})
    return None, (named if len(named) == 1 else [{"SequentialLR": {"schedulers": named}}])


def _to_trainer(sections: dict, raw: Optional[dict]) -> dict:
    model = _model_section(sections, raw)
    init: dict[str, Any] = {"backend": {"backend_type": "CPU"}}
    run = dict(sections.get("runconfig") or {})
    if "model_dir" in run:
        init["model_dir"] = run.pop("model_dir")
    if "seed" in run:
        init["seed"] = run.pop("seed")
    precision = {"enabled": model.pop("mixed_precision", True)}
    if "fp16_type" in model:
        precision["fp16_type"] = model.pop("fp16_type")
    init["model"] = model
    opt = dict(sections.get("optimizer") or {})
    if opt:
        lr, schedulers = _schedulers(opt.get("learning_rate", 0.0))
        args = {k: v for k, v in opt.items() if k not in _OPT_KEYS_NOT_ARGS and k != "optim_params"}
        args.update(opt.get("optim_params") or {})
        if lr is not None:
            args["lr"] = lr
        init["optimizer"] = {opt["optimizer_type"]: args}
        if schedulers:
            init["schedulers"] = schedulers
        precision.update({k: opt[k] for k in _PRECISION_KEYS if opt.get(k) is not None})
    init["precision"] = precision
    loop = {k: run.pop(k) for k in ("max_steps", "num_epochs", "eval_frequency", "eval_steps") if k in run}
    if loop:
        init["loop"] = loop
    ckpt = {new: run.pop(old) for old, new in (("checkpoint_steps", "steps"),
                                               ("save_initial_checkpoint", "save_initial_checkpoint"),
                                               ("disable_strict_checkpoint_loading",
                                                "disable_strict_checkpoint_loading")) if old in run}
    if ckpt:
        init["checkpoint"] = ckpt
    if "log_steps" in run:
        init["logging"] = {"log_steps": run.pop("log_steps")}
    callbacks: list[dict] = []
    fit: dict[str, Any] = {}
    for section, loader, flags in (("train_input", "train_dataloader", "ScopedTrainFlags"),
                                   ("eval_input", "val_dataloader", "ScopedValidateFlags")):
        data = copy.deepcopy(sections.get(section))
        if not isinstance(data, dict):
            continue
        micro = data.pop("micro_batch_size", None)
        if micro not in (None, data.get("batch_size"), "none"):
            callbacks.append({flags: {"csx.performance.micro_batch_size": micro}})
        fit[loader] = data
    if run.get("load_checkpoint_states"):
        callbacks.append({"LoadCheckpointStates": {"load_checkpoint_states": run.pop("load_checkpoint_states")}})
    if run.get("max_checkpoints"):
        callbacks.append({"KeepNCheckpoints": {"n": run.pop("max_checkpoints")}})
    if callbacks:
        init["callbacks"] = callbacks
    if run.get("checkpoint_path"):
        fit["ckpt_path"] = run.pop("checkpoint_path")
    trainer: dict[str, Any] = {"init": init}
    if fit:
        trainer["fit"] = fit
    return {"trainer": trainer}


def sections_of(raw: dict, where: str) -> dict:
    """The normalized 2.3 sections of a params dict; problems of the layout are errors."""
    norm = normalize(raw)
    if norm.problems:
        raise UserError([Problem(where, w, m) for w, m in norm.problems])
    return norm.sections
