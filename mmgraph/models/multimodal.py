"""The multimodal model: image encoders + projector + language model (LLaVA family).

Parameter names match the Model Zoo's MultimodalSimple, so its freeze regexes work unchanged::

    image_model.image_model_list[i][0]   encoder i (ViT)
    image_model.image_model_list[i][1]   its optional projection (else Identity)
    image_model.connector                an optional MM1-style connector (pooling to N tokens)
    image_model.projection               the global projector (LLaVA's mm_projector)
    text_model                           the language model

Images reach the language model by position: ``image_data_loc (B, I, P)`` holds the sequence
position of every image token; padding images point at position S (a dummy column that is
dropped), so batches with fewer images keep the same static shapes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mmgraph.core.config.model import ModelConfig
from mmgraph.models.connectors import make_connector
from mmgraph.models.layers import FeedForwardNetwork
from mmgraph.models.llama import LlamaModel
from mmgraph.models.loss import lm_loss
from mmgraph.models.rng import Rng
from mmgraph.models.vit import ViTModel


def _ffn(cfg) -> nn.Module:
    if cfg is None:
        return nn.Identity()
    return FeedForwardNetwork(cfg.input_unit, cfg.layers_units, cfg.layers_activation,
                              cfg.use_bias, cfg.layers_dropout_rates)


def _project(module: nn.Module, x: torch.Tensor, rng: Optional[Rng]) -> torch.Tensor:
    """A projection (a FeedForwardNetwork, with its dropout) or Identity."""
    return module(x, rng) if isinstance(module, FeedForwardNetwork) else module(x)


class ImageEncoders(nn.Module):
    """One or more encoders, each with an optional projection, concatenated on the patch axis,
    then the global projection."""

    def __init__(self, cfg: ModelConfig, attention_impl: str = "sdpa"):
        super().__init__()
        lst = cfg.image_model_list
        self.select_mode = lst.image_feature_select_mode
        self.image_model_list = nn.ModuleList(
            nn.ModuleList([ViTModel(entry.encoder, attention_impl), _ffn(entry.projection)])
            for entry in lst.image_models
        )
        width = lst.image_models[0].projection.layers_units[-1] if lst.image_models[0].projection else \
            lst.image_models[0].encoder.hidden_size
        self.connector = make_connector(lst.connector, width)
        self.projection = _ffn(lst.global_image_projection)

    def forward(self, image_data: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        """image_data (B, I, C, H, W) -> image features (B, I, P, H_text). ``rng``: per sample;
        dropout here sees image rows (sample b's image i)."""
        b, i = image_data.shape[:2]
        images = image_data.reshape(b * i, *image_data.shape[2:])           # (B*I, C, H, W)
        rng = rng.per_image(i) if rng is not None else None
        out = []
        for encoder, projection in self.image_model_list:
            feats = encoder.extract_features(images, rng)                  # (B*I, P_e, H_e)
            if self.select_mode == "patch" and encoder.config.prepend_cls_token:
                feats = feats[:, 1:]                                       # drop CLS
            out.append(_project(projection, feats, rng))
        feats = self.connector(torch.cat(out, dim=1))                      # (B*I, P, H): P = tokens per image
        feats = _project(self.projection, feats, rng)                      # (B*I, P, H_text)
        return feats.reshape(b, i, *feats.shape[1:])


class MultimodalModel(nn.Module):
    """forward(batch) -> loss; ``compute_logits(batch)`` -> (B, S, V)."""

    def __init__(self, cfg: ModelConfig, attention_impl: str = "sdpa"):
        super().__init__()
        self.config = cfg
        self.image_model = ImageEncoders(cfg, attention_impl)
        self.text_model = LlamaModel(cfg.text_model, attention_impl)

    def compute_embeddings(self, image_data: torch.Tensor, text_input_ids: torch.Tensor,
                           image_data_loc: torch.Tensor, rng: Optional[Rng] = None) -> torch.Tensor:
        """Token embeddings with every image token replaced by its image feature: (B, S, H)."""
        feats = self.image_model(image_data, rng)                          # (B, I, P, H)
        b, i, p, h = feats.shape
        feats = feats.reshape(b, i * p, h)                                 # (B, I*P, H)
        text = self.text_model.compute_input_embeddings(text_input_ids, rng)   # (B, S, H)
        index = image_data_loc.reshape(b, i * p).to(torch.int64)
        index = index[:, :, None].expand(b, i * p, h)                      # (B, I*P, H)
        dummy = text.new_zeros(b, 1, h)                                    # padding images land here
        merged = torch.cat((text, dummy), dim=1).scatter(1, index, feats.to(text.dtype))
        return merged[:, :-1]                                              # (B, S, H)

    def compute_logits(self, image_data: torch.Tensor, text_input_ids: torch.Tensor,
                       image_data_loc: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                       token_modality_idx: Optional[torch.Tensor] = None,
                       position_ids: Optional[torch.Tensor] = None,
                       segment_ids: Optional[torch.Tensor] = None, rng: Optional[Rng] = None) -> torch.Tensor:
        """A packed batch adds ``segment_ids`` and ``position_ids`` (B, S); see models/batch.py.
        ``rng``: the random inputs of dropout (training with dropout only)."""
        embeddings = self.compute_embeddings(image_data, text_input_ids, image_data_loc, rng)
        return self.text_model(embeddings, key_padding_mask, position_ids, token_modality_idx, segment_ids, rng)

    def forward(self, image_data: torch.Tensor, text_input_ids: torch.Tensor,
                image_data_loc: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = None,
                token_modality_idx: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, rng_seed: Optional[torch.Tensor] = None,
                sample_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The loss. With dropout, ``rng_seed`` () and ``sample_index`` (B,) int64 (models/rng.py)."""
        rng = Rng.of(rng_seed, sample_index) if rng_seed is not None and sample_index is not None else None
        logits = self.compute_logits(image_data, text_input_ids, image_data_loc,
                                     key_padding_mask, token_modality_idx, position_ids, segment_ids, rng)
        return lm_loss(logits, labels, loss_mask, self.config.loss_scaling, self.config.loss_weight,
                       segment_ids)
