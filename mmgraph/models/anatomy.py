"""Model anatomy: where a parameter or op sits in the model, for reports, weight-streaming
segments and the tracer. A new model family states its anatomy here, not in the tracer or the IR."""

from __future__ import annotations

import re

import torch

from mmgraph.core.ir import LayerKind
from mmgraph.models.layers import RMSNorm
from mmgraph.models.multimodal import MultimodalModel

HEAD = "lm_head"                       # the LM head's module name (the loss follows it)
LLM_LAYER_PREFIX = "text_model.layers"


def is_head(module: str) -> bool:
    return HEAD in module


def is_llm_layer(layer: str) -> bool:
    return layer.startswith(LLM_LAYER_PREFIX)


_LAYER = re.compile(r"layers\.(\d+)")
def layer_of(module: str) -> str:
    """Coarse location for reports and weight-streaming segments."""
    if module.startswith("image_model.image_model_list."):
        idx = module.split(".")[2]
        m = _LAYER.search(module)
        return f"image_model.encoder{idx}." + (f"layers.{m.group(1)}" if m else "embeddings")
    if module.startswith("image_model"):
        return "image_model.projection"
    if module.startswith("text_model"):
        m = _LAYER.search(module)
        if m:
            return f"text_model.layers.{m.group(1)}"
        if "lm_head" in module or "transformer_decoder.norm" in module:
            return "text_model.head"
        return "text_model.embeddings" if "embedding_layer" in module else "text_model"
    return "top" if module == "" else module   # the model's own forward: image scatter, loss


def kind_of(layer: str) -> LayerKind:
    """The kind of a ``layer_of`` name (or the tracer's ``loss``)."""
    if _BLOCK.search(layer):
        return LayerKind.BLOCK
    if layer.endswith("embeddings"):
        return LayerKind.EMBEDDINGS
    if layer == "image_model.projection":
        return LayerKind.PROJECTION
    if layer == "text_model.head":
        return LayerKind.HEAD
    if layer == "loss":
        return LayerKind.LOSS
    return LayerKind.OTHER


_BLOCK = re.compile(r"^(text_model|image_model\.encoder\d+)\.layers\.\d+$")


def unused_parameters(model: MultimodalModel) -> set[str]:
    """Parameters the step never reads: encoder blocks after ``image_layer_idx`` and the
    encoder's final norm (LLaVA takes features before it)."""
    out = set()
    for i, (encoder, _) in enumerate(model.image_model.image_model_list):
        prefix = f"image_model.image_model_list.{i}.0.encoder.transformer_encoder"
        used = encoder.config.num_layers_used
        for name, _ in encoder.encoder.transformer_encoder.named_parameters():
            m = re.match(r"layers\.(\d+)\.", name)
            if (m and int(m.group(1)) >= used) or (name.startswith("norm.") and not encoder.config.uses_final_norm):
                out.add(f"{prefix}.{name}")
    return out


_NORMS = (torch.nn.LayerNorm, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
          torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm,
          torch.nn.SyncBatchNorm, RMSNorm)


def no_weight_decay(model: torch.nn.Module) -> frozenset[str]:
    """Parameters the Model Zoo never decays (``common/optim_utils.py``
    ``_should_apply_weight_decay``): any whose name contains ``bias``, and any of a norm module,
    matched as it matches them (the module's name inside the parameter's name)."""
    norms = [name for name, module in model.named_modules() if isinstance(module, _NORMS)]
    return frozenset(name for name, _ in model.named_parameters(remove_duplicate=False)
                     if "bias" in name or any(m in name for m in norms))
