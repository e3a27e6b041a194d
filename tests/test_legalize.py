"""Legality per target and the vendor's own check.

The legalize pass rewrites a wafer program into the ops Cerebras's CIRH lowering converts (the op
set kept as data, ``configs/targets/cirh-2.10.0.ops``); the numeric verifier checks every
legalized program against eager PyTorch; ``torch-cirh-opt`` (``make cirh-tool``) lowers what
mmgraph writes. Tests that need the tool skip, saying so, where it is absent.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess

import pytest
import yaml

from mmgraph.compiler import cirh
from mmgraph.cli import main
from mmgraph.core import ops
from mmgraph.core.config import load_params
from mmgraph.core.target import load_target, shipped_targets
from mmgraph.report.formats import to_mlir
from mmgraph.passes import legalize_rules as legalize_mod  # noqa: F401 - RULES, monkeypatched
from mmgraph.passes.legalize import illegal_ops
from mmgraph.compiler.pipeline import compile_step
from tests.conftest import CONFIGS, ROOT, TINY2

FAMILIES = {"llava": "params_mm_llava_tiny_phase2.yaml", "cogvlm": "params_cogvlm_tiny.yaml",
            "mm1": "params_mm1_tiny.yaml", "two_encoders": "params_two_encoders_tiny.yaml"}
TOOL = cirh.find_tool().path
needs_tool = pytest.mark.skipif(TOOL is None, reason=f"no vendor tool: {cirh.find_tool().how}")


def test_the_tool_make_unpacks_is_found(monkeypatch):
    """Where `make cirh-tool` put the tool (.tools/cirh/ of the source tree), mmgraph finds it:
    the vendor tests must not skip silently because the lookup points elsewhere (it did, for a
    while, after cirh.py moved into mmgraph/compiler/)."""
    from pathlib import Path

    unpacked = Path(__file__).resolve().parent.parent / ".tools" / "cirh" / cirh.TOOL
    assert cirh.REPO_TOOL == unpacked
    monkeypatch.delenv(cirh.ENV, raising=False)
    monkeypatch.setenv("PATH", "")
    if unpacked.is_file():
        assert cirh.find_tool().path == unpacked
CIRH = load_target("cs2").op_set()
# What the CPU trace holds and the CIRH lowering does not convert (the list).
TRACE_ONLY = {"torch.aten.view", "torch.aten.t", "torch.aten._unsafe_view", "torch.aten.transpose.int",
              "torch.aten.slice.Tensor", "torch.aten.unsqueeze", "torch.aten.expand", "torch.aten.mul.Scalar",
              "torch.aten.div.Scalar", "torch.aten.pow.Tensor_Scalar", "torch.aten.silu_backward",
              "torch.aten.slice_backward", "torch.aten._scaled_dot_product_flash_attention_for_cpu",
              "torch.aten._scaled_dot_product_flash_attention_for_cpu_backward"}


def _names(program) -> set[str]:
    return {ops.mlir_name(n.target) for n in program.ops() if n.target.__name__ != "getitem"}


# -- the op set and the targets -------------------------------------------------------------------

def test_op_set_is_data_with_its_source():
    assert len(CIRH.ops) == 224 and "torch.aten.view_copy" in CIRH.ops and "torch.aten.view" not in CIRH.ops
    source = " ".join(CIRH.source)
    assert "cerebras-pytorch 2.10.0" in source and "print-supported-ops" in source
    pinned = re.search(r"CIRH_WHEEL_SHA256 := (\w+)", (ROOT / "Makefile").read_text()).group(1)
    assert pinned in source                     # the list came from the wheel make cirh-tool fetches
    assert not TRACE_ONLY & CIRH.ops


def test_wafer_targets_name_an_op_set_and_others_run_every_registered_op():
    for name in shipped_targets():
        target = load_target(name)
        assert (target.op_set() is not None) == (target.kind == "wafer"), name


def test_an_unknown_op_set_is_refused(tmp_path, capsys):
    raw = yaml.safe_load((ROOT / "configs" / "targets" / "cs2.yaml").read_text())
    raw["ops"] = "cirh-2.1.0"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path / "m"), "--target", str(path)]) == 2
    assert "ops: unknown op set 'cirh-2.1.0' (did you mean 'cirh-2.10.0'?)" in capsys.readouterr().err


@needs_tool
def test_op_set_is_the_tools_list(tmp_path):
    module = tmp_path / "f.mlir"
    module.write_text("module {\n  func @f(%arg0: !torch.vtensor<[2],f32>) -> !torch.vtensor<[2],f32> {\n"
                      "    return %arg0 : !torch.vtensor<[2],f32>\n  }\n}\n")
    out = subprocess.run([str(TOOL), str(module), "--convert-torch-to-cirh=print-supported-ops", "-o", os.devnull],
                         capture_output=True, text=True, check=True)
    assert {x.strip() for x in (out.stdout + out.stderr).splitlines() if x.startswith("torch")} == CIRH.ops


# -- one test per family: legal, verified against eager, lowered by the vendor's tool --------------

@pytest.mark.parametrize("family", FAMILIES)
def test_family_legalizes_verifies_and_lowers(family):
    params = load_params(CONFIGS / FAMILIES[family])
    for mode in ("train", "eval"):
        # verify: structure after every pass, and loss and every gradient against eager within 1e-5
        stages = compile_step(params, mode, target=load_target("cs2"), verify=True)
        names = [s.name for s in stages]
        assert names.index("cleanup") < names.index("legalize") < names.index("fusion")
        final = stages[-1].program
        assert _names(final) <= CIRH.ops, _names(final) - CIRH.ops
        assert all(ops.info(n) is not None for n in final.ops() if n.target.__name__ != "getitem")
        traced = _names(stages[names.index("legalize") - 1].program)
        assert traced & TRACE_ONLY                  # there was something to rewrite
        if TOOL is not None:
            low = cirh.lower(TOOL, to_mlir(final), strict=final.precision != "fp32")
            assert low.ok, f"{family} {mode}: {low.error}"
            assert low.op_counts.get("cirh.MatMul", 0) > 0


def test_a_trained_encoder_legalizes_verifies_and_lowers():
    """The demo's phase 1 trains the ViT too: attention's backward in the encoder, the patch
    convolution's backward (every gradient asked for: the lowering types each result as a tensor),
    the key biases' gradients that are zero but for rounding."""
    params = load_params(CONFIGS / "params_mm_llava_demo_phase1.yaml")
    final = compile_step(params, "train", target=load_target("cs2"), verify=True)[-1].program
    conv = [n for n in final.ops() if ops.op_name(n) == "convolution_backward"]
    assert len(conv) == 1 and conv[0].args[-1] == [True, True, True]
    if TOOL is not None:
        assert cirh.lower(TOOL, to_mlir(final)).ok


