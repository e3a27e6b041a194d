"""The ``runconfig`` section."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import Field

from mmgraph.config.base import Section

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
    # Cerebras cluster settings: accepted so Model Zoo files load; they change nothing here.
    num_csx: Optional[PositiveInt] = None
    num_workers_per_csx: Optional[int] = None
    mgmt_address: Optional[str] = None
    credentials_path: Optional[str] = None
    compile_dir: Optional[str] = None
    compile_only: Optional[bool] = None
    validate_only: Optional[bool] = None
    precision_opt_level: Optional[int] = None
    execute_crd_memory_gi: Optional[Any] = None
    log_input_summaries: Optional[bool] = None
    mode: Optional[Literal["train", "eval", "train_and_eval", "eval_all"]] = None
