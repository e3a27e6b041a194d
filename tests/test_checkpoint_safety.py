"""Nothing lost in training (issue 14): divergence never writes a non-finite checkpoint nor
rotates the good one away; resume checks every file and falls back to the previous whole
checkpoint; a full disk is a named error; checkpoints are fsynced before and after the rename."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mmgraph.models import initial_weights
from mmgraph.core.config import load_params
from mmgraph.core.errors import UserError
from mmgraph.compiler.pipeline import compile_step
from mmgraph.runtime import checkpoint
from mmgraph.runtime.runner import Runner
from tests.conftest import ROOT, TINY2
from tests.test_runtime import batches, shards  # noqa: F401 - the module's data fixture


def _params(tmp_path, name="p.yaml", **sections):
    raw = yaml.safe_load(TINY2.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


@pytest.fixture(scope="module")
def program():
    return compile_step(load_params(TINY2))[-1].program


def _trained(tmp_path, program, steps=(1, 2)):
    """A model_dir with a checkpoint after each of ``steps``."""
    params = load_params(TINY2)
    runner = Runner(params, tmp_path, train=program, weights=initial_weights(params))
    for step in range(max(steps)):
        runner.train_step(batches(params, step))
        if runner.step in steps:
            runner.save({"batches_done": runner.step})
    return runner


# -- 1. divergence -------------------------------------------------------------------------

def test_a_diverging_update_stops_before_any_non_finite_checkpoint(tmp_path, program):
    good = _trained(tmp_path, program, steps=(1,))
    params = _params(tmp_path, optimizer={"learning_rate": 1.0e39})
    runner = Runner(params, tmp_path, train=program, weights=initial_weights(params))
    assert runner.resume().name == "ckpt-000001"
    with pytest.raises(UserError) as info:                 # before: step 2 "succeeded" with inf weights
        runner.train_step(batches(params, 1))
    assert str(info.value).startswith("step 2: the update made ")
    assert str(info.value).endswith(f"(last good checkpoint: {checkpoint.checkpoint_dir(tmp_path) / 'ckpt-000001'})")
    with pytest.raises(UserError, match=r"^step 1: 25 weights are not finite \(e.g. .*\); no checkpoint written$"):
        runner.save()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000001"]
    kept = checkpoint.load_weights(tmp_path)
    assert all(torch.equal(kept[k], good.weights[k]) for k in kept)


def test_non_finite_gradients_stop_the_step_before_the_update(tmp_path, program):
    params = load_params(TINY2)
    runner = Runner(params, tmp_path, train=program, weights=initial_weights(params))
    before = {k: v.clone() for k, v in runner.weights.items()}
    real = runner.micro_step

    def poisoned(batch, *args, **kwargs):
        loss, grads = real(batch, *args, **kwargs)
        next(iter(grads.values())).fill_(float("inf"))
        return loss, grads
    runner.micro_step = poisoned
    with pytest.raises(UserError, match=r"^step 1: gradients are not finite \(global norm inf\); training stopped \(last good checkpoint: none\)$"):
        runner.train_step(batches(params, 0))
    assert all(torch.equal(runner.weights[k], before[k]) for k in before)


def test_cli_divergence_with_one_checkpoint_kept_keeps_the_good_one(shards, tmp_path, capsys):  # noqa: F811
    from mmgraph.cli import main
    md = tmp_path / "md"
    raw = yaml.safe_load(shards.read_text())
    raw["runconfig"].update(checkpoint_steps=1, max_checkpoints=1)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw))
    assert main(["run", "--params", str(good), "--model_dir", str(md), "--max_steps", "2"]) == 0
    raw["optimizer"]["learning_rate"] = 1.0e39                      # the reproduction
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    assert main(["run", "--params", str(bad), "--model_dir", str(md), "--max_steps", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmgraph: error: step 3: the update made ")
    assert err.rstrip().endswith(f"(last good checkpoint: {md / 'checkpoints' / 'ckpt-000002'})")
    assert [p.name for p in checkpoint.list_checkpoints(md)] == ["ckpt-000002"]
    assert not checkpoint.non_finite(checkpoint.load_weights(md))
    fresh = tmp_path / "fresh"
    assert main(["run", "--params", str(bad), "--model_dir", str(fresh), "--max_steps", "4"]) == 2
    assert "step 1: " in capsys.readouterr().err and not checkpoint.list_checkpoints(fresh)


# -- 2. resume checks every file, falls back to the previous whole checkpoint ----------------

def _shrink(path: Path) -> None:
    """The (1, d) tensor in place of a (n, d) one (the issue's position embeddings)."""
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.dim() == 2 and v.shape[0] > 1)
    weights[name] = weights[name][:1].clone()
    save_file(weights, str(path))