def test_the_verifier_catches_a_wrong_rewrite(monkeypatch):
    """silu's derivative without its second term: legal, and wrong: the numeric check says so."""
    from mmgraph.passes.verify import VerificationError

    def wrong(rw, node):
        grad, x = node.args
        return rw.emit(legalize_mod.aten.mul.Tensor, (grad, rw.emit(legalize_mod.aten.sigmoid.default, (x,))))
    monkeypatch.setitem(legalize_mod.RULES, legalize_mod.aten.silu_backward.default, wrong)
    with pytest.raises(VerificationError, match="after legalize: gradient of .* differs from eager PyTorch"):
        compile_step(load_params(TINY2), "train", target=load_target("cs2"), verify=True)


def test_host_and_gpu_programs_keep_fused_attention():
    params = load_params(TINY2)
    stages = compile_step(params, "train", target=load_target("h100"))
    names = [s.name for s in stages]
    before, after = (stages[names.index(n)].program for n in ("cleanup", "legalize"))
    assert [n.target for n in before.ops()] == [n.target for n in after.ops()]
    assert "torch.aten._scaled_dot_product_flash_attention_for_cpu" in _names(after)
    assert stages[names.index("legalize")].program.history[-1].notes["rewritten"] == 0


def test_attention_decomposition_reuses_the_forward_probabilities():
    """The backward reads the forward's softmax, as cstorch's bmm/softmax attention does: no
    second softmax in the backward before remat decides to recompute one."""
    params = load_params(TINY2)
    stages = compile_step(params, "train", target=load_target("cs2"), remat="none")
    program = next(s.program for s in stages if s.name == "legalize")
    softmax = [n for n in program.ops() if ops.op_name(n) == "_softmax"]
    assert {program.info[n.name].phase.value for n in softmax} == {"forward"}
    backward = [n for n in program.ops() if ops.op_name(n) == "_softmax_backward_data"]
    assert len(backward) == 2 and all(n.args[1] in softmax for n in backward)


