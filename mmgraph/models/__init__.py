"""The multimodal model library (``mmgraph.models``)."""

from mmgraph.models.batch import BATCH_FIELDS, PACKED_FIELDS, batch_fields, batch_spec, pack_batch, pad_batch, random_batch
from mmgraph.models.build import build_model, initial_weights
from mmgraph.models.freeze import FreezeReport, apply_freeze, component_of, match_freeze_patterns
from mmgraph.models.multimodal import ImageEncoders, MultimodalModel

__all__ = [
    "BATCH_FIELDS", "PACKED_FIELDS", "batch_fields", "pack_batch", "pad_batch", "FreezeReport", "ImageEncoders", "MultimodalModel", "apply_freeze",
    "batch_spec", "build_model", "initial_weights", "component_of", "match_freeze_patterns", "random_batch",
]
