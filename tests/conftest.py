from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
TINY1 = CONFIGS / "params_mm_llava_tiny_phase1.yaml"
TINY2 = CONFIGS / "params_mm_llava_tiny_phase2.yaml"
BIG1 = CONFIGS / "params_mm_llava_llama2_7b_phase1.yaml"
BIG2 = CONFIGS / "params_mm_llava_llama2_7b_phase2.yaml"


@pytest.fixture
def tiny1() -> Path:
    return TINY1


@pytest.fixture
def tiny2() -> Path:
    return TINY2
