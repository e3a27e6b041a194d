"""The runtime: the lowered program trains exactly like eager PyTorch; checkpoints resume
bit for bit; faults stop cleanly."""

from __future__ import annotations

import pytest
import torch

from mmgraph.compiler.pipeline import compile_step
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.models import build_model, initial_weights, random_batch
from mmgraph.runtime import checkpoint
from mmgraph.runtime.optim import Optimizer, learning_rate
from mmgraph.runtime.runner import Runner
from tests.conftest import ROOT, TINY1, TINY2

STEPS, MICRO = 20, 2


def batches(params, step):
    layout = params.layout()
    return [random_batch(layout, 8, seed=1000 * step + m) for m in range(MICRO)]


def eager_losses(params, steps, autocast=None):
    """Eager PyTorch on each step's whole batch at once (the micro-batches joined)."""
    model, _ = build_model(params, seed=params.runconfig.seed)
    named = dict(model.named_parameters())
    opt = Optimizer(params.optimizer, {k: p.data for k, p in named.items()})
    losses = []
    trainable = [k for k, p in named.items() if p.requires_grad]
    for step in range(steps):
        parts = batches(params, step)
        if autocast is None:
            parts = [{k: torch.cat([b[k] for b in parts]) for k in parts[0]}]
        # reduced precision: micro-batch by micro-batch (rounding follows the batch split),
        # each weighted by its share of the batch's supervised tokens
        tokens = [float(b["loss_mask"].sum()) for b in parts]
        total, loss = {}, 0.0
        for b, n in zip(parts, tokens):
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                part = model(**b)
            grads = torch.autograd.grad(part, [named[k] for k in trainable])
            for k, g in zip(trainable, grads):
                total[k] = total[k] + g * (n / sum(tokens)) if k in total else g * (n / sum(tokens))
            loss += float(part.detach()) * n / sum(tokens)
        opt.clip(total)
        opt.step(total)
        losses.append(loss)
    return losses, {k: p.detach().clone() for k, p in named.items()}


@pytest.mark.parametrize("path", [TINY1, TINY2])
def test_lowered_program_trains_like_eager_pytorch(path, tmp_path):
    params = load_params(path)
    program = compile_step(params)[-1].program
    runner = Runner(params, tmp_path, train=program, weights=initial_weights(params))
    initial = {k: v.clone() for k, v in runner.weights.items()}
    ours = [runner.train_step(batches(params, step)).loss for step in range(STEPS)]
    ref, ref_weights = eager_losses(params, STEPS)
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, ref)
    frozen = [s.name for s in program.inputs if s.kind.value == "param" and not s.trainable]
    assert frozen
    for name in frozen:
        assert torch.equal(runner.weights[name], initial[name])        # frozen: bit-identical
    for name in runner.trainable:
        torch.testing.assert_close(runner.weights[name], ref_weights[name], rtol=1e-4, atol=1e-6)


def test_bf16_mixed_precision_is_compiled_in_and_trains_like_eager_autocast(tmp_path):
    import yaml
    raw = yaml.safe_load(TINY2.read_text())
    raw["model"].update(mixed_precision=True, fp16_type="bfloat16")
    path = tmp_path / "bf16.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    program = compile_step(params, verify=True)[-1].program          # against eager under autocast
    assert program.precision == "bf16"
    assert any(n.meta["val"].dtype == torch.bfloat16 for n in program.ops() if "mm" in str(n.target))
    runner = Runner(params, tmp_path / "md", train=program, weights=initial_weights(params))
    ours = [runner.train_step(batches(params, step)).loss for step in range(5)]
    ref, ref_weights = eager_losses(params, 5, autocast=torch.bfloat16)
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-5 * abs(b), (ours, ref)
    assert all(runner.weights[n].dtype == torch.float32 for n in runner.trainable)   # fp32 master weights
    for name in runner.trainable:
        torch.testing.assert_close(runner.weights[name], ref_weights[name], rtol=1e-4, atol=1e-6)


