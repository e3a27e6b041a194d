"""Activation recomputation (the remat pass): the rewritten program computes the same loss and
gradients (bit for bit against the plain program on the CPU, and like eager PyTorch), the kept
set is what crosses the forward/backward boundary, and memory drops by policy."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from mmgraph.models import initial_weights
from mmgraph.cli import main
from mmgraph.core.config import load_params
from mmgraph.core.ir import Phase
from mmgraph.passes.cost import peak_breakdown
from mmgraph.passes.remat import CLONE_PREFIX, crossing_values, verify_plan
from mmgraph.passes.verify import VerificationError, verify_structure
from mmgraph.compiler.pipeline import reference_inputs, verify_against_eager
from mmgraph.compiler.pipeline import compile_step
from mmgraph.runtime.runner import Runner
from mmgraph.core.target import load_target
from tests.conftest import CONFIGS, ROOT, TINY1, TINY2, small_memory_target

COGVLM = CONFIGS / "params_cogvlm_tiny.yaml"
ZOO_7B = ROOT / "tests" / "data" / "modelzoo" / "Release_2.3.1" / "params_mm_llava_llama2_7b_phase2.yaml"


def _outputs(program, params):
    _, _, flat = reference_inputs(program, params)
    with torch.no_grad():
        return program.gm(*[t.detach() for t in flat])


@pytest.mark.parametrize("path", [TINY1, TINY2, COGVLM], ids=["phase1", "phase2", "cogvlm"])
def test_recomputed_program_equals_plain_program_and_eager(path):
    params = load_params(path)
    plain = compile_step(params, remat="none")[-1].program
    want = _outputs(plain, params)
    for policy in ("selective", "full"):
        program = compile_step(params, remat=policy)[-1].program
        assert [r.name for r in program.history][-2:] == ["remat", "fuse_recomputed"] and program.remat.clones
        got = _outputs(program, params)
        assert len(got) == len(want)
        for spec, a, b in zip(program.outputs, got, want):       # loss and every gradient
            assert torch.equal(a, b), (policy, spec)
        verify_structure(program, "fuse_recomputed")
        verify_plan(program, "fuse_recomputed")
        verify_against_eager(program, params, "fuse_recomputed", rtol=1e-5)


def test_verify_checks_the_rewritten_program():
    stages = compile_step(load_params(TINY1), remat="selective", verify=True)
    assert [s.name for s in stages][-2:] == ["remat", "fuse_recomputed"] and stages[-1].program.remat.clones
    assert stages[-2].program.kernels is None                   # the rewrite left its clones in no kernel
    owner = {n for k in stages[-1].program.kernels for n in k.nodes}
    assert set(stages[-1].program.remat.clones) <= owner        # fusion, run again, placed them


def test_recomputed_ops_run_in_the_backward_and_full_keeps_layer_boundaries():
    program = compile_step(load_params(TINY2), remat="full")[-1].program
    clones = [n for n in program.ops() if n.name.startswith(CLONE_PREFIX)]
    assert clones and {n.name for n in clones} == set(program.remat.clones)
    assert all(program.info[n.name].phase == Phase.BACKWARD for n in clones)
    nodes = {n.name: n for n in program.gm.graph.nodes}
    crossing = crossing_values(program)
    for layer in program.remat.layers:
        assert layer.policy == "full" and set(layer.kept) == crossing.get(layer.layer, set())
        for name in layer.kept:     # full: only what a forward op of another layer reads stays
            users = [u for u in nodes[name].users if u.op == "call_function"]
            assert any(program.info[u.name].phase == Phase.FORWARD and program.info[u.name].layer != layer.layer
                       for u in users), name
    # Each clone sits before its first backward reader (the graph is in topological order).
    order = {n: i for i, n in enumerate(program.gm.graph.nodes)}
    for c in clones:
        assert all(order[u] > order[c] for u in c.users)


def test_verify_catches_a_kept_set_that_does_not_match():
    program = compile_step(load_params(TINY2), remat="full")[-1].program
    layer = program.remat.layers[-1]
    wrong = program.remat.__class__(**{**program.remat.__dict__,
                                       "layers": program.remat.layers[:-1] + (layer.__class__(
                                           **{**layer.__dict__, "kept": layer.kept[1:]}),)})
    bad = program.__class__(**{**program.__dict__, "remat": wrong})
    with pytest.raises(VerificationError, match="kept set"):
        verify_plan(bad, "remat")


def test_memory_and_flops_by_policy_on_the_target():
    """On a program with fused attention (a GPU target keeps it): legalized for the wafer, the tiny
    model's attention scores, recomputed by selective, outweigh what selective saves."""
    params = load_params(TINY2)
    target = load_target("h100")
    runs = {p: compile_step(params, target=target, remat=p)[-1].program for p in ("none", "selective", "full")}
    peak = {p: r.schedule.peak_memory_bytes for p, r in runs.items()}
    extra = {p: r.schedule.recompute_flops for p, r in runs.items()}
    kept = {p: r.remat.kept_bytes for p, r in runs.items()}
    assert peak["full"] < peak["selective"] < peak["none"]
    assert kept["full"] < kept["selective"] < kept["none"]
    assert 0 == extra["none"] < extra["selective"] < extra["full"]
    assert extra["full"] == runs["full"].remat.extra_flops
    # Model FLOPs stay those of the plain step: utilization does not count recomputation.
    base = runs["none"].flops()
    assert runs["full"].flops() - extra["full"] == base
    assert all(r.schedule.bottleneck in ("compute", "stream-in", "stream-out") for r in runs.values())
    parts = peak_breakdown(runs["full"], params.precision)      # what the no-fit error names
    assert parts["recomputed"] > 0 and parts["segment"].startswith("backward")
    # the parts are peak minus the rest; checked against what is counted elsewhere: the buffers
    # are the resident model states (weights, gradients, optimizer state), the kept activations
    # at most what the plan keeps, the working set the peak segment's
    from mmgraph.passes.cluster import resident_bytes
    assert parts["buffers"] == resident_bytes(runs["full"], params.precision, target, 1, 0)
    assert 0 < parts["kept"] <= kept["full"]
    seg = next(s for s in runs["full"].segments if s.name == parts["segment"])
    assert parts["working"] == seg.working_bytes > 0


