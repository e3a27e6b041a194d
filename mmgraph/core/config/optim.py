"""The ``optimizer`` section: optimizer, learning-rate schedule and loss scaling."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from mmgraph.core.config.base import Section
from mmgraph.core.errors import did_you_mean

NonNeg = Annotated[float, Field(ge=0.0)]

# Model Zoo spellings ("Linear", "LinearLR", "cosinedecaylr", ...) -> one canonical name.
_SCHEDULER_NAMES = {
    "linear": "Linear", "linearlr": "Linear",
    "cosinedecay": "CosineDecay", "cosinedecaylr": "CosineDecay",
    "constant": "Constant", "constantlr": "Constant",
    "exponential": "Exponential", "exponentiallr": "Exponential",
}


class Scheduler(Section):
    """One learning-rate schedule; a list of them runs one after another (Model Zoo sequence)."""

    scheduler: Literal["Linear", "CosineDecay", "Constant", "Exponential"]
    initial_learning_rate: Optional[NonNeg] = None
    end_learning_rate: Optional[NonNeg] = None
    learning_rate: Optional[NonNeg] = None
    total_iters: Optional[Annotated[int, Field(gt=0)]] = None
    decay_steps: Optional[Annotated[int, Field(gt=0)]] = None
    decay_rate: Optional[Annotated[float, Field(gt=0.0)]] = None
    staircase: bool = False

    @field_validator("scheduler", mode="before")
    @classmethod
    def _canonical(cls, value):
        if isinstance(value, str):
            return _SCHEDULER_NAMES.get(value.lower().replace("_", ""), value)
        return value


def _lr_form(value) -> str:
    if isinstance(value, list):
        return "list"
    return "one" if isinstance(value, dict) else "number"


# A number, one schedule, or a sequence of schedules; the form picks the validator, so a
# mistake in a schedule is reported once, at its key.
LearningRate = Annotated[
    Union[Annotated[NonNeg, Tag("number")], Annotated[Scheduler, Tag("one")],
          Annotated[list[Scheduler], Tag("list")]],
    Discriminator(_lr_form),
]


class OptimizerConfig(Section):
    optimizer_type: Literal["AdamW", "Adam", "SGD"]
    learning_rate: LearningRate
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    eps: Annotated[float, Field(gt=0.0)] = 1.0e-8
    weight_decay: NonNeg = 0.0
    momentum: NonNeg = 0.0
    max_gradient_norm: Optional[Annotated[float, Field(gt=0.0)]] = None
    correct_bias: bool = True
    loss_scaling_factor: Union[Annotated[float, Field(gt=0.0)], Literal["dynamic"]] = 1.0
    initial_loss_scale: Annotated[float, Field(gt=0.0)] = 2.0**15
    steps_per_increase: Annotated[int, Field(gt=0)] = 2000
    min_loss_scale: Annotated[float, Field(gt=0.0)] = 2.0**-14
    max_loss_scale: Annotated[float, Field(gt=0.0)] = 2.0**24
    # Other keys, collected like the Model Zoo's ``optim_params`` (passed to its optimizer class);
    # none of them changes AdamW/Adam/SGD here: listed as ignored by ``mmgraph check``.
    optim_params: dict[str, Any] = {}

    @model_validator(mode="before")
    @classmethod
    def _collect_extra(cls, data):
        """Unknown keys go to ``optim_params``, unless they look like a typo of a known key."""
        if not isinstance(data, dict):
            return data
        known = cls.key_names()
        extra = {k: v for k, v in data.items() if k not in known and not did_you_mean(str(k), known)}
        if not extra:
            return data
        kept = {k: v for k, v in data.items() if k not in extra}
        kept["optim_params"] = {**(data.get("optim_params") or {}), **extra}
        return kept

    @field_validator("optimizer_type", mode="before")
    @classmethod
    def _canonical(cls, value):
        names = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD"}
        return names.get(value.lower(), value) if isinstance(value, str) else value
