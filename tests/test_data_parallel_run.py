"""``torchrun --nproc_per_node 2 --no-python mmgraph run``: two gloo ranks train like one process
with the same global batch (phase 1 and 2 freeze settings, gradient accumulation, ZeRO-1 and
ZeRO-2), resume with another world size, and end with a message when a rank dies."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmgraph.core.config import load_params
from mmgraph.runtime import checkpoint
from tests.test_runtime import shards  # noqa: F401 - the module's data fixture

STEPS = 10


def _params(tmp_path: Path, shards_path: Path, name: str, train=None, model=None, runconfig=None) -> Path:  # noqa: F811
    raw = yaml.safe_load(shards_path.read_text())
    raw["train_input"].update(train or {})
    raw["model"].update(model or {})
    raw["runconfig"].update({"checkpoint_steps": STEPS, "log_steps": 1, **(runconfig or {})})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _launch(ranks: int, args: list[str]) -> list[str]:
    """torchrun with a free port of its own (``--standalone``), one thread per rank."""
    script = Path(sys.executable).with_name("mmgraph")
    how = ["--no-python", str(script)] if script.exists() else ["-m", "mmgraph"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
            *how, "run", "CPU", *args]


def _torchrun(params: Path, md: Path, *extra: str, ranks: int = 2, steps: int = STEPS) -> str:
    cmd = _launch(ranks, ["--params", str(params), "--model_dir", str(md), "--max_steps", str(steps), *extra])
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _single(params: Path, md: Path, *extra: str, steps: int = STEPS) -> str:
    cmd = [sys.executable, "-m", "mmgraph", "run", "CPU", "--params", str(params), "--model_dir", str(md),
           "--max_steps", str(steps), *extra]
    done = subprocess.run(cmd, env={**_env(), "OMP_NUM_THREADS": "2"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def _weights(md: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(str(md / "checkpoints" / f"ckpt-{step:06d}" / "model.safetensors"))


def _assert_same_training(a: dict, b: dict, frozen: set[str]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if k in frozen:
            assert torch.equal(a[k], b[k]), f"frozen {k} changed"
        else:
            scale = a[k].abs().max().clamp_min(1e-12)
            assert float((a[k] - b[k]).abs().max() / scale) <= 1e-5, k


def _frozen(params: Path) -> set[str]:
    from mmgraph.models import build_model

    model, _ = build_model(load_params(params), device="meta")
    return {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.fixture(scope="module")
def phase2(shards, tmp_path_factory):  # noqa: F811
    """Phase 2 with two micro-batches a rank (the no-sync + accumulating programs), trained by
    one process: the reference of the tests below."""
    root = tmp_path_factory.mktemp("dp2")
    params = _params(root, shards, "p2.yaml", train={"batch_size": 8, "micro_batch_size": 2})
    _single(params, root / "one")
    return params, root / "one"


def test_two_ranks_train_like_one_process_phase2_with_accumulation(phase2, tmp_path):
    params, one = phase2
    out = _torchrun(params, tmp_path / "two")
    assert "data parallel: 2 ranks, each 4 samples of the global batch 8 in 2 micro-batch(es) of 2" in out
    assert out.count(f"step {STEPS}/{STEPS}") == 1                      # rank 0 prints
    _assert_same_training(_weights(one), _weights(tmp_path / "two"), _frozen(params))
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))     # rank 0 logs, once
    assert all(r["world_size"] == 2 for r in records)
    ones = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]) for a, b in zip(ones, records))
    dumped = (tmp_path / "two" / "compile" / "program.py").read_text()
    assert "_c10d_functional.all_reduce" in dumped and "wait_tensor" in dumped


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_trains_like_one_process(phase2, tmp_path, zero):
    params, one = phase2
    out = _torchrun(params, tmp_path / "z", "--zero", str(zero))
    line = next(s for s in out.splitlines() if s.startswith("data parallel:"))
    mine, whole = (float(x) for x in re.search(r"optimizer state ([0-9.]+) MB on rank 0 \(whole: ([0-9.]+) MB", line).groups())
    assert mine <= 0.55 * whole
    _assert_same_training(_weights(one), _weights(tmp_path / "z"), _frozen(params))
    state = load_file(str(tmp_path / "z" / "checkpoints" / f"ckpt-{STEPS:06d}" / "optimizer.safetensors"))
    ref = load_file(str(one / "checkpoints" / f"ckpt-{STEPS:06d}" / "optimizer.safetensors"))
    assert state.keys() == ref.keys()                                  # the whole state, gathered


def test_two_ranks_train_like_one_process_phase1(shards, tmp_path):  # noqa: F811
    params = _params(tmp_path, shards, "p1.yaml", model={"freeze": ["^image_model.image_model_list", "^text_model"]})
    _single(params, tmp_path / "one")
    _torchrun(params, tmp_path / "two")
    frozen = _frozen(params)
    assert any(k.startswith("text_model") for k in frozen)
    _assert_same_training(_weights(tmp_path / "one"), _weights(tmp_path / "two"), frozen)


def test_two_ranks_with_dropout_train_like_one_process(shards, tmp_path):  # noqa: F811
    """Dropout's masks follow the sample (models/rng.py): 2 ranks and 1 process draw the same,
    for a program that keeps the counter-based masks (a GPU target's; the wafer's draws the
    target's own random numbers instead: legalize)."""
    params = _params(tmp_path, shards, "drop.yaml", train={"batch_size": 8, "micro_batch_size": 2})
    raw = yaml.safe_load(params.read_text())
    raw["model"]["text_model"].update(dropout_rate=0.1, attention_dropout_rate=0.1, embd_pdrop=0.1)
    params.write_text(yaml.safe_dump(raw))
    _single(params, tmp_path / "one", "--target", "h100")
    _torchrun(params, tmp_path / "two", "--target", "h100")
    _assert_same_training(_weights(tmp_path / "one"), _weights(tmp_path / "two"), _frozen(params))


def test_resume_two_ranks_then_one_equals_one_process(phase2, tmp_path):
    params, one = phase2
    half = STEPS // 2
    params_half = tmp_path / "p.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["runconfig"]["checkpoint_steps"] = half
    params_half.write_text(yaml.safe_dump(raw))
    md = tmp_path / "md"
    _torchrun(params_half, md, "--zero", "2", steps=half)
    state = json.loads((md / "checkpoints" / f"ckpt-{half:06d}" / "state.json").read_text())
    assert state["world_size"] == 2 and state["sampler"]["samples_done"] == half * 8
    out = _single(params_half, md)
    assert f"resumed from {md / 'checkpoints' / f'ckpt-{half:06d}'}" in out
    _assert_same_training(_weights(one), _weights(md), _frozen(params))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ranks_apart(per_rank: list[list[str]]) -> list[subprocess.CompletedProcess]:
    """Two ranks started by hand (as torchrun would, but each with its own command line)."""
    script = Path(sys.executable).with_name("mmgraph")
    base = [str(script)] if script.exists() else [sys.executable, "-m", "mmgraph"]
    port = _free_port()
    procs = []
    for rank, args in enumerate(per_rank):
        env = {**_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(per_rank)), "LOCAL_WORLD_SIZE": str(len(per_rank))}
        procs.append(subprocess.Popen([*base, "run", "CPU", *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


@pytest.mark.parametrize("change, key", [
    (lambda raw, root: raw["optimizer"].update(learning_rate=raw["optimizer"]["learning_rate"] * 100),
     "optimizer.learning_rate"),
    (lambda raw, root: raw["model"].update(freeze=["^text_model"]), "program.model.freeze"),
    (lambda raw, root: raw["train_input"].update(data_dir=str(shutil.copytree(raw["train_input"]["data_dir"],
                                                                              root / "copy"))),
     "data.train.shards"),
])
def test_ranks_that_disagree_stop_alike_naming_rank_and_key(shards, tmp_path, change, key):  # noqa: F811
    """A rank given another lr or data_dir once trained on with exit 0; another freeze aborted
    inside gloo with no message."""
    same = _params(tmp_path, shards, "same.yaml")
    raw = yaml.safe_load(same.read_text())
    change(raw, tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(raw))
    md = tmp_path / "md"
    results = _ranks_apart([["--params", str(p), "--model_dir", str(md), "--max_steps", "2"] for p in (same, other)])
    for rank, done in enumerate(results):
        assert done.returncode == 2, (rank, done.stdout[-1000:], done.stderr[-3000:])
        assert f"rank 1: {key} is" in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
    assert not (md / "checkpoints").exists()


def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = (task / "children").read_text().split()
        except OSError:
            continue
        for k in kids:
            out += [int(k), *_children(int(k))]
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
    return int(found[0]) if found else None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_killed_rank_ends_the_job_with_a_message_and_the_checkpoint_is_whole(shards, tmp_path):  # noqa: F811
    params = _params(tmp_path, shards, "p.yaml", runconfig={"checkpoint_steps": 1, "max_checkpoints": 3})
    md = tmp_path / "md"
    cmd = _launch(2, ["--params", str(params), "--model_dir", str(md), "--max_steps", "100000"])
    log = open(tmp_path / "job.log", "w+")             # a file: a pipe left unread would block the job
    job = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while len(checkpoint.list_checkpoints(md)) < 2:         # training is under way
            assert job.poll() is None and time.monotonic() < deadline, \
                "training did not start: " + (tmp_path / "job.log").read_text()[-3000:]
            time.sleep(0.2)
        victim = next(p for p in _children(job.pid) if _rank_of(p) == 1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        job.wait(timeout=120)                          # hard bound; the bound is 60 s
        took = time.monotonic() - killed
    finally:
        if job.poll() is None:                          # the ranks may be in sessions of their own
            for pid in _children(job.pid):
                _kill(pid)
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    log.seek(0)
    out = log.read()
    assert job.returncode != 0
    assert "rank: 1" in out or "rank 1" in out, out[-3000:]
    print(f"job ended {took:.1f} s after rank 1 was killed")
    last = checkpoint.latest(md)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in _weights(md, int(last.name.split("-")[1])).items()}
    found = checkpoint.load_usable(md, expected)
    assert found is not None and not found.skipped and found.path == last
    shutil.rmtree(md)