def test_resume_is_bit_exact(tmp_path):
    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    straight = Runner(params, tmp_path / "a", train=program, weights=initial_weights(params))
    for step in range(6):
        straight.train_step(batches(params, step))
    first = Runner(params, tmp_path / "b", train=program, weights=initial_weights(params))
    for step in range(3):
        first.train_step(batches(params, step))
    first.save()
    del first                                          # "killed"
    second = Runner(params, tmp_path / "b", train=program, weights=initial_weights(params))
    assert second.resume() is not None and second.step == 3
    for step in range(3, 6):
        second.train_step(batches(params, step))
    for k in straight.weights:
        assert torch.equal(straight.weights[k], second.weights[k]), k


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    weights = {"w": torch.ones(3)}
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, step, weights, {"step_count": torch.tensor(step)}, {"step": step}, max_keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000002", "ckpt-000003"]
    # A write killed midway leaves a .tmp folder (or one without state.json): never the latest.
    broken = checkpoint.checkpoint_dir(tmp_path) / "ckpt-000004.tmp"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    half = checkpoint.checkpoint_dir(tmp_path) / "ckpt-000005"
    half.mkdir()
    assert checkpoint.latest(tmp_path).name == "ckpt-000003"


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tmp_path):
    params = load_params(TINY2)
    runner = Runner(params, tmp_path, train=compile_step(params)[-1].program, weights=initial_weights(params))
    runner.train_step(batches(params, 0))
    runner.save()
    for name in runner.trainable:
        if "lm_head" in name:
            runner.weights[name].fill_(float("nan"))
    with pytest.raises(UserError) as info:
        runner.train_step(batches(params, 1))
    assert str(info.value).startswith("step 2: loss is nan; training stopped (last good checkpoint: ")
    assert "ckpt-000001" in str(info.value)


def test_schedules_follow_the_model_zoo():
    params = load_params(TINY1)
    lr = [learning_rate(params.optimizer, s) for s in (0, 5, 10, 105, 200, 400)]
    assert lr[0] == 0.0 and lr[1] == pytest.approx(0.0015) and lr[2] == pytest.approx(0.003)
    assert lr[3] == pytest.approx(0.0003 + (0.003 - 0.0003) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 95 / 190)).item()))
    assert lr[4] == pytest.approx(0.0003) and lr[5] == pytest.approx(0.0003)