# -- refusals: exit 2, naming op, layer, module ----------------------------------------------------

def test_an_op_legalize_cannot_rewrite_is_refused_at_compile(tmp_path, capsys, monkeypatch):
    monkeypatch.delitem(legalize_mod.RULES, legalize_mod.aten.silu_backward.default)
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"mmgraph: error: {TINY2}: op torch.aten.silu_backward (node %silu_backward and 1 more) in layer "
            "text_model.layers.1, module text_model.transformer_decoder.layers.1.ffn.ffn.1.linear_layer does not lower on cs2: "
            "not in its op set cirh-2.10.0 (configs/targets/cirh-2.10.0.ops), and legalize has no rewrite for it") in err
    assert "Traceback" not in err and not (tmp_path / "compile").exists()


def test_dropout_on_the_wafer_draws_the_wafers_own_random_numbers(tmp_path):
    """Dropout's counter-based mask (one mmgraph::dropout_keep op: a 64-bit integer hash, which
    CIRH does not compute) becomes ``rand >= p`` on cs2, as cstorch lowers dropout; the program is
    verified against eager up to legalize, then structurally; a GPU target keeps the hash."""
    from mmgraph.core.target import load_target

    raw = yaml.safe_load(TINY2.read_text())
    raw["model"]["text_model"].update(dropout_rate=0.1, attention_dropout_rate=0.1)
    path = tmp_path / "dropout.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(path)
    stages = compile_step(params, "train", verify=True, target=load_target("cs2"))
    names = [s.name for s in stages]
    before, after = stages[names.index("legalize") - 1].program, stages[-1].program
    targets = lambda p: {str(n.target) for n in p.ops()}           # noqa: E731
    assert "mmgraph.dropout_keep.default" in targets(before)
    assert "mmgraph.dropout_keep.default" not in targets(after) and "aten.rand.default" in targets(after)
    assert not illegal_ops(after, CIRH)
    gpu = compile_step(params, "train", target=load_target("h100"))[-1].program
    assert "mmgraph.dropout_keep.default" in targets(gpu)


@needs_tool
def test_a_refusal_by_the_tool_quotes_it_and_names_the_op(tmp_path, capsys, monkeypatch):
    """Pretend the op set held ``view``: legalize keeps it, the tool refuses the program."""
    op_set = ops.OpSet(CIRH.name, CIRH.ops | {"torch.aten.view"}, CIRH.source)
    monkeypatch.setitem(ops._OP_SETS, CIRH.name, op_set)
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"mmgraph: error: {TINY2}: torch-cirh-opt refuses program.mlir for cs2: op torch.aten.view "
                          "(node %view, layer image_model.projection, module image_model) at program.mlir:95: "
                          "failed to legalize operation 'torch.aten.view' (with MMGRAPH_CIRH_OPT=off, compile writes")
    assert "Traceback" not in err and not (tmp_path / "compile").exists()


def test_a_fake_tools_refusal_is_parsed(tmp_path, capsys, monkeypatch):
    """The tool's messages, as it writes them, from a stand-in (no vendor tool needed)."""
    fake = tmp_path / "torch-cirh-opt"
    fake.write_text("#!/bin/sh\necho \"$1:148:11: error: Error: One of the PyTorch ops used compiles to "
                    "torch.aten.addmm which is currently unsupported on float32.\" >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(cirh.ENV, str(fake))
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    # line 148 of the real program.mlir is the first attention projection's addmm
    assert "torch-cirh-opt refuses program.mlir for cs2: op torch.aten.addmm (node %addmm, layer " \
           "image_model.encoder0.layers.0, module image_model.image_model_list.0.0.encoder.transformer_encoder.layers.0" \
           ".self_attn.proj_q_dense_layer) at program.mlir:148: Error: One of the PyTorch ops used compiles to " \
           "torch.aten.addmm which is currently unsupported on float32." in err


def test_a_missing_tool_is_one_line_and_compile_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(cirh.ENV, str(tmp_path / "nowhere" / "torch-cirh-opt"))
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 0
    out = [x for x in capsys.readouterr().out.splitlines() if "CIRH" in x]
    assert out == [f"CIRH check skipped: {cirh.ENV}={tmp_path / 'nowhere' / 'torch-cirh-opt'} is not an executable file"]
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    assert "not an executable file" in report["cirh"]["found"] and "ops" not in report["cirh"]
    assert report["artifacts"]["program.cirh.mlir"].startswith("not written")
    # program.mlir is the legalized program, written all the same
    text = (tmp_path / "compile" / "program.mlir").read_text()
    assert "torch.aten.view_copy" in text and not re.search(r"torch\.aten\.view |flash_attention", text)


@needs_tool
def test_compile_writes_the_cirh_and_its_op_counts(tmp_path, capsys):
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"CIRH \(torch-cirh-opt\): program.mlir lowers to [\d,]+ CIRH ops \(Reshape", out)
    report = json.loads((tmp_path / "compile" / "report.json").read_text())
    c = report["cirh"]
    assert c["ok"] and c["total_ops"] == sum(c["ops"].values()) > 500 and c["ops"]["cirh.Softmax"] == 4
    assert c["command"] == "torch-cirh-opt program.mlir -refine-types -torch-to-cirh-pipeline -print-op-stats " \
                           "-o program.cirh.mlir"
    assert (tmp_path / "compile" / "program.cirh.mlir").read_text().lstrip().startswith("module")
    assert "cirh.MatMul" in (tmp_path / "compile" / "report.html").read_text()


