"""Checkpoints in ``MODEL_DIR/checkpoints/ckpt-NNNNNN/``: safetensors weights and optimizer
state, and ``state.json`` (step, data position, RNG). Each is written under a temporary name
and renamed into place, so a crash never leaves a half checkpoint as the latest; the oldest
beyond ``max_checkpoints`` are removed after a successful write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from mmgraph.errors import Problem, UserError


CHECKPOINTS = "checkpoints"


def checkpoint_dir(model_dir: str | Path) -> Path:
    return Path(model_dir) / CHECKPOINTS


def list_checkpoints(model_dir: str | Path) -> list[Path]:
    root = checkpoint_dir(model_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp")
            and (p / "state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def latest(model_dir: str | Path) -> Optional[Path]:
    found = list_checkpoints(model_dir)
    return found[-1] if found else None


def save(model_dir: str | Path, step: int, weights: dict[str, torch.Tensor], optimizer: dict,
         state: dict, max_keep: Optional[int]) -> Path:
    root = checkpoint_dir(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:06d}"
    tmp = root / f"ckpt-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    save_file({k: v.detach().contiguous().cpu() for k, v in optimizer.items()}, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")   # written last: marks completion
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if max_keep:
        for old in list_checkpoints(model_dir)[:-max_keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint folder or a ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINTS).is_dir():                          # a model_dir: its latest
        last = latest(path)
        if last is None:
            raise UserError(Problem(str(path), None, "no finished checkpoint in this model_dir"))
        path = last
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():      # sharded (mmgraph convert)
        from mmgraph.convert.io import find_weights, read_entries
        return {k: e.load() for k, e in read_entries(find_weights(path)).items()}
    file = path / "model.safetensors" if path.is_dir() else path
    if not file.is_file():
        raise UserError(Problem(str(path), None, "no model.safetensors here"))
    try:
        return load_file(str(file))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(Problem(str(file), None, f"cannot read weights: {err}")) from None


def load(path: Path) -> tuple[dict, dict, dict]:
    weights = load_weights(path)
    optimizer = load_file(str(path / "optimizer.safetensors"))
    state = json.loads((path / "state.json").read_text())
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    return weights, optimizer, state
