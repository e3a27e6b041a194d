"""Training continues as if never stopped (issue 14 item 6), absurd sizes stop before any
allocation (item 8), and a batch that is not a multiple of the micro-batch trains like the
whole batch at once (issue 15 item 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mmgraph.models import initial_weights
from mmgraph.core.config import load_params
from mmgraph.models import build_model, random_batch
from mmgraph.compiler.pipeline import compile_step
from mmgraph.runtime import checkpoint
from mmgraph.runtime.runner import Runner
from tests.conftest import BIG1, ROOT, TINY2
from tests.test_runtime import shards  # noqa: F401 - the module's data fixture

RANDOM_TRANSFORMS = [
    {"name": "expand_to_square", "background_color": [122, 116, 104]},
    {"name": "resize", "size": 40, "interpolation": "bicubic"},
    {"name": "random_crop", "size": 32},
    {"name": "random_horizontal_flip", "p": 0.5},
    {"name": "to_tensor"},
]


def _write(tmp_path, shards_path, name, train=None, runconfig=None, model=None):  # noqa: F811
    raw = yaml.safe_load(shards_path.read_text())
    raw["train_input"].update(train or {})
    raw["runconfig"].update(runconfig or {})
    raw["model"].update(model or {})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


# -- issue 14 item 6: resume bit-exact with random transforms, data position, metrics ---------

def test_random_transforms_are_a_function_of_seed_epoch_and_sample(shards, tmp_path):  # noqa: F811
    from mmgraph.runtime.data import make_loader
    params = load_params(_write(tmp_path, shards, "p.yaml", {"transforms": RANDOM_TRANSFORMS}))
    ds, again = make_loader(params, "train")[0].dataset, make_loader(params, "train")[0].dataset
    n = len(ds)
    first = [ds[i]["image_data"] for i in range(n)]
    assert all(torch.equal(a, again[i]["image_data"]) for i, a in enumerate(first))   # another instance
    assert all(torch.equal(first[i], ds[i]["image_data"]) for i in reversed(range(n)))
    next_epoch = [ds[n + i]["image_data"] for i in range(n)]
    assert any(not torch.equal(a, b) for a, b in zip(first, next_epoch))     # a new draw each epoch


def test_worker_processes_draw_the_same_transforms(shards, tmp_path):  # noqa: F811
    from mmgraph.runtime.data import make_loader
    params = load_params(_write(tmp_path, shards, "p.yaml", {"transforms": RANDOM_TRANSFORMS}))
    inline = [b["image_data"] for b in make_loader(params, "train", num_workers=0)[0]]
    workers = [b["image_data"] for b in make_loader(params, "train", num_workers=2)[0]]
    assert len(inline) == len(workers) and all(torch.equal(a, b) for a, b in zip(inline, workers))


def test_resume_with_random_transforms_is_bit_exact_and_metrics_do_not_repeat(shards, tmp_path):  # noqa: F811
    from mmgraph.cli import main
    params = _write(tmp_path, shards, "p.yaml", {"transforms": RANDOM_TRANSFORMS},
                    {"checkpoint_steps": 2, "log_steps": 1, "max_checkpoints": 3})
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert main(["run", "--params", str(params), "--model_dir", str(straight), "--max_steps", "4"]) == 0
    assert main(["run", "--params", str(params), "--model_dir", str(stopped), "--max_steps", "4"]) == 0
    # killed after logging steps 3 and 4 but before checkpoint 4 was written:
    checkpoint.latest(stopped).rename(checkpoint.checkpoint_dir(stopped) / "gone")
    assert main(["run", "--params", str(params), "--model_dir", str(stopped), "--max_steps", "4"]) == 0
    a, b = checkpoint.load_weights(straight), checkpoint.load_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (stopped / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_resume_uses_the_data_position_the_checkpoint_saved(shards, tmp_path, monkeypatch):  # noqa: F811
    import mmgraph.runtime.train as run_cmd
    from mmgraph.cli import main
    params = _write(tmp_path, shards, "p.yaml", runconfig={"checkpoint_steps": 1})
    md = tmp_path / "md"
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "1"]) == 0
    state_file = checkpoint.latest(md) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["sampler"] == {"batches_done": 1, "samples_done": 8}
    state["sampler"] = {"batches_done": 5}                # e.g. written by a run with another batch split
    state_file.write_text(json.dumps(state))
    seen = []
    real = run_cmd._position
    monkeypatch.setattr(run_cmd, "_position", lambda s, per_epoch, done: seen.append(done) or real(s, per_epoch, done))
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "2"]) == 0
    assert seen == [5]
    assert json.loads((checkpoint.latest(md) / "state.json").read_text())["sampler"]["batches_done"] == 6


# -- issue 14 item 8: absurd sizes stop before allocating -------------------------------------

# Below the params' static limit (1e7 samples a step), so the runtime's memory check is what refuses.
@pytest.mark.parametrize("micro, key", [(8, "batch_size"), (5_000_000, "micro_batch_size")])
def test_an_absurd_batch_is_refused_before_anything_is_allocated(shards, tmp_path, micro, key):  # noqa: F811
    params = _write(tmp_path, shards, "p.yaml", {"batch_size": 5_000_000, "micro_batch_size": micro})
    done = subprocess.run([sys.executable, "-m", "mmgraph", "run", "--params", str(params), "--model_dir",
                           str(tmp_path / "md"), "--max_steps", "1"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"mmgraph: error: {params}: train_input.{key}: a step needs at least ")
    assert "GB of cpu memory are available" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "md" / "compile").exists()


# -- issue 15 item 2: batch_size not a multiple of micro_batch_size -----------------------------

def test_the_model_zoo_7b_phase_1_split_is_accepted(tmp_path):
    raw = yaml.safe_load(BIG1.read_text())
    raw["train_input"].update(batch_size=220, micro_batch_size=24)     # as the Model Zoo ships it
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    assert (params.train_input.batch_size, params.train_input.micro_batch_size) == (220, 24)


@pytest.mark.parametrize("scaling", ["num_tokens", "batch_size"])
def test_an_uneven_last_micro_batch_trains_like_the_whole_batch(tmp_path, scaling):
    from mmgraph.runtime.train import step_batches as _step_batches
    raw = yaml.safe_load(TINY2.read_text())
    # loss_weight scales batch_size loss scaling only (num_tokens requires 1.0, as in the Model Zoo)
    raw["model"].update(loss_scaling=scaling, loss_weight=0.25 if scaling == "batch_size" else 1.0)
    raw["train_input"].update(batch_size=20)                          # micro-batches 8 + 8 + 4 (and 4 padded)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    params = load_params(path)
    whole = random_batch(params.layout(), 20, seed=5)
    loader = iter([{k: v[i:i + 4] for k, v in whole.items()} for i in range(0, 20, 4)])   # loader batches of gcd 4
    micro = _step_batches(loader, 5, 8)
    assert [b["rows"] for b in micro] == [8, 8, 4] and micro[-1]["loss_mask"][4:].sum() == 0
    runner = Runner(params, tmp_path / "md", train=compile_step(params)[-1].program, weights=initial_weights(params))
    result = runner.train_step(micro)
    assert result.samples == 20

    model, _ = build_model(params, seed=params.runconfig.seed)       # eager PyTorch, the whole batch at once
    named = dict(model.named_parameters())
    loss = model(**whole)
    trainable = [k for k, p in named.items() if p.requires_grad]
    grads = dict(zip(trainable, torch.autograd.grad(loss, [named[k] for k in trainable])))
    from mmgraph.runtime.optim import Optimizer
    opt = Optimizer(params.optimizer, {k: p.data for k, p in named.items()})
    opt.clip(grads)
    opt.step(grads)
    assert result.loss == pytest.approx(float(loss.detach()), rel=1e-5)
    for name in runner.trainable:
        torch.testing.assert_close(runner.weights[name], named[name].detach(), rtol=1e-4, atol=1e-6)


def test_cli_trains_an_uneven_split(shards, tmp_path, capsys):  # noqa: F811
    from mmgraph.cli import main
    params = _write(tmp_path, shards, "p.yaml", {"batch_size": 12, "micro_batch_size": 8},
                    {"checkpoint_steps": 1})
    md = tmp_path / "md"
    assert main(["run", "--params", str(params), "--model_dir", str(md), "--max_steps", "2"]) == 0
    state = json.loads((checkpoint.latest(md) / "state.json").read_text())
    assert state["step"] == 2 and state["sampler"]["batches_done"] == 6     # loader batches of 4, 3 a step
