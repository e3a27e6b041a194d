"""Load a params YAML: parse, validate every section, check cross-key rules, derive values.

Every problem is collected and reported at once as ``FILE: section.key: message``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from mmgraph.core.config.base import Section, section_at
from mmgraph.core.config.batching import split_batch
from mmgraph.core.config.layouts import Normalized, normalize
from mmgraph.core.config.data import InputConfig
from mmgraph.core.config.model import FeedForwardNetworkConfig, ModelConfig, ViTModelConfig
from mmgraph.core.config.optim import OptimizerConfig
from mmgraph.core.config.run import RunConfig
from mmgraph.core.errors import Problem, UserError, did_you_mean

SECTIONS: dict[str, type[Section]] = {
    "train_input": InputConfig,
    "eval_input": InputConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "runconfig": RunConfig,
}
MODES = ("train", "eval", "train_and_eval")
# Sections a mode needs besides ``model``.
REQUIRED_FOR_MODE = {
    "train": ("train_input", "optimizer"),
    "eval": ("eval_input",),
    "train_and_eval": ("train_input", "eval_input", "optimizer"),
}
_KEY = re.compile(r"^[a-z_][a-z0-9_]*$")
_UNION_TAGS = {"int", "float", "str", "bool", "number", "one", "list", "dict", "none"}


@dataclass(frozen=True)
class SequenceLayout:
    """How images and text share one static sequence (the Model Zoo's derived values)."""

    max_sequence_length: int
    max_num_img: int
    num_patches: int  # image tokens per image, all encoders together, after the projector
    image_data_size: tuple[int, int, int]
    vocab_size: int
    packed: bool = False  # rows hold several samples: segment_ids and position_ids fields


@dataclass(frozen=True)
class Params:
    """A validated params file."""

    path: str
    model: ModelConfig
    train_input: Optional[InputConfig] = None
    eval_input: Optional[InputConfig] = None
    optimizer: Optional[OptimizerConfig] = None
    runconfig: RunConfig = field(default_factory=RunConfig)
    raw: dict = field(default_factory=dict, repr=False, compare=False)
    # the file's layout ("2.3" or "trainer") and the keys accepted but ignored: (where, why)
    file_layout: str = "2.3"
    ignored: tuple[tuple[str, str], ...] = ()

    def input_for(self, mode: str) -> Optional[InputConfig]:
        """The data section a mode reads (``eval`` reads ``eval_input``, otherwise ``train_input``)."""
        if mode == "eval":
            return self.eval_input or self.train_input
        return self.train_input or self.eval_input

    def layout(self, mode: str = "train") -> SequenceLayout:
        return sequence_layout(self.model, self.input_for(mode))

    @property
    def precision(self):
        """What the step computes and moves in (``mmgraph.core.precision``): fp32, bf16 or fp16."""
        from mmgraph.core.precision import precision_of

        return precision_of(self.model)

    def with_micro_batch(self, mode: str, micro_batch_size: int) -> "Params":
        """These params with ``micro_batch_size`` resolved (``auto`` decided by the compiler) in
        the section ``mode`` reads: derived values are resolved once, then read everywhere."""
        section = "eval_input" if mode == "eval" and self.eval_input is not None else "train_input"
        if getattr(self, section) is None:
            section = "eval_input"
        data = getattr(self, section)
        return replace(self, **{section: data.model_copy(update={"micro_batch_size": micro_batch_size})})

    def micro_batch_sizes(self, mode: str = "train") -> list[int]:
        """The micro-batches one step of ``mode`` runs, in order: ``batch_size`` split into
        ``micro_batch_size`` pieces, the last one smaller when it does not divide
        (Model Zoo 7B phase 1: 220 / 24 -> [24] * 9 + [4]). One piece without a numeric
        ``micro_batch_size`` (``auto`` and ``explore`` are resolved by compile)."""
        data = self.input_for(mode)
        if data is None:
            return []
        return split_batch(data.batch_size, data.micro_batch_size)


def num_image_tokens(model: ModelConfig) -> int:
    """Tokens each image becomes in the LLM's sequence (Model Zoo's ``num_patches``).

    Per encoder: patches, +1 with a CLS token, -1 in ``patch`` select mode (the CLS is dropped);
    several encoders are concatenated on the patch axis.
    """
    if model.image_model_list.connector is not None:
        return model.image_model_list.connector.num_tokens
    total = 0
    drop_cls = model.image_model_list.image_feature_select_mode == "patch"
    for entry in model.image_model_list.image_models:
        vit = entry.image_model[0]
        if not isinstance(vit, ViTModelConfig):
            continue
        total += vit.num_positions - int(drop_cls and vit.prepend_cls_token)
    return total


def sequence_layout(model: ModelConfig, data: Optional[InputConfig]) -> SequenceLayout:
    text = model.text_model
    first = model.image_model_list.image_models[0].image_model[0]
    default_size = (first.num_channels, *first.image_size) if isinstance(first, ViTModelConfig) else (3, 224, 224)
    return SequenceLayout(
        max_sequence_length=(data.max_sequence_length if data and data.max_sequence_length
                             else text.max_position_embeddings),
        max_num_img=data.max_num_img if data else 1,
        num_patches=num_image_tokens(model),
        image_data_size=tuple(data.image_data_size) if data else default_size,
        vocab_size=text.vocab_size,
        packed=bool(data and data.packed),
    )


def load_params(path: str | Path, mode: str = "train") -> Params:
    """Read and validate a params file; raise ``UserError`` listing every problem."""
    path = str(path)
    raw = _read_yaml(path)
    norm = normalize(raw)
    problems = [Problem(path, where, message) for where, message in norm.problems]
    sections: dict[str, Any] = {}

    for key, value in norm.sections.items():
        if key not in SECTIONS:
            hint = did_you_mean(str(key), list(SECTIONS) + ["trainer"])
            problems.append(Problem(path, str(key), "unknown section" + hint))
            continue
        if value is None:
            value = {}
        try:
            sections[key] = SECTIONS[key].model_validate(value)
        except ValidationError as err:
            problems.extend(_format_errors(path, key, SECTIONS[key], err, norm))

    needed = ("model",) + REQUIRED_FOR_MODE.get(mode, ())
    for key in needed:
        if key not in norm.sections:
            problems.append(Problem(path, norm.where(key), f"missing section (required for --mode {mode})"
                                    if key != "model" else "missing section"))

    problems.extend(Problem(p.file, norm.where(p.where or ""), p.message)
                    for p in semantic_problems(path, sections))
    if problems:
        raise UserError(_dedupe(problems))
    ignored = list(norm.ignored)
    if sections.get("optimizer") is not None:
        ignored += [(f"{norm.where('optimizer')}.{k}", "collected in optim_params; not used by "
                     f"{sections['optimizer'].optimizer_type} here") for k in sections["optimizer"].optim_params]
    return Params(path=path, raw=raw, file_layout=norm.layout, ignored=tuple(ignored), **sections)


def _read_yaml(path: str) -> dict:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(Problem(path, None, f"not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                                f"{err.start}); save the params file as UTF-8")) from None
    except FileNotFoundError:
        raise UserError(Problem(path, None, "no such file")) from None
    except OSError as err:
        raise UserError(Problem(path, None, f"cannot read: {err.strerror}")) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else None
        what = getattr(err, "problem", None) or str(err)
        context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
        if context and start:
            what += f" ({context} started at line {start.line + 1}, column {start.column + 1})"
        raise UserError(Problem(path, where, f"YAML syntax error: {what}")) from None
    if raw is None:
        raise UserError(Problem(path, None, "the file is empty"))
    if not isinstance(raw, dict):
        raise UserError(Problem(path, None, f"expected a mapping of sections, got {type(raw).__name__}"))
    return raw


def _display_loc(section: str, loc: tuple) -> str:
    """``('image_models', 0, 'image_model', 0, 'ViTModel', 'hidden_size')`` ->
    ``model.image_model_list.image_models[0].image_model[0].hidden_size`` (union tags dropped)."""
    out = section
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            out += f"[{part}]"
        elif last or (_KEY.match(part) and part not in _UNION_TAGS):
            out += f".{part}"
    return out


def _format_errors(path: str, section: str, schema: type[Section], err: ValidationError,
                   norm: Optional[Normalized] = None) -> list[Problem]:
    problems = []
    for e in err.errors(include_url=False):
        loc, kind = tuple(e["loc"]), e["type"]
        if kind == "number_type":  # raised for the whole mapping: name the key
            loc += (e["ctx"]["key"],)
        where = _display_loc(section, loc)
        if kind == "extra_forbidden":
            holder = section_at(schema, loc)
            hint = did_you_mean(str(loc[-1]), holder.key_names()) if holder else ""
            message = "unknown key" + hint
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            got = e.get("input")
            options = re.findall(r"'([^']*)'", expected)
            hint = did_you_mean(str(got), options) if isinstance(got, str) else ""
            message = f"{got!r} is not one of {expected}{hint}"
        elif kind == "number_type":
            message = e["msg"].split(": ", 1)[1]
        elif kind == "union_tag_invalid":
            message = f"unsupported name {e.get('input')!r}, expected one of {e['ctx']['expected_tags']}"
        else:
            message = e["msg"].replace("Input should be", "must be").removeprefix("Value error, ")
            if kind != "value_error" and "input" in e and not isinstance(e["input"], (dict, list)):
                message += f" (got {e['input']!r})"
        problems.append(Problem(path, norm.where(where) if norm else where, message))
    return problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.where, p.message) not in seen:
            seen.add((p.where, p.message))
            out.append(p)
    return out


# ---------------------------------------------------------------------------------------------
# Cross-key rules: what a schema cannot say on one key.
# ---------------------------------------------------------------------------------------------


def semantic_problems(path: str, s: dict[str, Any]) -> list[Problem]:
    out: list[Problem] = []

    def bad(where: str, message: str) -> None:
        out.append(Problem(path, where, message))

    model: Optional[ModelConfig] = s.get("model")
    if model is not None:
        _check_model(model, bad)
        _check_size(model, bad)
    for name in ("train_input", "eval_input"):
        data: Optional[InputConfig] = s.get(name)
        if data is not None:
            _check_input(name, data, model, bad)
    if s.get("optimizer") is not None:
        _check_optimizer(s["optimizer"], bad)
    return out


def _check_model(model: ModelConfig, bad) -> None:
    base = "model.image_model_list"
    widths = []
    for i, entry in enumerate(model.image_model_list.image_models):
        where = f"{base}.image_models[{i}].image_model"
        vit = entry.image_model[0]
        if not isinstance(vit, ViTModelConfig):
            bad(f"{where}[0].name", "the first entry must be the encoder (name: ViTModel)")
            continue
        proj = entry.image_model[1] if len(entry.image_model) > 1 else None
        if proj is not None and not isinstance(proj, FeedForwardNetworkConfig):
            bad(f"{where}[1].name", "the second entry must be a projection (name: FeedForwardNetwork)")
            proj = None
        _check_vit(f"{where}[0]", vit, bad)
        width = vit.hidden_size
        if proj is not None:
            _check_ffn(f"{where}[1]", proj, width, bad)
            width = proj.layers_units[-1]
        widths.append(width)
    if widths and len(set(widths)) > 1:
        bad(f"{base}.image_models", f"encoders concatenated on the patch axis must have one feature "
            f"width, got {widths} (add a per-encoder projection)")
    conn = model.image_model_list.connector
    if conn is not None and widths:
        _check_connector(f"{base}.connector", conn, model, widths[0], bad)
    text = model.text_model
    glob = model.image_model_list.global_image_projection
    if glob is not None and widths:
        _check_ffn(f"{base}.global_image_projection", glob, widths[0], bad)
        if glob.layers_units[-1] != text.hidden_size:
            bad(f"{base}.global_image_projection.layers_units",
                f"the last layer must output text_model.hidden_size {text.hidden_size}, "
                f"got {glob.layers_units[-1]}")
    elif widths and widths[0] != text.hidden_size:
        bad(f"{base}.global_image_projection", f"image features have width {widths[0]} but "
            f"text_model.hidden_size is {text.hidden_size}: a projection is required")
    _check_text(text, bad)
    _check_loss(model, bad)
    for i, pattern in enumerate(model.freeze):
        try:
            re.compile(pattern)
        except re.error as err:
            bad(f"model.freeze[{i}]", f"invalid regular expression {pattern!r}: {err}")


# Sane limits, checked before anything is built or allocated (a 1e9-layer model must never start
# building, even on the meta device). 10 trillion parameters is ~20x the largest dense models.
MAX_PARAMETERS = 10**13
MAX_LAYERS = 10_000
MAX_BATCH_SIZE = 10**7


def estimate_parameters(model: ModelConfig) -> int:
    """Parameter count from the params alone (Python ints, no overflow): within a few percent."""
    total = 0
    for entry in model.image_model_list.image_models:
        for part in entry.image_model:
            if isinstance(part, ViTModelConfig):
                h = part.hidden_size
                patch = part.num_channels * part.patch_size[0] * part.patch_size[1] * h
                total += patch + part.num_positions * h + part.num_hidden_layers * (4 * h * h + 2 * h * part.filter_size)
            else:
                total += _ffn_size(part)
    if model.image_model_list.global_image_projection is not None:
        total += _ffn_size(model.image_model_list.global_image_projection)
    t = model.text_model
    glu = 3 if t.nonlinearity in ("swiglu", "geglu", "reglu") else 2
    kv = 2 * t.hidden_size * t.num_kv_heads * (t.hidden_size // max(t.num_heads, 1))
    total += t.vocab_size * t.hidden_size * (1 if t.share_embedding_weights else 2)
    total += t.num_hidden_layers * (2 * t.hidden_size * t.hidden_size + kv + glu * t.hidden_size * t.filter_size)
    return total


def _ffn_size(ffn: FeedForwardNetworkConfig) -> int:
    ins = [ffn.input_unit, *ffn.layers_units[:-1]]
    return sum(i * o for i, o in zip(ins, ffn.layers_units))


def _check_size(model: ModelConfig, bad) -> None:
    layers = [("model.text_model.num_hidden_layers", model.text_model.num_hidden_layers)]
    for i, entry in enumerate(model.image_model_list.image_models):
        vit = entry.image_model[0]
        if isinstance(vit, ViTModelConfig):
            layers.append((f"model.image_model_list.image_models[{i}].image_model[0].num_hidden_layers",
                           vit.num_hidden_layers))
    for where, n in layers:
        if n > MAX_LAYERS:
            bad(where, f"{n:,} layers is beyond the supported {MAX_LAYERS:,}")
    count = estimate_parameters(model)
    if count > MAX_PARAMETERS:
        bad("model", f"about {count:.3g} parameters ({count * 2 / 2**40:.3g} TiB in 16 bits) is beyond the "
            f"supported {MAX_PARAMETERS:.0e}: check hidden_size, vocab_size, filter_size, num_hidden_layers")


def _check_loss(model: ModelConfig, bad) -> None:
    if model.loss_scaling == "num_tokens" and "loss_weight" in model.model_fields_set and model.loss_weight != 1.0:
        bad("model.loss_weight", f"loss_scaling num_tokens requires loss_weight 1.0 (got {model.loss_weight}), "
            "as in the Model Zoo")
    if model.loss_scaling == "batch_size" and model.loss_weight == 0.0:
        bad("model.loss_weight", "loss_scaling batch_size multiplies the loss by loss_weight, 0.0 (the Model "
            "Zoo's default) when omitted: set it (usually 1 / max_sequence_length)")


def _check_connector(where: str, conn, model: ModelConfig, width: int, bad) -> None:
    lst = model.image_model_list
    if conn.name == "attention_pool":
        if width % conn.num_heads:
            bad(f"{where}.num_heads", f"feature width {width} is not divisible by num_heads {conn.num_heads}")
        return
    side = math.isqrt(conn.num_tokens)
    if side * side != conn.num_tokens:
        bad(f"{where}.num_tokens", f"{conn.name} pools a square grid: {conn.num_tokens} is not a square")
    grids = {e.image_model[0].grid for e in lst.image_models if isinstance(e.image_model[0], ViTModelConfig)}
    if len(lst.image_models) > 1 or lst.image_feature_select_mode != "patch":
        bad(f"{where}.name", f"{conn.name} needs one encoder's patch grid (one encoder, image_feature_select_mode "
            "patch); attention_pool takes any features")
    elif grids and side > min(min(g) for g in grids):
        bad(f"{where}.num_tokens", f"a {side}x{side} grid is larger than the encoder's {sorted(grids)[0]}")


def _check_vit(where: str, vit: ViTModelConfig, bad) -> None:
    for axis, (size, patch) in enumerate(zip(vit.image_size, vit.patch_size)):
        if size % patch:
            bad(f"{where}.patch_size", f"image_size {list(vit.image_size)} is not divisible by "
                f"patch_size {list(vit.patch_size)}")
            break
    if vit.hidden_size % vit.num_heads:
        bad(f"{where}.num_heads", f"hidden_size {vit.hidden_size} is not divisible by num_heads {vit.num_heads}")
    n = vit.num_hidden_layers
    if vit.image_layer_idx is not None and not -n <= vit.image_layer_idx < n:
        bad(f"{where}.image_layer_idx", f"{vit.image_layer_idx} is out of range for "
            f"num_hidden_layers {n} (valid: {-n} .. {n - 1})")


def _check_ffn(where: str, ffn: FeedForwardNetworkConfig, in_width: int, bad) -> None:
    if ffn.input_unit != in_width:
        bad(f"{where}.input_unit", f"{ffn.input_unit} does not match the incoming feature width {in_width}")
    n = len(ffn.layers_units)
    for key in ("layers_activation", "layers_dropout_rates"):
        value = getattr(ffn, key)
        if value is not None and len(value) != n:
            bad(f"{where}.{key}", f"has {len(value)} entries but layers_units has {n}")


def _check_text(text, bad) -> None:
    where = "model.text_model"
    if text.hidden_size % text.num_heads:
        bad(f"{where}.num_heads", f"hidden_size {text.hidden_size} is not divisible by num_heads {text.num_heads}")
        return
    if text.rotary_dim is not None and (text.rotary_dim > text.head_dim or text.rotary_dim % 2):
        bad(f"{where}.rotary_dim", f"{text.rotary_dim} must be even and at most the head size {text.head_dim}")
    if text.num_heads % text.num_kv_heads:
        bad(f"{where}.extra_attention_params.num_kv_groups",
            f"num_heads {text.num_heads} is not a multiple of num_kv_groups {text.num_kv_heads}")


def _check_input(name: str, data: InputConfig, model: Optional[ModelConfig], bad) -> None:
    # batch_size need not be a multiple of micro_batch_size: the last micro-batch is smaller
    # (Params.micro_batch_sizes), as the Model Zoo ships its 7B phase-1 file (220 / 24).
    if data.batch_size > MAX_BATCH_SIZE:
        bad(f"{name}.batch_size", f"{data.batch_size:,} is beyond the supported {MAX_BATCH_SIZE:,} samples per step")
    if model is None:
        return
    text = model.text_model
    for i, entry in enumerate(model.image_model_list.image_models):
        vit = entry.image_model[0]
        if isinstance(vit, ViTModelConfig):
            expect = (vit.num_channels, *vit.image_size)
            if tuple(data.image_data_size) != expect:
                bad(f"{name}.image_data_size", f"{list(data.image_data_size)} does not match "
                    f"image_models[{i}] (num_channels, image_size) = {list(expect)}")
                break
    seq = data.max_sequence_length or text.max_position_embeddings
    if seq > text.max_position_embeddings:
        bad(f"{name}.max_sequence_length", f"{seq} exceeds text_model.max_position_embeddings "
            f"{text.max_position_embeddings}")
    tokens = data.max_num_img * num_image_tokens(model)
    if tokens > seq:
        bad(f"{name}.max_num_img", f"{data.max_num_img} images of {num_image_tokens(model)} tokens "
            f"do not fit in max_sequence_length {seq}")
    for key in ("bos_token_id", "pad_token_id"):
        value = getattr(data, key)
        if value is not None and not 0 <= value < text.vocab_size:
            bad(f"{name}.{key}", f"{value} is outside the vocabulary (vocab_size {text.vocab_size})")


_SCHEDULER_NEEDS = {
    "Linear": ("initial_learning_rate", "end_learning_rate"),
    "CosineDecay": ("initial_learning_rate", "end_learning_rate"),
    "Constant": ("learning_rate",),
    "Exponential": ("initial_learning_rate", "decay_rate"),
}


def _check_optimizer(opt: OptimizerConfig, bad) -> None:
    schedules = opt.learning_rate
    if isinstance(schedules, (int, float)):
        return
    items = schedules if isinstance(schedules, list) else [schedules]
    for i, sched in enumerate(items):
        where = "optimizer.learning_rate" + (f"[{i}]" if isinstance(schedules, list) else "")
        for key in _SCHEDULER_NEEDS[sched.scheduler]:
            if getattr(sched, key) is None:
                bad(f"{where}.{key}", f"required by scheduler {sched.scheduler}")
        last = i == len(items) - 1
        if sched.scheduler != "Constant" or not last:
            if sched.total_iters is None and sched.decay_steps is None and not last:
                bad(f"{where}.total_iters", "required for every scheduler but the last of a sequence")
            elif sched.total_iters is None and sched.decay_steps is None and sched.scheduler != "Constant":
                bad(f"{where}.total_iters", f"required by scheduler {sched.scheduler}")
