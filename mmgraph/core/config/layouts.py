"""The Model Zoo's params layouts, brought to one: the 2.3 section layout of ``multimodal_simple``.

- the 2.3 layout: ``train_input``, ``eval_input``, ``model``, ``optimizer``, ``runconfig``;
- the ``trainer:`` layout (Model Zoo 2.4 and later): ``trainer.init`` (model, optimizer,
  schedulers, precision, loop, checkpoint, logging, callbacks, seed) and ``trainer.fit``
  (``train_dataloader``, ``val_dataloader``); ``image_models[i].image_encoder`` /
  ``projection_layer`` for ``image_model: [encoder, projection]``;
- the older ``llava`` model: ``model.image_model`` (one ViT), ``model.projector.image_model``,
  ``image_feature_select_layer_idx``; its freeze patterns name its own modules
  (``image_model``, ``projector_image_model``), kept with ``model.name: llava``.

``normalize`` returns the 2.3 sections, the keys it ignored (with why) and how to name a key
of the result in the user's file (``renames``), so errors point at what the user wrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmgraph.core.config.ignored import IGNORED_KEYS, strip_ignored
from mmgraph.core.errors import did_you_mean

MICRO_BATCH_FLAG = "csx.performance.micro_batch_size"
_TRAINER_KEYS = {"init", "fit", "validate", "validate_all"}
_INIT_KEYS = {"model", "optimizer", "schedulers", "precision", "loop", "checkpoint", "logging",
              "callbacks", "seed", "model_dir"} | set(IGNORED_KEYS["trainer.init"])
_CALLBACKS = {"ScopedTrainFlags", "ScopedValidateFlags", "LoadCheckpointStates", "KeepNCheckpoints"}
_PRECISION = {"enabled": ("model", "mixed_precision"), "fp16_type": ("model", "fp16_type"),
              "loss_scaling_factor": ("optimizer",), "initial_loss_scale": ("optimizer",),
              "steps_per_increase": ("optimizer",), "min_loss_scale": ("optimizer",),
              "max_loss_scale": ("optimizer",), "max_gradient_norm": ("optimizer",)}
_LOOP = {"max_steps": "max_steps", "num_steps": "max_steps", "num_epochs": "num_epochs",
         "eval_frequency": "eval_frequency", "eval_steps": "eval_steps"}
_CHECKPOINT = {"steps": "checkpoint_steps", "save_initial_checkpoint": "save_initial_checkpoint",
               "disable_strict_checkpoint_loading": "disable_strict_checkpoint_loading"}


@dataclass
class Normalized:
    sections: dict[str, Any]
    layout: str                                   # "2.3" or "trainer"
    ignored: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)   # (where, message)
    renames: list[tuple[str, str]] = field(default_factory=list)    # (2.3 prefix, file prefix)

    def where(self, loc: str) -> str:
        """A 2.3 location as the user's file names it (longest matching prefix)."""
        for new, old in sorted(self.renames, key=lambda r: -len(r[0])):
            if loc == new or loc.startswith(new + ".") or loc.startswith(new + "["):
                return old + loc[len(new):]
        return loc


def normalize(raw: dict) -> Normalized:
    if "trainer" in raw:
        out = Normalized({}, "trainer")
        _from_trainer(raw, out)
    else:
        out = Normalized(dict(raw), "2.3")
        out.sections = strip_ignored("top", out.sections, "", out.ignored)
    model = out.sections.get("model")
    if isinstance(model, dict):
        out.sections["model"] = _model(model, out)
    for name in ("train_input", "eval_input"):
        if isinstance(out.sections.get(name), dict):
            where = out.where(name)
            out.sections[name] = strip_ignored("input", out.sections[name], where, out.ignored)
    for name in ("optimizer", "runconfig"):
        if isinstance(out.sections.get(name), dict):
            out.sections[name] = strip_ignored(name, out.sections[name], out.where(name), out.ignored)
    return out


# ---------------------------------------------------------------------------------------------
# model: llava -> multimodal_simple, image_encoder -> image_model list, ignored keys
# ---------------------------------------------------------------------------------------------


