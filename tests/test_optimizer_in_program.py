"""The optimizer update in the program (``--optimizer_in_program``, passes/optimizer.py): 20 steps
equal the runtime's own update (runtime/optim.py) within 1e-6 for AdamW and SGD with momentum,
weight decay, clipping and a schedule, and with float16 dynamic loss scaling (an overflow skips
the step in both); the wafer's program with the update lowers with the vendor's tool; what it
cannot hold is refused by name."""

from __future__ import annotations

import json

import pytest
import yaml

from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.ir import InputKind
from mmgraph.models import build_model, initial_weights, random_batch
from mmgraph.models.anatomy import no_weight_decay
from mmgraph.compiler.pipeline import compile_step
from mmgraph.runtime.runner import Runner
from tests.conftest import TINY2

STEPS = 20


def _params(tmp_path, model=None, **optimizer):
    raw = yaml.safe_load(TINY2.read_text())
    raw["model"].update(model or {})
    raw["optimizer"].update(optimizer)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def _train(params, tmp_path, name, update: bool, steps: int = STEPS):
    program = compile_step(params, optimizer_in_program=update)[-1].program
    runner = Runner(params, tmp_path / name, train=program, weights=initial_weights(params),
                    no_decay=no_weight_decay(build_model(params, device="meta")[0]))
    layout = params.layout()
    results = [runner.train_step([random_batch(layout, 8, seed=100 + s)]) for s in range(steps)]
    return program, runner, results


def _close(a: dict, b: dict, names, rel: float) -> None:
    for k in names:
        scale = a[k].abs().max().clamp_min(1e-12)
        assert float((a[k] - b[k]).abs().max() / scale) <= rel, k


def _parity(params, tmp_path, rel=1e-6):
    program, ours, got = _train(params, tmp_path, "in", True)
    _, ref, want = _train(params, tmp_path, "host", False)
    assert any(s.kind == InputKind.STATE for s in program.inputs)
    assert not any(o.kind == "grad" for o in program.outputs)
    assert [o.target for o in program.outputs if o.kind == "param_update"] == ref.trainable
    assert ours.optimizer.step_count == ref.optimizer.step_count
    for a, b in zip(got, want):
        assert a.loss == pytest.approx(b.loss, rel=rel) and a.lr == b.lr
        assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-4) or a.grad_norm == b.grad_norm == float("inf")
    _close(ref.weights, ours.weights, ref.trainable, rel)
    state_a, state_b = ref.optimizer.state_dict(), ours.optimizer.state_dict()
    assert state_a.keys() == state_b.keys()
    _close(state_a, state_b, [k for k in state_a if k != "step_count"], rel)
    return got, want


def test_adamw_with_decay_clipping_and_a_schedule_equals_the_runtimes_update(tmp_path):
    params = _params(tmp_path, weight_decay=0.1, max_gradient_norm=0.05)   # clips every step
    got, _ = _parity(params, tmp_path)
    assert len({r.lr for r in got}) > 10                                     # warm-up then decay
    assert all(r.grad_norm > 0.05 for r in got)


def test_sgd_with_momentum_equals_the_runtimes_update(tmp_path):
    params = _params(tmp_path, optimizer_type="SGD", momentum=0.9, weight_decay=0.01, max_gradient_norm=1.0,
                     learning_rate=0.05)
    _parity(params, tmp_path)


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps_alike(tmp_path):
    params = _params(tmp_path, {"mixed_precision": True, "fp16_type": "float16"}, loss_scaling_factor="dynamic",
                     initial_loss_scale=2.0 ** 28, steps_per_increase=3)
    got, want = _parity(params, tmp_path)
    skipped = [r.step for r in got if r.grad_norm == float("inf")]
    assert skipped and skipped == [r.step for r in want if r.grad_norm == float("inf")] and len(skipped) < STEPS


def test_the_compiled_executor_takes_the_float16_update(tmp_path):
    """The float16 update's finite check (``isfinite``, ``all``, ``stack``) is in the op registry,
    so the compiled executor runs it (red when one is missing: the executor refuses the program).
    Its steps against the reference's were checked by hand: losses within 1e-6, weights within
    3e-4 after 3 steps (Inductor computes float16 chains in float32)."""
    import torch

    from mmgraph.runtime.executors import make_executor

    params = _params(tmp_path, {"mixed_precision": True, "fp16_type": "float16"}, loss_scaling_factor="dynamic")
    program = compile_step(params, optimizer_in_program=True)[-1].program
    assert any(o.kind == "finite" for o in program.outputs)
    assert make_executor("compiled", program, params, torch.device("cpu")).name == "compiled"


def test_refused_with_data_parallelism_or_several_micro_steps(tmp_path, capsys):
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"]["micro_batch_size"] = 4
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["compile", "--params", str(path), "--model_dir", str(tmp_path / "a"), "--optimizer_in_program"]) == 2
    assert "micro_batch_size 4 must equal batch_size 8" in capsys.readouterr().err
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path / "b"), "--optimizer_in_program",
                 "--world_size", "2"]) == 2
    assert "--optimizer_in_program" in capsys.readouterr().err


def test_the_wafer_program_with_the_update_lowers_and_its_artifact_is_another(tmp_path, capsys):
    """cs2: the update's ops legalized with the rest; the vendor's tool lowers the whole step
    (when it is installed); the saved program says it holds the update, so run without the flag
    compiles its own."""
    from mmgraph.compiler import cirh

    md = tmp_path / "md"
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(md), "--optimizer_in_program",
                 "--verify"]) == 0          # structure after the splice: every op in one kernel, ...
    out = capsys.readouterr().out
    mlir = (md / "compile" / "program.mlir").read_text()
    assert "bias_correction" in mlir or mlir.count("func.func") == 1
    report = json.loads((md / "compile" / "report.json").read_text())
    assert any(p["name"] == "optimizer" for p in report["passes"])
    if cirh.find_tool().path is not None:
        assert (md / "compile" / "program.cirh.mlir").is_file(), out
    saved = json.loads((md / "programs" / "train" / "fingerprint.json").read_text())
    assert saved["update"] == "program" and "optimizer.betas" in saved["params"]
    from mmgraph.compiler import artifact
    loaded = artifact.load(md / "programs" / "train")                   # the artifact keeps the new kinds
    assert {s.kind for s in loaded.inputs} >= {InputKind.STATE, InputKind.SCALAR}
    assert {o.kind for o in loaded.outputs} >= {"param_update", "state_update", "grad_norm"}
    host = artifact.fingerprint(load_params(TINY2), "train", target="cs2")
    where, why = artifact.find(md / "programs", "train", host)
    assert where is None and "update 'program' -> 'host'" in why
