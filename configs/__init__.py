"""Params files and hardware targets shipped with mmgraph (``mmgraph.configs``)."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_path(name: str) -> Path:
    """Path of a shipped params file, e.g. ``config_path("params_mm_llava_tiny_phase1.yaml")``."""
    return CONFIG_DIR / name
