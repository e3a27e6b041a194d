"""Every multimodal params file the Model Zoo ships (Release_2.3.1, Release_2.10.0), unchanged.

The files under tests/data/modelzoo are verbatim copies (see its README); both layouts (2.3
sections, ``trainer:``) and both models (``multimodal_simple``, ``llava``) load into one Params.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmgraph.commands.check import check
from mmgraph.cli import main
from mmgraph.core.config import load_params

ZOO = Path(__file__).parent / "data" / "modelzoo"
FILES = sorted(ZOO.glob("Release_*/params_*.yaml"))   # the preprocessing YAMLs beside them are not params
TWINS = [  # a 2.3.1 file and its 2.10.0 twin
    ("params_mm_llava_llama2_7b_phase1.yaml", "params_mm_llava_llama2_7b_phase1.yaml"),
    ("params_mm_llava_llama2_7b_phase1_v2.yaml", "params_mm_llava_llama2_7b_phase1.yaml"),
    ("params_mm_llava_llama2_7b_phase2.yaml", "params_mm_llava_llama2_7b_phase2.yaml"),
    ("params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml"),
    ("params_llava_v1p5_pretrain_7b_phase1_MSL2K_v2.yaml", "params_llava_v1p5_pretrain_7b_phase1_MSL2K.yaml"),
    ("params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml", "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"),
    ("params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml", "params_llava_v1p5_pretrain_13b_phase1_MSL2K.yaml"),
    ("params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml", "params_llava_v1p5_pretrain_13b_phase2_MSL2K.yaml"),
]


def test_the_corpus_is_all_there():
    assert len(list(ZOO.glob("Release_2.3.1/params_*.yaml"))) == 8
    assert len(list(ZOO.glob("Release_2.10.0/params_*.yaml"))) == 6


@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_check_exits_0(path, capsys):
    assert main(["check", "--params", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "total" in out


def _counts(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"^(image_model|text_model|total)", line)]


@pytest.mark.parametrize("old, new", TWINS)
def test_twins_print_the_same_parameter_counts(old, new, capsys):
    main(["check", "--params", str(ZOO / "Release_2.3.1" / old)])
    first = _counts(capsys.readouterr().out)
    main(["check", "--params", str(ZOO / "Release_2.10.0" / new)])
    second = _counts(capsys.readouterr().out)
    assert first and first == second


def test_trainer_layout_maps_onto_the_same_params():
    a = load_params(ZOO / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase1.yaml")
    b = load_params(ZOO / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase1_v2.yaml")
    assert (a.file_layout, b.file_layout) == ("2.3", "trainer")
    assert a.model == b.model
    assert a.train_input == b.train_input and a.eval_input == b.eval_input
    for key in ("optimizer_type", "betas", "eps", "weight_decay", "max_gradient_norm", "loss_scaling_factor",
                "learning_rate"):
        assert getattr(a.optimizer, key) == getattr(b.optimizer, key), key
    for key in ("max_steps", "log_steps", "checkpoint_steps", "eval_steps", "seed", "max_checkpoints",
                "save_initial_checkpoint", "load_checkpoint_states", "disable_strict_checkpoint_loading"):
        assert getattr(a.runconfig, key) == getattr(b.runconfig, key), key


def test_llava_model_freezes_by_its_own_names():
    """'^image_model' in a llava file freezes the encoder, not the projector
    (projector_image_model there), as in the Model Zoo."""
    summary = check(str(ZOO / "Release_2.3.1" / "params_llava_v1p5_pretrain_7b_phase2_MSL2K.yaml"))
    comps = {c.name: c for c in summary.components}
    assert comps["image_model.projection (projector)"].frozen == 0
    assert comps["image_model.image_model_list.0 (encoder)"].trainable == 0
    vit = summary.params.model.image_model_list.image_models[0].encoder
    assert vit.image_layer_idx == -2 and vit.num_layers_used == 23 and not vit.uses_final_norm


def test_micro_batch_split_of_the_7b_phase1_file():
    params = load_params(ZOO / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase1.yaml")
    assert params.micro_batch_sizes("train") == [24] * 9 + [4]
    assert sum(params.micro_batch_sizes("eval")) == 220
    trainer = load_params(ZOO / "Release_2.10.0" / "params_mm_llava_llama2_7b_phase1.yaml")
    assert trainer.micro_batch_sizes("train") == [24] * 9 + [4]


def test_ignored_keys_are_listed(capsys):
    assert main(["check", "--params", str(ZOO / "Release_2.10.0" / "params_mm_llava_llama2_7b_phase1.yaml")]) == 0
    out = capsys.readouterr().out
    assert "ignored keys (trainer layout" in out
    assert "trainer.init.backend:" in out and "trainer.fit.train_dataloader.prefetch_factor:" in out
    assert "trainer.init.callbacks[2].ComputeNorm:" in out


def test_a_typo_in_the_trainer_layout_is_still_an_error(tmp_path, capsys):
    text = (ZOO / "Release_2.10.0" / "params_mm_llava_llama2_7b_phase1.yaml").read_text()
    path = tmp_path / "p.yaml"
    path.write_text(text.replace("        num_heads: 32", "        num_head: 32"))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer.init.model.text_model.num_head: unknown key (did you mean 'num_heads'?)" in err
    path.write_text(text.replace("            use_post_embed_layer_norm: true", "            use_post_embed_layer_nrm: true"))
    assert main(["check", "--params", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer.init.model.image_model_list.image_models[0].image_encoder.use_post_embed_layer_nrm" in err
    assert "did you mean 'use_post_embed_layer_norm'" in err
    path.write_text(text.replace("    - ComputeNorm: {}", "    - ComputeNorn: {}"))
    assert main(["check", "--params", str(path)]) == 2
    assert "unknown callback (did you mean 'ComputeNorm'?)" in capsys.readouterr().err
