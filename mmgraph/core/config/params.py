"""A validated params file (``Params``) and the sequence layout its model and data imply."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from mmgraph.core.config.batching import split_batch
from mmgraph.core.config.data import InputConfig
from mmgraph.core.config.model import ModelConfig, ViTModelConfig
from mmgraph.core.config.optim import OptimizerConfig
from mmgraph.core.config.run import RunConfig
from mmgraph.core.precision import precision_of

MODES = ("train", "eval", "train_and_eval")
# Sections a mode needs besides ``model``.
REQUIRED_FOR_MODE = {
    "train": ("train_input", "optimizer"),
    "eval": ("eval_input",),
    "train_and_eval": ("train_input", "eval_input", "optimizer"),
}

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
