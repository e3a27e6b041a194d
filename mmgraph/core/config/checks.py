"""Cross-key rules of a params file: what a schema cannot say on one key (sizes, shapes that must
agree between sections, what the optimizer's scheduler needs)."""

from __future__ import annotations

import math
import re
from typing import Any, Optional

from mmgraph.core.config.data import InputConfig
from mmgraph.core.config.model import FeedForwardNetworkConfig, ModelConfig, ViTModelConfig
from mmgraph.core.config.optim import OptimizerConfig
from mmgraph.core.config.params import num_image_tokens
from mmgraph.core.errors import Problem


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