def test_answer_accuracy_counts_whole_replies():
    from mmgraph.runtime.runner import answer_hits
    mask = torch.tensor([[0, 1, 1, 0, 1, 1, 1, 0]])
    hit = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0]])   # reply 1: token right, </s> wrong; reply 2: token wrong
    assert answer_hits(mask, hit) == (2, 1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import yaml

    from mmgraph.data.preprocess import Layout, preprocess
    from mmgraph.data.synth import synth
    root = tmp_path_factory.mktemp("run")
    synth(root, num_train=48, num_eval=12, seed=3)
    lay = load_params(TINY2).layout()
    for split in ("train", "eval"):
        preprocess(str(root / f"phase2_{split}.json"), str(root / "images"), str(root / "tokenizer"),
                   str(root / split), 2, Layout(lay.max_sequence_length, lay.num_patches, lay.max_num_img),
                   progress=False)
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(root / "train"), img_data_dir=str(root / "images"))
    raw["eval_input"].update(data_dir=str(root / "eval"), img_data_dir=str(root / "images"))
    raw["runconfig"].update(checkpoint_steps=4, log_steps=2, eval_steps=4, max_checkpoints=2)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_run_train_and_eval_then_resume(shards, tmp_path, capsys):
    import json

    from mmgraph.cli import main
    md = tmp_path / "md"
    assert main(["run", "CPU", "--mode", "train_and_eval", "--params", str(shards), "--model_dir", str(md),
                 "--max_steps", "6"]) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "answer accuracy" in out
    assert [p.name for p in checkpoint.list_checkpoints(md)] == ["ckpt-000004", "ckpt-000006"]
    records = [json.loads(line) for line in (md / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert any("answer_accuracy" in r for r in records)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(md / "events"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6]
    assert {"eval/answer_accuracy", "eval/perplexity", "train/samples_per_s"} <= set(events.Tags()["scalars"])
    assert (md / "compile" / "report.html").is_file()
    assert main(["run", "--mode", "train", "--params", str(shards), "--model_dir", str(md), "--max_steps", "8"]) == 0
    assert "resumed from" in capsys.readouterr().out and checkpoint.latest(md).name == "ckpt-000008"


def test_missing_data_is_reported_before_compute(tmp_path, capsys):
    import yaml

    from mmgraph.cli import main
    raw = yaml.safe_load(TINY2.read_text())
    raw["train_input"].update(data_dir=str(tmp_path / "nowhere"), img_data_dir=str(tmp_path))
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--params", str(path), "--model_dir", str(tmp_path / "md")]) == 2
    assert capsys.readouterr().err == (f"mmgraph: error: {tmp_path / 'nowhere'}: data_dir does not exist "
                                       "(run mmgraph preprocess)\n")
    raw["train_input"]["img_data_dir"] = str(tmp_path / "no_images")
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--params", str(path), "--model_dir", str(tmp_path / "md")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mmgraph: error: {path}: train_input.img_data_dir: {tmp_path / 'no_images'} does not exist",
        f"mmgraph: error: {tmp_path / 'nowhere'}: data_dir does not exist (run mmgraph preprocess)"]
    assert not (tmp_path / "md").exists()


def test_a_crash_during_checkpoint_write_loses_nothing(tmp_path, monkeypatch):
    weights = {"w": torch.ones(3)}
    checkpoint.save(tmp_path, 1, weights, {"step_count": torch.tensor(1)}, {"step": 1}, max_keep=1)
    import mmgraph.runtime.checkpoint as ck
    real = ck.save_file
    calls = {"n": 0}

    def dying(tensors, path):
        calls["n"] += 1
        if calls["n"] == 2:                       # the process dies while writing optimizer state
            raise KeyboardInterrupt
        return real(tensors, path)
    monkeypatch.setattr(ck, "save_file", dying)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, {"w": torch.zeros(3)}, {"step_count": torch.tensor(2)}, {"step": 2}, max_keep=1)
    last = checkpoint.latest(tmp_path)
    assert last.name == "ckpt-000001"
    assert torch.equal(checkpoint.load_weights(last)["w"], torch.ones(3))


def test_compiled_executor_trains_like_the_reference(tmp_path):
    """torch.compile of the whole step: same training within float tolerance (Inductor
    reorders reductions, so not bit for bit); frozen weights still untouched."""
    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    ref = Runner(params, tmp_path / "r", train=program, weights=initial_weights(params))
    comp = Runner(params, tmp_path / "c", train=program, executor="compiled", weights=initial_weights(params))
    initial = {k: v.clone() for k, v in comp.weights.items()}
    for step in range(4):
        a, b = ref.train_step(batches(params, step)), comp.train_step(batches(params, step))
        assert abs(a.loss - b.loss) <= 1e-4 * abs(a.loss), (step, a.loss, b.loss)
    for name in comp.trainable:
        torch.testing.assert_close(comp.weights[name], ref.weights[name], rtol=1e-3, atol=1e-5)
    for spec in program.inputs:
        if spec.kind.value == "param" and not spec.trainable:
            assert torch.equal(comp.weights[spec.name], initial[spec.name])


