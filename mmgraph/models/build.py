"""Build the model from params: on a real device, on the meta device, or under FakeTensorMode."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from mmgraph.core.config.model import ModelConfig
from mmgraph.core.config.params import Params
from mmgraph.models.freeze import FreezeReport, apply_freeze
from mmgraph.models.layers import apply_initializer, init_weights
from mmgraph.models.multimodal import MultimodalModel, _ffn
from mmgraph.models.rng import number_sites


def build_model(params: Params | ModelConfig, device: str | torch.device = "cpu",
                fake_mode=None, attention_impl: str = "sdpa",
                seed: Optional[int] = None) -> tuple[MultimodalModel, FreezeReport]:
    """The model with the params' freeze patterns applied, and what each pattern matched.

    ``device="meta"`` (or a ``FakeTensorMode`` as ``fake_mode``) allocates no weights: a 7B
    model builds in about a second. ``seed`` makes real initialization reproducible.
    """
    cfg = params.model if isinstance(params, Params) else params
    source = params.path if isinstance(params, Params) else None
    ctx = fake_mode if fake_mode is not None else torch.device(device)
    rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
    with rng, ctx:
        if seed is not None:
            torch.manual_seed(seed)
        model = MultimodalModel(cfg, attention_impl)
        _initialize(model, cfg)
    number_sites(model)                   # dropout sites, in module order (models/rng.py)
    report = apply_freeze(model, cfg.freeze, source, cfg.name)
    return model, report


def _initialize(model: MultimodalModel, cfg: ModelConfig) -> None:
    """Each encoder with its own ``initializer_range``; projectors and the LLM with the LLM's."""
    init_weights(model, cfg.text_model.initializer_range)
    for (encoder, projection), entry in zip(model.image_model.image_model_list, cfg.image_model_list.image_models):
        init_weights(encoder, entry.encoder.initializer_range)
        if encoder.embedding_layer.cls_embedding is not None:
            torch.nn.init.normal_(encoder.embedding_layer.cls_embedding, 0.0, entry.encoder.initializer_range)
        _ffn_initializers(projection, entry.projection)
    _ffn_initializers(model.image_model.projection, cfg.image_model_list.global_image_projection)


def _ffn_initializers(module: torch.nn.Module, ffn_cfg) -> None:
    """The FeedForwardNetwork's own ``kernel_initializer`` / ``bias_initializer``, when set."""
    if ffn_cfg is None:
        return
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            if ffn_cfg.kernel_initializer is not None:
                apply_initializer(m.weight, ffn_cfg.kernel_initializer)
            if ffn_cfg.bias_initializer is not None and m.bias is not None:
                apply_initializer(m.bias, ffn_cfg.bias_initializer)


def init_projector(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Freshly initialized global-projector weights (``image_model.projection.*``), as
    ``build_model`` would make them, without building the rest of the model."""

    torch.manual_seed(seed)
    module = _ffn(cfg.image_model_list.global_image_projection)
    init_weights(module, cfg.text_model.initializer_range)
    _ffn_initializers(module, cfg.image_model_list.global_image_projection)
    return {f"image_model.projection.{k}": v.detach() for k, v in module.state_dict().items()}


def initial_weights(params: Params, seed: Optional[int] = None) -> dict[str, torch.Tensor]:
    """Every weight of the params' model, freshly initialized (``seed``, default the
    runconfig's): what a run starts from when it neither resumes nor loads a checkpoint."""
    model, _ = build_model(params, seed=params.runconfig.seed if seed is None else seed)
    return {k: v.detach() for k, v in model.state_dict().items()}