def _model(model: dict, out: Normalized) -> dict:
    base = out.where("model")
    is_llava = model.get("name") == "llava" or isinstance(model.get("image_model"), dict) or "projector" in model
    model = _from_llava(model, out) if is_llava else dict(model)
    if model.get("name") == "multimodal_simple":
        del model["name"]
    model = strip_ignored("model", model, base, out.ignored, out.problems)
    lst = model.get("image_model_list")
    if isinstance(lst, dict) and isinstance(lst.get("image_models"), list):
        lst = dict(lst)
        lst["image_models"] = [_image_entry(e, i, out) for i, e in enumerate(lst["image_models"])]
        if isinstance(lst.get("global_image_projection"), dict):
            lst["global_image_projection"] = strip_ignored(
                "ffn", lst["global_image_projection"], out.where("model.image_model_list.global_image_projection"),
                out.ignored, out.problems)
        model["image_model_list"] = lst
    if isinstance(model.get("text_model"), dict):
        model["text_model"] = strip_ignored("text_model", model["text_model"], out.where("model.text_model"),
                                            out.ignored, out.problems)
    return model


# The ViT's dropout_rate when a file leaves it out: 0.0 in Model Zoo 2.3.1 (the schema's default),
# 0.1 in 2.10 (vision_transformer/ViTModel.py), whose params use the trainer layout.
TRAINER_VIT_DROPOUT = 0.1


def _image_entry(entry: Any, i: int, out: Normalized) -> Any:
    if not isinstance(entry, dict):
        return entry
    here = f"model.image_model_list.image_models[{i}]"
    if "image_encoder" in entry:       # trainer layout: {image_encoder, projection_layer}
        parts = [entry["image_encoder"]] + ([entry["projection_layer"]] if entry.get("projection_layer") else [])
        rest = {k: v for k, v in entry.items() if k not in ("image_encoder", "projection_layer")}
        out.renames.append((f"{here}.image_model[0]", f"{out.where(here)}.image_encoder"))
        out.renames.append((f"{here}.image_model[1]", f"{out.where(here)}.projection_layer"))
        entry = {**rest, "image_model": parts}
    parts = entry.get("image_model")
    if isinstance(parts, list):
        kept = []
        for j, part in enumerate(parts):
            if isinstance(part, dict):
                scope = "vit" if part.get("name") in ("ViTModel", "vit") else "ffn"
                part = strip_ignored(scope, part, out.where(f"{here}.image_model[{j}]"), out.ignored, out.problems)
                if part.get("name") == "vit":
                    part["name"] = "ViTModel"
                if scope == "vit" and out.layout == "trainer" and "dropout_rate" not in part:
                    part["dropout_rate"] = TRAINER_VIT_DROPOUT
            kept.append(part)
        entry = {**entry, "image_model": kept}
    return entry


def _from_llava(model: dict, out: Normalized) -> dict:
    """The ``llava`` model's keys as a one-encoder ``multimodal_simple`` model."""
    model = dict(model)
    model["name"] = "llava"
    vit = model.pop("image_model", None)
    projector = model.pop("projector", None)
    idx = model.pop("image_feature_select_layer_idx", -1)
    lst: dict[str, Any] = {"image_feature_select_mode": model.pop("image_feature_select_mode", "patch")}
    if isinstance(vit, dict):
        vit = dict(vit)
        # Model Zoo: idx % num_hidden_layers, run blocks 0..idx, no final norm (-1 = every block)
        vit.setdefault("image_layer_idx", -1 if idx is None else idx)
    lst["image_models"] = [{"image_model": [vit]}]
    out.renames.append(("model.image_model_list.image_models[0].image_model[0].image_layer_idx",
                        out.where("model") + ".image_feature_select_layer_idx"))
    out.renames.append(("model.image_model_list.image_models[0].image_model[0]", out.where("model") + ".image_model"))
    out.renames.append(("model.image_model_list.image_feature_select_mode",
                        out.where("model") + ".image_feature_select_mode"))
    if isinstance(projector, dict):
        extra = sorted(k for k in projector if k != "image_model")
        for k in extra:
            out.problems.append((f"{out.where('model')}.projector.{k}",
                                 "only projector.image_model is supported" + did_you_mean(k, ["image_model"])))
        proj = projector.get("image_model")
        if isinstance(proj, dict):
            # the llava model initializes its projector like torch.nn.Linear
            proj = {"kernel_initializer": {"name": "kaiming_uniform", "a": 5 ** 0.5},
                    "bias_initializer": "zeros", **proj}
            lst["global_image_projection"] = proj
            out.renames.append(("model.image_model_list.global_image_projection",
                                out.where("model") + ".projector.image_model"))
    model["image_model_list"] = lst
    return model


