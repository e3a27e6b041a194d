"""Params files in the Cerebras Model Zoo 2.3 multimodal schema."""

from mmgraph.config.data import InputConfig, Transform
from mmgraph.config.load import MODES, Params, RankBatch, SequenceLayout, load_params, num_image_tokens, rank_batch
from mmgraph.config.model import (
    FeedForwardNetworkConfig,
    ImageModelListConfig,
    LlamaModelConfig,
    ModelConfig,
    ViTModelConfig,
)
from mmgraph.config.optim import OptimizerConfig, Scheduler
from mmgraph.config.run import RunConfig

__all__ = [
    "MODES", "FeedForwardNetworkConfig", "ImageModelListConfig", "InputConfig", "LlamaModelConfig",
    "ModelConfig", "OptimizerConfig", "Params", "RankBatch", "RunConfig", "Scheduler", "SequenceLayout",
    "Transform", "ViTModelConfig", "load_params", "num_image_tokens", "rank_batch",
]