def test_the_compiled_executor_as_one_region_matches_the_reference():
    """``regions=False``: the whole eval step compiled as one region by Inductor; the same
    outputs as the reference executor within float tolerance, twice (the second call runs the
    compiled code as it is)."""
    from mmgraph.runtime.executors import CompiledExecutor, ReferenceExecutor
    from mmgraph.runtime.regions import Site

    params = load_params(TINY2, "eval")
    program = compile_step(params, "eval")[-1].program
    weights = initial_weights(params)
    whole = CompiledExecutor(program, params, torch.device("cpu"), regions=False)
    ref = ReferenceExecutor(program, params, torch.device("cpu"))
    assert isinstance(whole.fn, Site)
    for seed in (5, 6):
        batch = random_batch(params.layout("eval"), 8, seed=seed)
        inputs = [weights[s.name] if s.kind.value == "param" else batch[s.name] for s in program.inputs]
        for got, want in zip(whole(inputs), ref(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(whole.fn.region.compiled) == 1


def test_onnxruntime_eval_executor_matches_the_reference(tmp_path):
    params = load_params(TINY2, "eval")
    program = compile_step(params, "eval")[-1].program
    batch = [random_batch(params.layout("eval"), 8, seed=s) for s in (5, 6)]
    ref = Runner(params, tmp_path, eval_program=program, weights=initial_weights(params)).evaluate(batch)
    ort = Runner(params, tmp_path, eval_program=program, eval_executor="onnxruntime", weights=initial_weights(params)).evaluate(batch)
    assert ort["answers"] == ref["answers"] and ort["eval_tokens"] == ref["eval_tokens"]
    assert abs(ort["eval_loss"] - ref["eval_loss"]) <= 1e-5 * ref["eval_loss"]
    assert ort["token_accuracy"] == pytest.approx(ref["token_accuracy"], abs=1e-6)


def test_executors_say_what_they_do_not_support(tmp_path):
    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    with pytest.raises(UserError, match="onnxruntime runs eval programs only, not train"):
        Runner(params, tmp_path, train=program, executor="onnxruntime", weights=initial_weights(params))
    with pytest.raises(UserError, match="unknown executor 'fast'; one of reference, compiled, onnxruntime"):
        Runner(params, tmp_path, train=program, executor="fast", weights=initial_weights(params))


def test_runconfig_checkpoint_path_starts_from_other_weights(shards, tmp_path, capsys):
    import yaml

    from mmgraph.cli import main
    first = tmp_path / "p1"
    assert main(["run", "--params", str(shards), "--model_dir", str(first), "--max_steps", "2"]) == 0
    raw = yaml.safe_load(shards.read_text())
    raw["runconfig"].update(checkpoint_path=str(first), load_checkpoint_states="model")
    path = tmp_path / "p2.yaml"
    path.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["run", "--params", str(path), "--model_dir", str(tmp_path / "p2"), "--max_steps", "1"]) == 0
    assert f"initial weights from {first}" in capsys.readouterr().out
    raw["runconfig"]["load_checkpoint_states"] = "model,optimizer"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--params", str(path), "--model_dir", str(tmp_path / "p3"), "--max_steps", "1"]) == 2
    assert "runconfig.load_checkpoint_states: 'model,optimizer': initial checkpoints load the model only" in \
        capsys.readouterr().err


def _fp16_params(tmp_path, **optimizer):
    import yaml
    raw = yaml.safe_load(TINY2.read_text())
    raw["model"].update(mixed_precision=True, fp16_type="float16")
    raw["optimizer"].update(loss_scaling_factor="dynamic", **optimizer)
    path = tmp_path / "fp16.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def test_fp16_trains_with_dynamic_loss_scaling_like_eager_autocast(tmp_path):
    params = _fp16_params(tmp_path, initial_loss_scale=1024.0)
    program = compile_step(params, verify=True)[-1].program
    assert program.precision == "fp16" and program.inputs[-1].name == "loss_scale"
    runner = Runner(params, tmp_path / "md", train=program, weights=initial_weights(params))
    ours = [runner.train_step(batches(params, step)).loss for step in range(4)]
    # eager: autocast(float16), loss * scale backward, unscale, same optimizer
    model, _ = build_model(params, seed=params.runconfig.seed)
    named = dict(model.named_parameters())
    trainable = [k for k, p in named.items() if p.requires_grad]
    opt = Optimizer(params.optimizer, {k: p.data for k, p in named.items()})
    ref = []
    for step in range(4):
        total, losses = {}, []
        for batch in batches(params, step):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = model(**batch)
            grads = torch.autograd.grad(loss * 1024.0, [named[k] for k in trainable])
            for k, g in zip(trainable, grads):
                total[k] = total[k] + g if k in total else g.clone()
            losses.append(loss.detach())
        for g in total.values():
            g.div_(MICRO * 1024.0)
        opt.clip(total)
        opt.step(total)
        ref.append(float(torch.stack(losses).mean()))
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-3 * abs(b), (ours, ref)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path):
    params = _fp16_params(tmp_path, initial_loss_scale=2.0 ** 40, steps_per_increase=2)
    program = compile_step(params)[-1].program
    runner = Runner(params, tmp_path / "md", train=program, weights=initial_weights(params))
    before = {k: v.clone() for k, v in runner.weights.items()}
    first = runner.train_step(batches(params, 0))
    assert first.grad_norm == float("inf") and runner.scaler.scale == 2.0 ** 39
    assert all(torch.equal(runner.weights[k], before[k]) for k in before)      # skipped: nothing moved
    for step in range(1, 40):
        runner.train_step(batches(params, step))
    assert runner.scaler.scale < 2.0 ** 39 and runner.optimizer.step_count > 0
    assert any(not torch.equal(runner.weights[k], before[k]) for k in runner.trainable)