# ---------------------------------------------------------------------------------------------
# trainer layout -> sections
# ---------------------------------------------------------------------------------------------


def _one_key(value: Any, where: str, out: Normalized) -> tuple[str, dict] | None:
    """``{Name: {args}}`` -> (Name, args); a problem otherwise."""
    if isinstance(value, dict) and len(value) == 1:
        name, args = next(iter(value.items()))
        if args is None:
            args = {}
        if isinstance(args, dict):
            return str(name), args
    out.problems.append((where, "expected a mapping with one key, the class name (e.g. AdamW: {...})"))
    return None


def _from_trainer(raw: dict, out: Normalized) -> None:
    top = strip_ignored("top", {k: v for k, v in raw.items() if k != "trainer"}, "", out.ignored)
    for key in top:
        out.problems.append((str(key), "unknown key beside trainer" + did_you_mean(str(key), ["trainer"])))
    trainer = raw["trainer"]
    if not isinstance(trainer, dict):
        out.problems.append(("trainer", "must be a mapping (init, fit, validate, validate_all)"))
        return
    for key in trainer:
        if key not in _TRAINER_KEYS:
            out.problems.append((f"trainer.{key}", "unknown key" + did_you_mean(str(key), sorted(_TRAINER_KEYS))))
    init = trainer.get("init") or {}
    if not isinstance(init, dict):
        out.problems.append(("trainer.init", "must be a mapping"))
        init = {}
    s = out.sections
    run: dict[str, Any] = {}
    opt: dict[str, Any] = {}
    s["runconfig"] = run
    strip_ignored("trainer.init", init, "trainer.init", out.ignored)
    for key in init:
        if key not in _INIT_KEYS:
            out.problems.append((f"trainer.init.{key}", "unknown key" + did_you_mean(str(key), sorted(_INIT_KEYS))))
    if "model" in init:
        s["model"] = init["model"]
        out.renames.append(("model", "trainer.init.model"))
    if "seed" in init:
        run["seed"] = init["seed"]
    if "model_dir" in init:
        run["model_dir"] = init["model_dir"]
    _trainer_optimizer(init, opt, out)
    _trainer_settings(init, run, opt, out)
    if opt:
        s["optimizer"] = opt
    _trainer_data(trainer, out)
    _trainer_callbacks(init.get("callbacks") or [], run, out)


def _trainer_optimizer(init: dict, opt: dict, out: Normalized) -> None:
    if init.get("optimizer") is not None:
        named = _one_key(init["optimizer"], "trainer.init.optimizer", out)
        if named:
            opt["optimizer_type"] = named[0]
            args = dict(named[1])
            if "lr" in args:
                args["learning_rate"] = args.pop("lr")
            opt.update({k: v for k, v in args.items() if v is not None})
            out.renames.append(("optimizer", f"trainer.init.optimizer.{named[0]}"))
    schedulers = init.get("schedulers")
    if schedulers is None:
        return
    items = schedulers if isinstance(schedulers, list) else [schedulers]
    flat: list[dict] = []
    for i, item in enumerate(items):
        named = _one_key(item, f"trainer.init.schedulers[{i}]", out)
        if named is None:
            continue
        if named[0] in ("SequentialLR", "SequentialScheduler"):
            for j, inner in enumerate(named[1].get("schedulers") or []):
                sub = _one_key(inner, f"trainer.init.schedulers[{i}].{named[0]}.schedulers[{j}]", out)
                if sub:
                    flat.append({"scheduler": sub[0], **sub[1]})
        else:
            flat.append({"scheduler": named[0], **named[1]})
    if flat:
        opt["learning_rate"] = flat
        out.renames.append(("optimizer.learning_rate", "trainer.init.schedulers"))


