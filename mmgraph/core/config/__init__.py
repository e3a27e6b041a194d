"""Params files in the Cerebras Model Zoo 2.3 multimodal schema."""

from mmgraph.core.config.batching import RankBatch, Search, micro_batch_search, rank_batch, split_batch
from mmgraph.core.config.data import InputConfig, Transform
from mmgraph.core.config.load import load_params
from mmgraph.core.config.model import (
    FeedForwardNetworkConfig,
    ImageModelListConfig,
    LlamaModelConfig,
    ModelConfig,
    ViTModelConfig,
)
from mmgraph.core.config.optim import OptimizerConfig, Scheduler
from mmgraph.core.config.params import MODES, Params, SequenceLayout, num_image_tokens
from mmgraph.core.config.run import RunConfig

__all__ = [
    "MODES", "FeedForwardNetworkConfig", "ImageModelListConfig", "InputConfig", "LlamaModelConfig",
    "ModelConfig", "OptimizerConfig", "Params", "RankBatch", "RunConfig", "Scheduler", "SequenceLayout",
    "Search", "Transform", "ViTModelConfig", "load_params", "micro_batch_search", "num_image_tokens", "rank_batch",
    "split_batch",
]