@pytest.mark.parametrize("streaming", [False, True], ids=["in-memory", "weight-streaming"])
def test_runtime_trains_the_rewritten_program_like_the_plain_one(tmp_path, streaming):
    params = load_params(TINY2)
    target = load_target("cs2") if streaming else None     # the streaming executor runs segments
    plain = compile_step(params, target=target, remat="none")[-1].program
    full = compile_step(params, target=target, remat="full")[-1].program
    a = Runner(params, tmp_path / "a", train=plain, weight_streaming=streaming, weights=initial_weights(params))
    b = Runner(params, tmp_path / "b", train=full, weight_streaming=streaming, weights=initial_weights(params))
    from tests.test_runtime import batches

    for step in range(2):
        ra, rb = a.train_step(batches(params, step)), b.train_step(batches(params, step))
        assert ra.loss == rb.loss
    for name in a.trainable:
        assert torch.equal(a.weights[name], b.weights[name]), name


def _with(tmp_path, path, **model):
    raw = yaml.safe_load(path.read_text())
    raw["model"].update(model)
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(raw))
    return out


def test_params_key_and_cli_flag(tmp_path, capsys):
    params = _with(tmp_path, TINY2, activation_checkpointing="selective")
    assert main(["compile", "--params", str(params), "--model_dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "activation recomputation selective: 2 layers selective" in out
    report = json.loads((tmp_path / "a" / "compile" / "report.json").read_text())
    assert report["remat"]["policy"] == "selective" and report["remat"]["layers"][0]["recomputed"]
    assert main(["compile", "--params", str(params), "--model_dir", str(tmp_path / "b"), "--remat", "none"]) == 0
    assert "activation recomputation none: 2 layers none" in capsys.readouterr().out
    bad = _with(tmp_path, TINY2, activation_checkpointing="everything")
    assert main(["compile", "--params", str(bad), "--model_dir", str(tmp_path / "c")]) == 2
    assert "model.activation_checkpointing" in capsys.readouterr().err


def test_auto_recomputes_only_when_it_must(tmp_path):
    params = load_params(TINY2)
    roomy = compile_step(params, target=load_target("cs2"))[-1].program
    assert roomy.remat.policy == "auto" and all(x.policy == "none" for x in roomy.remat.layers)
    assert not roomy.remat.clones and roomy.schedule.recompute_flops == 0
    none_peak = roomy.schedule.peak_memory_bytes
    full = compile_step(params, target=load_target("cs2"), remat="full")[-1].program
    tight = load_target(str(small_memory_target(tmp_path, (none_peak + full.schedule.peak_memory_bytes) // 2)))
    auto = compile_step(params, target=tight)[-1].program
    assert auto.schedule.fits and auto.remat.clones
    assert auto.schedule.recompute_flops <= full.schedule.recompute_flops


def test_no_policy_fits_names_the_smallest_peak_and_its_parts(tmp_path, capsys):
    target = small_memory_target(tmp_path, 4e6, mechanisms=False)
    assert main(["compile", "--params", str(TINY2), "--model_dir", str(tmp_path), "--target", str(target)]) == 2
    err = capsys.readouterr().err
    assert ("8 does not fit on cs2: not with any recompute policy nor the target's other mechanisms (recompute): "
            "the smallest peak any policy reaches (full) is") in err
    for part in ("kept activations", "one layer's working set", "attention scores", "weight buffers",
                 "cs2's memory, from its sources: Cerebras CS-2 product page"):
        assert part in err


def test_micro_batch_auto_picks_micro_batch_and_policy(tmp_path, capsys):
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"]["micro_batch_size"] = "auto"
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump(raw))
    none = compile_step(load_params(TINY2), target=load_target("cs2"), micro_batch_size=8, remat="none")
    target = small_memory_target(tmp_path, none[-1].program.schedule.peak_memory_bytes * 0.8)
    assert main(["compile", "--params", str(params), "--model_dir", str(tmp_path), "--target", str(target)]) == 0
    out = capsys.readouterr().out
    line = out.split("micro_batch_size auto: ")[1].splitlines()[0]
    chosen, policy = int(line.split()[0]), line.split()[3]
    report = json.loads((tmp_path / "compile" / "report.json").read_text())["target"]
    assert report["fits"] and report["micro_batch_size"] == chosen and policy == "auto"
    assert "samples/s" in line


@pytest.mark.slow
def test_model_zoo_7b_phase2_on_cs2_at_its_shipped_micro_batch(tmp_path, capsys):
    """Legalized for the wafer, attention is bmm/softmax as cstorch emits it: its scores
    (24 x 32 x 2048 x 2048 in bf16, 6.4 GB a tensor) are values of the program, and the shipped
    micro-batch 24 no longer fits the simulated CS-2 with any recompute policy (it did with fused
    attention); compile says so and names the largest that fits, which does (docs/compiler.md)."""
    assert main(["compile", "--params", str(ZOO_7B), "--model_dir", str(tmp_path), "--target", "cs2"]) == 2
    err = capsys.readouterr().err
    found = re.search(r"24 does not fit on cs2: not with any recompute policy: .*attention scores 6.44 GB.* "
                      r"the largest micro_batch_size that fits is (\d+)", err)
    assert found, err
    raw = yaml.safe_load(ZOO_7B.read_text())
    section = raw["train_input"] if "train_input" in raw else raw["trainer"]["fit"]["train_dataloader"]
    section["micro_batch_size"] = int(found.group(1))
    smaller = tmp_path / "smaller.yaml"
    smaller.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["compile", "--params", str(smaller), "--model_dir", str(tmp_path / "s"), "--target", "cs2"]) == 0
    report = json.loads((tmp_path / "s" / "compile" / "report.json").read_text())
    assert report["target"]["fits"] and report["target"]["micro_batch_size"] == int(found.group(1))
    assert any(x["policy"] != "none" for x in report["remat"]["layers"])


from tests.test_runtime import shards  # noqa: E402,F401 - the synthetic data set fixture


def test_cli_run_with_remat_trains_like_without(shards, tmp_path, capsys):  # noqa: F811
    losses = {}
    for policy in ("none", "full"):
        md = tmp_path / policy
        assert main(["run", "--mode", "train", "--params", str(shards), "--model_dir", str(md),
                     "--max_steps", "2", "--remat", policy]) == 0
        records = [json.loads(line) for line in (md / "metrics.jsonl").read_text().splitlines()]
        losses[policy] = [r["loss"] for r in records if "loss" in r]
        report = json.loads((md / "compile" / "report.json").read_text())
        assert report["remat"]["policy"] == policy
    capsys.readouterr()
    assert losses["none"] and losses["none"] == losses["full"]
