"""A corpus of broken params files and the exact errors a user sees for each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmgraph.cli import main

DATA = Path(__file__).parent / "data" / "broken_params"
VIT = "model.image_model_list.image_models[0].image_model[0]"

EXPECTED = {
    "yaml_syntax.yaml": [
        "line 59, column 24: YAML syntax error: expected ',' or ']', but got ':' "
        "(while parsing a flow sequence started at line 58, column 21)",
    ],
    "unknown_key.yaml": ["model.text_model.hiden_size: unknown key (did you mean 'hidden_size'?)"],
    "unknown_section.yaml": [
        "optimiser: unknown section (did you mean 'optimizer'?)",
        "optimizer: missing section (required for --mode train)",
    ],
    "wrong_type.yaml": [
        "model.text_model.num_hidden_layers: must be a valid integer, unable to parse string "
        "as an integer (got 'two')",
    ],
    "missing_section.yaml": [
        "modelx: unknown section (did you mean 'model'?)",
        "model: missing section",
    ],
    "freeze_no_match.yaml": [
        "model.freeze[0]: pattern '^vision_tower' matches no parameter (names start with "
        "image_model.image_model_list, image_model.projection or text_model)",
    ],
    "patch_not_divisor.yaml": [
        f"{VIT}.patch_size: image_size [32, 32] is not divisible by patch_size [7, 7]",
    ],
    "layer_idx_out_of_range.yaml": [
        f"{VIT}.image_layer_idx: -4 is out of range for num_hidden_layers 3 (valid: -3 .. 2)",
    ],
    "bad_enum.yaml": [
        "model.image_model_list.image_feature_select_mode: 'patches' is not one of 'patch' or "
        "'cls_patch' (did you mean 'patch'?)",
    ],
    "micro_batch.yaml": [
        "train_input.micro_batch_size: must be a number, not a boolean (true)",
        "eval_input.micro_batch_size: must be a number, not a boolean (true)",
    ],
    "projector_width.yaml": [
        "model.image_model_list.global_image_projection.layers_units: the last layer must "
        "output text_model.hidden_size 64, got 48",
    ],
    "many_problems.yaml": [
        "train_input.batch_size: must be greater than 0 (got -8)",
        "eval_input.batch_size: must be greater than 0 (got -8)",
        "model.text_model.num_layers: unknown key (did you mean 'num_hidden_layers'?)",
        "optimizer.optimizer_type: 'Adamax' is not one of 'AdamW', 'Adam' or 'SGD' "
        "(did you mean 'Adam'?)",
        "runconfig.log_steps: must be greater than 0 (got 0)",
    ],
}


def test_corpus_is_complete():
    assert sorted(EXPECTED) == sorted(p.name for p in DATA.glob("*.yaml"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_params_message(name, capsys):
    path = DATA / name
    assert main(["check", "--params", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    expected = [f"mmgraph: error: {path}: {line}" for line in EXPECTED[name]]
    assert err.splitlines() == expected


def test_no_traceback_without_debug_and_traceback_with_it():
    path = str(DATA / "unknown_key.yaml")
    plain = subprocess.run([sys.executable, "-m", "mmgraph", "check", "--params", path],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "mmgraph", "check", "--params", path, "--debug"],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


def test_missing_file(tmp_path, capsys):
    path = tmp_path / "nope.yaml"
    assert main(["check", "--params", str(path)]) == 2
    assert capsys.readouterr().err == f"mmgraph: error: {path}: no such file\n"


@pytest.mark.parametrize("text,message", [
    ("", "the file is empty"),
    ("- a\n- b\n", "expected a mapping of sections, got list"),
])
def test_not_a_params_mapping(tmp_path, capsys, text, message):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    assert main(["check", "--params", str(path)]) == 2
    assert capsys.readouterr().err == f"mmgraph: error: {path}: {message}\n"