def _drop_key(path: Path) -> None:
    weights = load_file(str(path))
    weights.pop(sorted(weights)[0])
    save_file(weights, str(path))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGE = {
    "shape": ("model.safetensors", _shrink, "does not match the program's"),
    "missing key": ("model.safetensors", _drop_key, "missing"),
    "truncated model": ("model.safetensors", _truncate, "cannot read"),
    "truncated optimizer": ("optimizer.safetensors", _truncate, "cannot read"),
    "truncated rng": ("rng.safetensors", _truncate, "cannot read"),
    "broken state.json": ("state.json", lambda p: p.write_text('{"step": 2,'), "not valid JSON"),
    "state.json without step": ("state.json", lambda p: p.write_text('[]'), "missing or not an integer"),
    "missing file": ("rng.safetensors", Path.unlink, "missing"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_whole_one(damage, tmp_path, program, capsys):
    file, hurt, why = DAMAGE[damage]
    first = _trained(tmp_path / "a", program, steps=(1,))
    kept = {k: v.clone() for k, v in first.weights.items()}
    _trained(tmp_path, program, steps=(1, 2))
    hurt(checkpoint.checkpoint_dir(tmp_path) / "ckpt-000002" / file)
    runner = Runner(load_params(TINY2), tmp_path, train=program, weights=initial_weights(load_params(TINY2)))
    assert runner.resume().name == "ckpt-000001" and runner.step == 1
    out = capsys.readouterr().out
    assert out.startswith("checkpoint damaged, not used: ckpt-000002: ") and file in out and why in out
    assert all(torch.equal(runner.weights[k], kept[k]) for k in kept)
    # the damaged one is set aside, so rotation never removes the whole one on its account
    assert (checkpoint.checkpoint_dir(tmp_path) / "ckpt-000002.damaged").is_dir()
    runner.train_step(batches(load_params(TINY2), 1))
    runner.save({"batches_done": 2})
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt-000001", "ckpt-000002"]


def test_no_usable_checkpoint_is_an_error_naming_the_files(tmp_path, program):
    _trained(tmp_path, program, steps=(1,))
    _shrink(checkpoint.checkpoint_dir(tmp_path) / "ckpt-000001" / "model.safetensors")
    runner = Runner(load_params(TINY2), tmp_path, train=program, weights=initial_weights(load_params(TINY2)))
    before = {k: v.clone() for k, v in runner.weights.items()}
    with pytest.raises(UserError) as info:
        runner.resume()
    text = str(info.value)
    assert "ckpt-000001/model.safetensors" in text and "does not match the program's" in text
    assert text.endswith("no usable checkpoint to resume from (move the folder away to start afresh)")
    assert all(torch.equal(runner.weights[k], before[k]) for k in before)       # nothing copied


def test_initial_weights_are_checked_before_anything_is_copied(tmp_path, program):
    runner = _trained(tmp_path / "src", program, steps=(1,))
    file = checkpoint.checkpoint_dir(tmp_path / "src") / "ckpt-000001" / "model.safetensors"
    fresh = Runner(load_params(TINY2), tmp_path / "dst", train=program, weights=initial_weights(load_params(TINY2)))
    before = {k: v.clone() for k, v in fresh.weights.items()}
    for hurt, why in ((_shrink, "does not match the program's"), (_drop_key, "missing")):
        broken = tmp_path / f"{hurt.__name__}.safetensors"
        broken.write_bytes(file.read_bytes())
        hurt(broken)
        with pytest.raises(UserError, match=why):
            fresh.load_initial(str(broken))
        assert all(torch.equal(fresh.weights[k], before[k]) for k in before)     # no broadcast, no half copy
    fresh.load_initial(str(file))
    assert all(torch.equal(fresh.weights[k], runner.weights[k]) for k in before)


# -- 5. a full disk; 7. fsync ----------------------------------------------------------------

def test_a_full_disk_while_writing_is_a_named_error_and_loses_nothing(tmp_path, monkeypatch):
    import errno
    import mmgraph.runtime.checkpoint as ck
    checkpoint.save(tmp_path, 1, {"w": torch.ones(3)}, {"step_count": torch.tensor(1)}, {"step": 1}, max_keep=1)
    real = ck.save_file

    def full(tensors, path):
        if path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path)
    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(UserError) as info:
        checkpoint.save(tmp_path, 2, {"w": torch.zeros(3)}, {"step_count": torch.tensor(2)}, {"step": 2}, max_keep=1)
    assert str(info.value) == (f"{checkpoint.checkpoint_dir(tmp_path) / 'ckpt-000002.tmp'}: cannot write the checkpoint "
                               "of step 2: No space left on device; removed the partial copy, older checkpoints are untouched")
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["ckpt-000001"]
    assert torch.equal(checkpoint.load_weights(tmp_path)["w"], torch.ones(3))


FSIZE_SCRIPT = """
import resource, signal, sys, torch
from mmgraph.core.errors import UserError
from mmgraph.runtime import checkpoint
md = sys.argv[1]
checkpoint.save(md, 1, {"w": torch.ones(8)}, {"step_count": torch.tensor(1)}, {"step": 1}, max_keep=1)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)             # the write fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    checkpoint.save(md, 2, {"w": torch.ones(1 << 20)}, {"step_count": torch.tensor(2)}, {"step": 2}, max_keep=1)
except UserError as err:
    print(err)
    sys.exit(2)
"""


def test_a_file_size_limit_in_a_real_process_is_exit_2_with_nothing_left(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", FSIZE_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "cannot write the checkpoint of step 2: " in done.stdout and "File too large" in done.stdout
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir()] == ["ckpt-000001"]
    assert torch.equal(checkpoint.load_weights(tmp_path)["w"], torch.ones(8))


def test_checkpoint_files_and_folders_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    import mmgraph.runtime.checkpoint as ck
    events = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(self, target):
        events.append(("rename", str(self)))
        return real_rename(self, target)
    monkeypatch.setattr(ck.os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    final = checkpoint.save(tmp_path, 3, {"w": torch.ones(3)}, {"step_count": torch.tensor(3)}, {"step": 3}, max_keep=None)
    tmp = str(final.with_name("ckpt-000003.tmp"))
    at = events.index(("rename", tmp))
    synced_before = {path for kind, path in events[:at] if kind == "fsync"}
    assert {f"{tmp}/{name}" for name in checkpoint.FILES} | {tmp} <= synced_before
    assert ("fsync", str(checkpoint.checkpoint_dir(tmp_path))) in events[at:]