def _trainer_settings(init: dict, run: dict, opt: dict, out: Normalized) -> None:
    model = out.sections.get("model")
    for name, table in (("precision", _PRECISION), ("loop", _LOOP), ("checkpoint", _CHECKPOINT),
                        ("logging", {"log_steps": "log_steps"})):
        block = init.get(name)
        if block is None:
            continue
        where = f"trainer.init.{name}"
        if not isinstance(block, dict):
            out.problems.append((where, "must be a mapping"))
            continue
        block = strip_ignored(f"trainer.{name}", block, where, out.ignored)
        for key, value in block.items():
            target = table.get(key)
            if target is None:
                out.problems.append((f"{where}.{key}", "unknown key" + did_you_mean(str(key), sorted(table))))
            elif name != "precision":
                run[target] = value
            elif target[0] == "optimizer":
                opt[key] = value
            elif isinstance(model, dict):
                out.sections["model"] = model = {**model, target[1]: value}


def _trainer_data(trainer: dict, out: Normalized) -> None:
    fit = trainer.get("fit") or {}
    validate = trainer.get("validate") or {}
    s = out.sections
    if not isinstance(fit, dict) or not isinstance(validate, dict):
        out.problems.append(("trainer.fit", "must be a mapping"))
        return
    for key in fit:
        if key not in ("train_dataloader", "val_dataloader", "ckpt_path"):
            out.problems.append((f"trainer.fit.{key}", "unknown key" + did_you_mean(
                str(key), ["train_dataloader", "val_dataloader", "ckpt_path"])))
    if "train_dataloader" in fit:
        s["train_input"] = fit["train_dataloader"]
        out.renames.append(("train_input", "trainer.fit.train_dataloader"))
    val, where = fit.get("val_dataloader"), "trainer.fit.val_dataloader"
    if val is None:
        val, where = validate.get("val_dataloader"), "trainer.validate.val_dataloader"
    if isinstance(val, list):
        if len(val) > 1:
            out.ignored.append((f"{where}[1:]", "mmgraph evaluates on the first val_dataloader"))
        val, where = (val[0] if val else None), f"{where}[0]"
    if val is not None:
        s["eval_input"] = val
        out.renames.append(("eval_input", where))
    for src in (fit, validate):
        if src.get("ckpt_path"):
            s["runconfig"].setdefault("checkpoint_path", src["ckpt_path"])
    if trainer.get("validate_all"):
        out.ignored.append(("trainer.validate_all", "mmgraph run --mode eval evaluates eval_input"))


def _trainer_callbacks(callbacks: Any, run: dict, out: Normalized) -> None:
    if not isinstance(callbacks, list):
        out.problems.append(("trainer.init.callbacks", "must be a list of {Name: {...}}"))
        return
    ignored = IGNORED_KEYS["trainer.callbacks"]
    known = sorted(_CALLBACKS | set(ignored))
    for i, item in enumerate(callbacks):
        where = f"trainer.init.callbacks[{i}]"
        named = _one_key(item, where, out)
        if named is None:
            continue
        name, args = named
        if name in ignored:
            out.ignored.append((f"{where}.{name}", ignored[name]))
        elif name in ("ScopedTrainFlags", "ScopedValidateFlags"):
            section = "train_input" if name == "ScopedTrainFlags" else "eval_input"
            for flag, value in args.items():
                if flag == MICRO_BATCH_FLAG and isinstance(out.sections.get(section), dict):
                    out.sections[section] = {**out.sections[section], "micro_batch_size": value}
                elif flag != MICRO_BATCH_FLAG:
                    out.ignored.append((f"{where}.{name}.{flag}", "Cerebras compiler flag"))
        elif name == "LoadCheckpointStates":
            states = args.get("load_checkpoint_states", "all")
            run["load_checkpoint_states"] = ",".join(states) if isinstance(states, list) else states
        elif name == "KeepNCheckpoints":
            run["max_checkpoints"] = args.get("n")
        else:
            out.problems.append((f"{where}.{name}", "unknown callback" + did_you_mean(name, known)))
