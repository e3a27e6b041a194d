"""Build the model from params: on a real device, on the meta device, or under FakeTensorMode."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from mmgraph.config.load import Params
from mmgraph.config.model import ModelConfig
from mmgraph.models.freeze import FreezeReport, apply_freeze
from mmgraph.models.layers import init_weights
from mmgraph.models.multimodal import MultimodalModel


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
        init_weights(model, _init_std(cfg))
    report = apply_freeze(model, cfg.freeze, source)
    return model, report


def _init_std(cfg: ModelConfig) -> float:
    return cfg.text_model.initializer_range
