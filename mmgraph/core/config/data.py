"""The ``train_input`` / ``eval_input`` sections: the multimodal H5 data processor."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AliasChoices, Field, field_validator

from mmgraph.core.config.base import Section

PositiveInt = Annotated[int, Field(gt=0)]


class Transform(Section):
    """One image transform, applied in list order (torchvision names and arguments)."""

    name: Literal["expand_to_square", "resize", "center_crop", "random_crop",
                  "random_horizontal_flip", "to_tensor", "normalize", "to_dtype"]
    background_color: Optional[list[Annotated[int, Field(ge=0, le=255)]]] = None
    size: Optional[Union[PositiveInt, list[PositiveInt]]] = None
    interpolation: Optional[Literal["nearest", "bilinear", "bicubic", "lanczos", "box",
                                    "hamming"]] = None
    antialias: Optional[bool] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    dtype: Optional[str] = None


class InputConfig(Section):
    """Model Zoo ``MultimodalSimpleHDF5MapDataProcessor`` keys."""

    # LlavaHDF5MapDataProcessor: the older llava model's files (same H5 layout for mmgraph's loader)
    data_processor: Literal["MultimodalSimpleHDF5MapDataProcessor", "LlavaHDF5MapDataProcessor"] = (
        "MultimodalSimpleHDF5MapDataProcessor"
    )
    data_dir: Union[str, list[str]]
    img_data_dir: Optional[str] = None
    image_data_size: tuple[PositiveInt, PositiveInt, PositiveInt] = Field(
        default=(3, 224, 224), validation_alias=AliasChoices("image_data_size", "image_size")
    )
    transforms: list[Transform] = []
    batch_size: PositiveInt
    micro_batch_size: Optional[Union[PositiveInt, Literal["auto", "explore", "none"]]] = None
    shuffle: bool = False
    shuffle_seed: int = 274508134           # the Model Zoo's default
    drop_last: bool = True
    num_workers: Annotated[int, Field(ge=0)] = 0
    max_num_img: PositiveInt = 1
    max_sequence_length: Optional[PositiveInt] = None
    bos_token_id: Optional[int] = None
    pad_token_id: int = 0
    noaugment: bool = False
    packed: bool = False  # mmgraph: rows hold several samples (segment_ids, position_ids)

    @field_validator("image_data_size", mode="before")
    @classmethod
    def _size(cls, value):
        """``336`` -> ``(3, 336, 336)``; ``[336, 336]`` -> ``(3, 336, 336)``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return (3, value, value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return (3, *value)
        return value
