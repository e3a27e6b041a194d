"""The ``runconfig`` section."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from mmgraph.core.config.base import Section

PositiveInt = Annotated[int, Field(gt=0)]


class RunConfig(Section):
    max_steps: Optional[PositiveInt] = None
    num_epochs: Optional[PositiveInt] = None
    log_steps: PositiveInt = 1
    checkpoint_steps: Optional[Annotated[int, Field(ge=0)]] = None
    eval_steps: Optional[PositiveInt] = None
    eval_frequency: Optional[PositiveInt] = None
    seed: int = 1
    max_checkpoints: Optional[PositiveInt] = None
    save_initial_checkpoint: bool = False
    load_checkpoint_states: Optional[str] = None
    disable_strict_checkpoint_loading: bool = False
    checkpoint_path: Optional[str] = None
    model_dir: Optional[str] = None
