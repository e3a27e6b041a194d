"""Checkpoints in ``MODEL_DIR/checkpoints/ckpt-NNNNNN/``: safetensors weights and optimizer
state, ``rng.safetensors`` and ``state.json`` (step, data position, loss scale).

What a checkpoint guarantees (docs/runtime.md):
- it is written under ``ckpt-N.tmp``, every file and the folder fsynced, then renamed into place
  and the parent folder fsynced: a kill, a crash or a power loss leaves either the whole
  checkpoint or none (a ``.tmp`` is never read);
- its weights are finite: ``save`` refuses non-finite weights;
- a full disk (any OSError) while writing removes the ``.tmp`` and is an error naming the folder;
  the older checkpoints are untouched;
- rotation (``max_checkpoints``) only removes checkpoints older than the one just written.
Resume (``load_usable``) checks every file of the newest checkpoint against what the program
expects (keys, shapes, dtypes, finite weights) before anything is copied, and falls back to the
previous whole one when the newest is damaged, naming what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.tensorio import find_weights, read_entries

CHECKPOINTS = "checkpoints"
FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")
_NAME = re.compile(r"ckpt-(\d+)$")


def checkpoint_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / CHECKPOINTS


def _step_of(p: Path) -> Optional[int]:
    m = _NAME.match(p.name)
    return int(m.group(1)) if m else None


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    """Finished checkpoints (``state.json`` present, not ``.tmp``), oldest first."""
    root = checkpoint_dir(model_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _step_of(p) is not None and p.is_dir() and (p / "state.json").is_file()]
    return sorted(done, key=_step_of)


def latest(model_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def non_finite(weights: dict[str, torch.Tensor]) -> list[str]:
    """Names of floating-point tensors holding inf or NaN (one device sync when all are finite).
    First each tensor's sum, one read of it (an inf or NaN anywhere makes the sum non-finite;
    ``isfinite(v).all()`` reads it about five times, 5% of the small config's CPU step): only
    when a sum is not finite (a NaN, an inf, or finite values overflowing) is each tensor checked
    element by element, so the answer is the exact one."""
    floats = {k: v for k, v in weights.items() if v.is_floating_point()}
    sums: dict[torch.device, list[torch.Tensor]] = {}
    for v in floats.values():
        sums.setdefault(v.device, []).append(v.sum(dtype=torch.float32 if v.dtype != torch.float64 else None))
    if all(bool(torch.isfinite(torch.stack(f)).all()) for f in sums.values()):
        return []
    return [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]


def save(model_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict,
         state: dict, max_keep: Optional[int]) -> Path:
    bad = non_finite(weights)
    if bad:
        raise UserError(Problem(None, f"step {step}", f"{len(bad)} weights are not finite (e.g. {bad[0]}); "
                                "no checkpoint written"))
    root = checkpoint_dir(model_dir)
    final = root / f"ckpt-{step:06d}"
    tmp = root / f"ckpt-{step:06d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write(tmp, weights, optimizer, state)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync(root)
    except (OSError, SafetensorError) as err:     # a full disk, a quota, a read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        why = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise UserError(Problem(str(tmp), None, f"cannot write the checkpoint of step {step}: {why}; "
                                "removed the partial copy, older checkpoints are untouched")) from None
    if max_keep:
        older = [p for p in list_checkpoints(model_dir) if _step_of(p) < step]
        for old in older[:max(len(older) - (max_keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, weights: dict, optimizer: dict, state: dict) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, str(tmp / "optimizer.safetensors"))
    save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")   # written last: marks completion
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINTS).is_dir():                          # a model_dir: its latest
        last = latest(path)
        if last is None:
            raise UserError(Problem(str(path), None, "no finished checkpoint in this model_dir"))
        path = last
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():      # sharded (mmgraph convert)
        return {k: e.load() for k, e in read_entries(find_weights(path)).items()}
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(Problem(str(path), None, "no model.safetensors here"))
    return _read(file)


def _read(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(Problem(str(file), None, f"cannot read: {err}")) from None


def check_tensors(file: str, found: dict[str, torch.Tensor], expected: dict[str, tuple[tuple, torch.dtype]],
                  exact_dtype: bool = True) -> list[Problem]:
    """Every expected key present with its shape and dtype (floating casts allowed when not
    ``exact_dtype``), and nothing unexpected."""
    problems = [Problem(file, k, "missing") for k in expected if k not in found]
    problems += [Problem(file, k, "not in the program (unexpected)") for k in found if k not in expected]
    for k, v in found.items():
        if k not in expected:
            continue
        shape, dtype = expected[k]
        if tuple(v.shape) != tuple(shape):
            problems.append(Problem(file, k, f"shape {tuple(v.shape)} does not match the program's {tuple(shape)}"))
        elif v.dtype != dtype and (exact_dtype or not (v.is_floating_point() and dtype.is_floating_point)):
            problems.append(Problem(file, k, f"dtype {v.dtype} does not match the program's {dtype}"))
    return problems


@dataclass
class Loaded:
    path: Path
    weights: dict
    optimizer: dict
    state: dict
    rng: dict
    skipped: list[str] = field(default_factory=list)     # newer checkpoints found damaged, with why


def load(path: Path, expected: dict[str, tuple[tuple, torch.dtype]]) -> Loaded:
    """One checkpoint, every file checked; UserError listing every problem."""
    missing = [Problem(str(path / n), None, "missing") for n in FILES if not (path / n).is_file()]
    if missing:
        raise UserError(missing)
    weights = _read(path / "model.safetensors")
    optimizer = _read(path / "optimizer.safetensors")
    rng = _read(path / "rng.safetensors")
    try:
        state = json.loads((path / "state.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(Problem(str(path / "state.json"), None, f"not valid JSON: {err}")) from None
    problems = check_tensors(str(path / "model.safetensors"), weights, expected)
    problems += [Problem(str(path / "model.safetensors"), k, "not finite") for k in non_finite(weights)]
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        problems.append(Problem(str(path / "state.json"), "step", "missing or not an integer"))
    if "step_count" not in optimizer:
        problems.append(Problem(str(path / "optimizer.safetensors"), "step_count", "missing"))
    for key, v in optimizer.items():
        name = key.rpartition("::")[0]
        if key != "step_count" and (name not in expected or tuple(v.shape) != tuple(expected[name][0])):
            problems.append(Problem(str(path / "optimizer.safetensors"), key, "does not match a weight of the program"))
    if "torch" not in rng or rng["torch"].dtype != torch.uint8:
        problems.append(Problem(str(path / "rng.safetensors"), "torch", "missing or not a torch RNG state"))
    if problems:
        raise UserError(problems)
    return Loaded(path, weights, optimizer, state, rng)


def load_usable(model_dir: str | Path, expected: dict[str, tuple[tuple, torch.dtype]]) -> Optional[Loaded]:
    """The newest checkpoint that is whole and matches the program; damaged newer ones are
    renamed ``ckpt-N.damaged`` (kept for inspection, never rotated on their account) and named
    in ``skipped``. None when model_dir has no checkpoint; UserError when none is usable."""
    skipped: list[str] = []
    problems: list[Problem] = []
    candidates = list_checkpoints(model_dir)
    for path in reversed(candidates):
        try:
            found = load(path, expected)
        except UserError as err:
            problems += err.problems
            skipped.append(f"{path.name}: {err.problems[0]}" + (f" (+{len(err.problems) - 1} more)"
                                                                 if len(err.problems) > 1 else ""))
            continue
        for name in skipped:
            bad = checkpoint_dir(model_dir) / name.split(":")[0]
            bad.rename(bad.with_name(bad.name + ".damaged"))
        found.skipped = skipped
        return found
    if candidates:
        raise UserError(problems + [Problem(str(checkpoint_dir(model_dir)), None, "no usable checkpoint to resume "
                                            "from (move the folder away to start afresh)")])
    return None
