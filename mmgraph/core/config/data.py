"""The ``train_input`` / ``eval_input`` sections: the multimodal H5 data processor."""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import AliasChoices, Field, field_validator, model_validator

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


class ExploreBounds(Section):
    """The micro-batches ``explore`` evaluates (the Model Zoo's ``{explore: {min, max}}``)."""

    min: PositiveInt = 1
    max: Optional[PositiveInt] = None     # default: the batch size (per system)

    @model_validator(mode="after")
    def _ordered(self):
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max ({self.max}) is below min ({self.min})")
        return self


class Explore(Section):
    """``micro_batch_size: {explore: {min: 1, max: 16}}``."""

    explore: ExploreBounds = ExploreBounds()


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
    # an integer; auto (the compiler picks among the divisors of batch_size); explore (every
    # micro-batch from 1 to batch_size, or {explore: {min, max}}: a table, the best is compiled);
    # none (batch_size itself)
    micro_batch_size: Optional[Union[PositiveInt, Literal["auto", "explore", "none"], Explore]] = None
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

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch(cls, value):
        """One message for what is not a micro-batch setting."""
        if value is None or isinstance(value, (Explore, bool)) or value in ("auto", "explore", "none"):
            return value                                   # (a boolean gets the schema's own message)
        if isinstance(value, str) and value.strip().isdigit():
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise ValueError(f"must be positive, not {value}")
            return value
        if not isinstance(value, dict):
            raise ValueError("must be a positive integer, auto, explore, none or {explore: {min: N, max: M}}, "
                             f"not {value!r}")
        if set(value) != {"explore"} or not isinstance(value["explore"], (dict, type(None))):
            raise ValueError("must be a positive integer, auto, explore, none or {explore: {min: N, max: M}}, "
                             f"not {value!r}")
        bounds = value["explore"] or {}
        unknown = sorted(set(bounds) - {"min", "max"})
        if unknown:
            raise ValueError(f"explore: unknown key {unknown[0]!r} (known: min, max)")
        for key in ("min", "max"):
            if key in bounds and not (isinstance(bounds[key], int) and not isinstance(bounds[key], bool)
                                      and bounds[key] > 0):
                raise ValueError(f"explore.{key} must be a positive integer, not {bounds[key]!r}")
        if "min" in bounds and "max" in bounds and bounds["max"] < bounds["min"]:
            raise ValueError(f"explore.max ({bounds['max']}) is below explore.min ({bounds['min']})")
        return Explore(explore=ExploreBounds(**bounds))

    @field_validator("image_data_size", mode="before")
    @classmethod
    def _size(cls, value):
        """``336`` -> ``(3, 336, 336)``; ``[336, 336]`` -> ``(3, 336, 336)``."""
        if isinstance(value, int) and not isinstance(value, bool):
            return (3, value, value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return (3, *value)
        return value
