"""``mmgraph inspect``: the dumps read back for a person."""

from __future__ import annotations

import pytest

from mmgraph.cli import main
from tests.conftest import TINY2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    where = tmp_path_factory.mktemp("md")
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(where)]) == 0
    return where


def test_summary(model_dir, capsys):
    capsys.readouterr()
    assert main(["inspect", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "text_model.layers.*" in out and "(x2)" in out
    assert "eval.onnx: written" in out
    for name in ("trace", "freeze_masks", "cleanup", "fusion"):
        assert f"\n{name} " in out


def test_one_pass_one_kernel_and_a_diff(model_dir, capsys):
    capsys.readouterr()
    assert main(["inspect", str(model_dir), "--pass", "cleanup"]) == 0
    assert capsys.readouterr().out.startswith("# cleanup: train step")
    assert main(["inspect", str(model_dir), "--kernel", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("kernel k3 ") and all(line.startswith("    %") for line in out[1:])
    assert main(["inspect", str(model_dir), "--diff", "freeze_masks", "cleanup"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("--- 01-freeze_masks.txt\n+++ 02-cleanup.txt")


@pytest.mark.parametrize("args,message", [
    (["--pass", "fuson"], "no pass named 'fuson' (did you mean 'fusion'?); passes: trace, freeze_masks, cleanup, legalize, fusion"),
    (["--kernel", "100000"], "no kernel 100000 (kernels are 0 .. "),
])
def test_bad_requests(model_dir, capsys, args, message):
    capsys.readouterr()
    assert main(["inspect", str(model_dir), *args]) == 2
    assert message in capsys.readouterr().err


def test_no_dumps(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"mmgraph: error: {tmp_path}: no compile dumps here (run mmgraph compile first)\n"
