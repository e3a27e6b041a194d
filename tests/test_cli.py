"""The ``mmgraph`` command line: help, version and ``check`` summaries."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmgraph.cli import main
from tests.conftest import BIG1, BIG2, TINY2


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "check" in capsys.readouterr().out


def test_console_script_and_module_run():
    out = subprocess.run([sys.executable, "-m", "mmgraph", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("mmgraph ")


@pytest.mark.parametrize("path,rows", [
    (BIG1, ["image_model.image_model_list.0 (encoder)      303,507,456                0      303,507,456",
            "image_model.projection (projector)             20,979,712       20,979,712                0",
            "text_model (language model)                 6,738,415,616                0    6,738,415,616",
            "total                                       7,062,902,784       20,979,712    7,041,923,072",
            "  '^image_model.image_model_list': 391 tensors, 303,507,456 parameters",
            "  '^text_model': 291 tensors, 6,738,415,616 parameters",
            "  encoder 0: 24x24 patches of 14x14 + CLS, features after block 23 of 24 (image_layer_idx -2)",
            "  tokens per image: 576 (image_feature_select_mode patch)"]),
    (BIG2, ["total                                       7,062,902,784    6,759,395,328      303,507,456"]),
])
def test_check_7b_summary(capsys, path, rows):
    assert main(["check", "--params", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    for row in rows:
        assert row in out


def test_check_eval_mode(capsys):
    assert main(["check", "--params", str(TINY2), "--mode", "eval"]) == 0
    assert "(mode eval): valid" in capsys.readouterr().out