def test_programs_run_on_other_devices():
    """Programs are traced on the CPU's fake tensors; the executor places the ops that make
    tensors on the run device. The meta device stands in for CUDA here."""
    from mmgraph.runtime.executors import ReferenceExecutor
    params = load_params(TINY2)
    program = compile_step(params)[-1].program
    assert any(n.kwargs.get("device") == torch.device("cpu") for n in program.gm.graph.nodes)
    meta = torch.device("meta")
    batch = batches(params, 0)[0]
    inputs = [torch.empty(s.shape, dtype=s.dtype, device=meta) if s.kind.value == "param" else batch[s.name].to(meta)
              for s in program.inputs]
    outs = ReferenceExecutor(program, params, meta)(inputs)
    assert all(o.device == meta for o in outs) and outs[0].shape == ()


def test_weight_streaming_runs_segment_by_segment_like_the_reference(tmp_path):
    from mmgraph.core.target import load_target
    from mmgraph.runtime.executors import StreamingExecutor
    params = load_params(TINY2)
    program = compile_step(params, target=load_target("cs2"))[-1].program
    plain = Runner(params, tmp_path / "a", train=program, weights=initial_weights(params))
    streamed = Runner(params, tmp_path / "b", train=program, weight_streaming=True, weights=initial_weights(params))
    assert isinstance(streamed.train_exec, StreamingExecutor)
    assert sum(1 for n in streamed.train_exec.split.graph.nodes if n.op == "call_module") == len(program.segments)
    for step in range(3):
        assert plain.train_step(batches(params, step)).loss == streamed.train_step(batches(params, step)).loss
    assert all(torch.equal(plain.weights[k], streamed.weights[k]) for k in plain.weights)    # bit for bit
    with pytest.raises(UserError, match="the program has no segments"):
        Runner(params, tmp_path / "c", train=compile_step(params)[-1].program, weight_streaming=True, weights=initial_weights(params))


def test_cli_run_with_weight_streaming(shards, tmp_path, capsys):
    from mmgraph.cli import main
    assert main(["run", "--mode", "train_and_eval", "--weight_streaming", "--params", str(shards),
                 "--model_dir", str(tmp_path / "md"), "--max_steps", "2"]) == 0
    assert "answer accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("config", ["params_mm_llava_tiny_phase2.yaml", "params_cogvlm_tiny.yaml",
                                    "params_mm1_tiny.yaml", "params_two_encoders_tiny.yaml"])
def test_onnxruntime_runs_the_programs_own_export(config, monkeypatch):
    """The executor exports the eval Program's graph (no nn.Module is built) and matches it."""
    import mmgraph.models.build as build
    from mmgraph.runtime.executors import make_executor

    params = load_params(ROOT / "configs" / config, "eval")
    program = compile_step(params, "eval")[-1].program
    weights = initial_weights(params)
    size = program.batch_size
    batch = random_batch(params.layout("eval"), size, seed=4)
    inputs = [weights[s.name] if s.kind.value == "param" else batch[s.name] for s in program.inputs]
    import mmgraph.models as models_pkg
    # every name the model builder is reachable by (the package re-exports it)
    for owner in (build, models_pkg):
        monkeypatch.setattr(owner, "build_model", lambda *a, **k: pytest.fail("the executor built the model"))
    ort = make_executor("onnxruntime", program, params, torch.device("cpu"))
    got, want = ort(inputs), program.gm(*inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-4)