# -- strict-soundness mode: mixed precision ------------------------------------------------------

@needs_tool
@pytest.mark.parametrize("family", ["llava", "cogvlm"])     # cogvlm: a bool mask padded (int32 in strict mode)
def test_mixed_precision_lowers_in_strict_mode_and_float32_does_not(tmp_path, family):
    raw = yaml.safe_load((CONFIGS / FAMILIES[family]).read_text())
    raw["model"]["mixed_precision"] = True
    raw["model"]["fp16_type"] = "bfloat16"
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    mixed = compile_step(load_params(path), "train", target=load_target("cs2"))[-1].program
    assert mixed.precision == "bf16"
    low = cirh.lower(TOOL, to_mlir(mixed), strict=True)
    assert low.ok, low.error
    if family == "llava":
        fp32 = compile_step(load_params(CONFIGS / FAMILIES[family]), "train", target=load_target("cs2"))[-1].program
        refused = cirh.lower(TOOL, to_mlir(fp32), strict=True)      # strict mode refuses float32 matmuls
        assert not refused.ok and "unsupported on float32" in refused.error and refused.op.startswith("torch.aten.")


# -- the tool's output, parsed -------------------------------------------------------------------

def test_first_error_and_op_stats_parse_the_tools_messages():
    stderr = ("program.mlir:95:10: error: failed to legalize operation 'torch.aten.view'\n"
              "    %1 = torch.aten.view %arg80, %0 : !torch.vtensor<[8,2,3,32,32],f32>\n"
              "program.mlir:95:10: note: see current operation\n")
    assert cirh.first_error(stderr, 1) == ("failed to legalize operation 'torch.aten.view'", "torch.aten.view", 95)
    aborted = "<unknown>:0: error: expected floating point type\ntorch-cirh-opt: ... Assertion failed.\n"
    message, op, line = cirh.first_error(aborted, -6)
    assert message == "expected floating point type (the tool aborted: signal 6)" and (op, line) == ("", 0)
    stats = ("Operations encountered:\n-----------------------\n  builtin.func   , 1\n"
             "     cirh.Add                                 , 62\n     cirh.MatMul , 3\n      std.return , 1\n")
    assert cirh.op_stats(stats) == {"cirh.Add": 62, "cirh.MatMul": 3}
    assert cirh.legacy_mlir("module {\n  func.func @step(") == "module {\n  func @step("


# -- every program of configs/ (slow: the 7B ones take a minute each) ----------------------------

ALL = sorted(p.name for p in CONFIGS.glob("params_*.yaml"))


@pytest.mark.slow
@needs_tool
@pytest.mark.parametrize("config", ALL)
def test_every_program_of_configs_lowers(config):
    params = load_params(CONFIGS / config)
    for mode in ("train", "eval"):
        if params.input_for(mode) is None:
            continue
        final = compile_step(params, mode, target=load_target("cs2"))[-1].program
        low = cirh.lower(TOOL, to_mlir(final), strict=final.precision != "fp32")
        assert low.ok, f"{config} {mode}: {low.error} ({low.op})"
