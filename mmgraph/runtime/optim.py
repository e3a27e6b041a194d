"""Optimizers and learning-rate schedules from the params' ``optimizer`` section.

Adam/AdamW follow the Model Zoo: ``correct_bias`` switches bias correction, AdamW decays
weights decoupled from the gradient; SGD with momentum. Weight decay skips what the Model Zoo
skips (``common/optim_utils.py`` ``_should_apply_weight_decay``: biases and the parameters of
norm modules, its param group 1): the caller names them (``no_decay``, from the model's anatomy),
and AdamW updates as ``AdamBase`` does, ``p -= lr * (adam + weight_decay * p)``. Gradients are clipped by global norm
(``max_gradient_norm``) before the update. Schedules: Linear, CosineDecay, Constant and
Exponential, and lists of them run one after another.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from mmgraph.core.config import OptimizerConfig, Scheduler


def _one(s: Scheduler, step: int) -> float:
    total = s.total_iters or s.decay_steps
    if s.scheduler == "Constant":
        return s.learning_rate
    if s.scheduler == "Exponential":
        exponent = step / (s.decay_steps or total or 1)
        if s.staircase:
            exponent = math.floor(exponent)
        return s.initial_learning_rate * s.decay_rate ** exponent
    frac = min(step / total, 1.0) if total else 1.0
    a, b = s.initial_learning_rate, s.end_learning_rate
    if s.scheduler == "Linear":
        return a + (b - a) * frac
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * frac))         # CosineDecay


def learning_rate(cfg: OptimizerConfig, step: int) -> float:
    """The learning rate at optimizer step ``step`` (0-based)."""
    lr = cfg.learning_rate
    if isinstance(lr, (int, float)):
        return float(lr)
    schedules = lr if isinstance(lr, list) else [lr]
    start = 0
    for i, s in enumerate(schedules):
        length = s.total_iters or s.decay_steps
        if i == len(schedules) - 1 or length is None or step < start + length:
            return _one(s, step - start)
        start += length
    return _one(schedules[-1], step - start)


def squared_norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of squares of every gradient, in float64."""
    return sum((g.double() ** 2).sum() for g in grads.values()) if grads else torch.zeros((), dtype=torch.float64)


def clip_to_norm(grads: dict[str, torch.Tensor], norm: torch.Tensor, limit) -> float:
    """Scale ``grads`` in place so their global norm ``norm`` becomes ``limit`` (when above it)."""
    if limit is not None and norm > limit:
        scale = limit / (norm + 1e-6)
        for g in grads.values():
            g.mul_(scale.to(g.dtype))
    return float(norm)


Decay = Union[bool, torch.Tensor]        # per parameter: decayed or not, or an elementwise 0/1 mask


class Optimizer:
    """Updates parameters in place from their gradients; state is a dict of tensors.
    ``decay``: per parameter name, False (no weight decay) or a 0/1 mask of its shape (flattened
    ZeRO-2 shards); absent names are decayed."""

    def __init__(self, cfg: OptimizerConfig, params: dict[str, torch.Tensor],
                 decay: Optional[dict[str, Decay]] = None):
        self.cfg = cfg
        self.params = params
        self.decay: dict[str, Decay] = dict(decay or {})
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.step_count = 0

    def _decay_of(self, name: str, p: torch.Tensor):
        """``weight_decay`` (a number or an elementwise tensor) for ``name``, or None."""
        wd = self.cfg.weight_decay
        rule = self.decay.get(name, True)
        if not wd or rule is False:
            return None
        return wd if rule is True else rule.to(p.dtype) * wd

    def clip(self, grads: dict[str, torch.Tensor]) -> float:
        """Scale gradients to ``max_gradient_norm`` (global L2 norm); returns the norm before."""
        norm = torch.sqrt(squared_norm(grads))
        return clip_to_norm(grads, norm, self.cfg.max_gradient_norm)

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> float:
        """One update at the schedule's rate; returns the rate used."""
        lr = learning_rate(self.cfg, self.step_count)
        cfg = self.cfg
        for name, g in grads.items():
            p = self.params[name]
            wd = self._decay_of(name, p)
            if cfg.optimizer_type == "SGD":
                if wd is not None:
                    g = g + wd * p
                if cfg.momentum:
                    buf = self.state.setdefault(name, {}).get("momentum")
                    buf = g.clone() if buf is None else buf.mul_(cfg.momentum).add_(g)
                    self.state[name]["momentum"] = buf
                    g = buf
                p.add_(g, alpha=-lr)
                continue
            st = self.state.get(name)
            if st is None:                  # zeros made once, at a weight's first step (not every step)
                st = self.state[name] = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            b1, b2 = cfg.betas
            if cfg.optimizer_type == "Adam" and wd is not None:
                g = g + wd * p
            st["exp_avg"].mul_(b1).add_(g, alpha=1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            correction = 1.0
            if cfg.correct_bias:
                t = self.step_count + 1
                correction = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            step_size = lr * correction
            denom = st["exp_avg_sq"].sqrt().add_(cfg.eps)
            if cfg.optimizer_type == "AdamW" and wd is not None:
                # AdamBase: u = m / (sqrt(v) + eps) * correction + wd * p (the weight before the step)
                update = (st["exp_avg"] / denom).mul_(correction).add_(wd * p)
                p.sub_(update.mul_(lr))
            else:
                p.addcdiv_(st["exp_avg"], denom, value=-step_size)
        self.step_count += 1
        return lr

    def state_dict(self) -> dict:
        flat = {f"{name}::{k}": v for name, st in self.state.items() for k, v in st.items()}
        return {"step_count": torch.tensor(self.step_count), **flat}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.state = {}
        for key, v in state.items():
            if key == "step_count":
                continue
            name, _, k = key.rpartition("::")
            self.state.setdefault(name, {})[k] = v.clone()


class LossScaler:
    """Loss scaling for float16 programs (their gradient seed is an input), from the Model Zoo's
    ``loss_scaling_factor``: a number (static), or ``dynamic``: start at ``initial_loss_scale``;
    a step whose gradients overflow is skipped and the scale halved (not below
    ``min_loss_scale``); after ``steps_per_increase`` good steps it doubles (not above
    ``max_loss_scale``)."""

    def __init__(self, cfg: OptimizerConfig):
        self.cfg = cfg
        self.dynamic = cfg.loss_scaling_factor == "dynamic"
        self.scale = float(cfg.initial_loss_scale if self.dynamic else cfg.loss_scaling_factor)
        self.good_steps = 0

    def seed(self, device) -> torch.Tensor:
        return torch.tensor(self.scale, dtype=torch.float32, device=device)

    @torch.no_grad()
    def unscale(self, grads: dict[str, torch.Tensor]) -> bool:
        """Divide the gradients by the scale; False when any is inf or NaN (an overflow)."""
        inv = 1.0 / self.scale
        for g in grads.values():
            g.mul_(inv)
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads.values()]).all())

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / 2, self.cfg.min_loss_scale)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.cfg.steps_per_increase:
            self.scale = min(self.scale * 2, self.cfg.max_loss_scale)
            self.good_steps = 0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
