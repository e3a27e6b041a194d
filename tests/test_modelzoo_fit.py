"""Every micro-batch the Model Zoo ships fits on its release's target (Release_2.3.1: cs2,
Release_2.10.0: cs3), with the memory plan's choices named in report.json and in compile's
summary (slow: each compiles a 7B or 13B step, about a minute each on 2 idle cores)."""

from __future__ import annotations

import json

import pytest

from mmgraph.cli import main
from tests.conftest import ROOT

ZOO = ROOT / "tests" / "data" / "modelzoo"
TARGET = {"Release_2.3.1": "cs2", "Release_2.10.0": "cs3"}
SHIPPED = [                       # (release, file, the micro_batch_size it ships)
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase1.yaml", 24),
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase1_v2.yaml", 24),
    ("Release_2.3.1", "params_mm_llava_llama2_7b_phase2.yaml", 24),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml", 22),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase1_MSL2K_v2.yaml", 22),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml", 72),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml", 55),
    ("Release_2.3.1", "params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml", 55),
    ("Release_2.10.0", "params_mm_llava_llama2_7b_phase1.yaml", 24),
    ("Release_2.10.0", "params_mm_llava_llama2_7b_phase2.yaml", 24),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml", 22),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml", 72),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml", 55),
    ("Release_2.10.0", "params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml", 55),
]


@pytest.mark.slow
@pytest.mark.parametrize("release,name,mbs", SHIPPED, ids=[f"{r[8:]}-{n[7:-5]}" for r, n, _ in SHIPPED])
def test_shipped_micro_batch_fits_with_named_choices(tmp_path, capsys, release, name, mbs):
    target = TARGET[release]
    assert main(["compile", "--params", str(ZOO / release / name), "--model_dir", str(tmp_path), "--target", target]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    t, mem = report["target"], report["memory"]
    assert t["fits"] and t["micro_batch_size"] == mbs and t["peak_memory_bytes"] <= t["memory_bytes"]
    # the plan's estimate is the simulated peak (both count the same values)
    assert mem["estimated_peak_bytes"] == pytest.approx(t["peak_memory_bytes"], rel=0.01)
    assert f"memory on {target}: fits" in out
    for used in mem["mechanisms"]:                 # every mechanism used is named, with its cost
        assert f"{used}:" in out.split(f"memory on {target}:")[1].splitlines()[0]
    assert set(mem["mechanisms"]) <= set(mem["available"]) == {"recompute", "pieces", "offload"}
    if mem["offload"]["layers"]:                   # the earliest layers: their backward comes last
        n = len(mem["offload"]["layers"])
        assert mem["offload"]["layers"] == [f"text_model.layers.{i}" for i in range(n)]
