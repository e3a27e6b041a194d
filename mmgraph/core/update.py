"""The optimizer update as tensor arithmetic, for the program that holds it (``--optimizer_in_program``:
the forward, the backward and the update in one function, as cstorch traces a training step).

``apply`` is pure: weights, gradients and optimizer state in, their new values out, the step's
scalars (learning rate, Adam's bias correction, the inverse loss scale) as 0-d tensors so one
program serves every step, as cstorch passes a step's Python scalars. The bias correction is
computed on the host (``bias_correction``, in float64): in float32, ``1 - beta2 ** t`` loses five
digits to cancellation early in training, and the wafer has no ``expm1``. It follows runtime/optim.py operation for operation: float16 gradients unscaled and
checked for overflow (a step with inf or NaN keeps every weight and state), clipped by global
norm (``max_gradient_norm``), then SGD (momentum) or Adam/AdamW with the Model Zoo's decoupled
decay and bias correction. Only the norm differs: float32 here, float64 in the runtime's update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# the step's scalars, inputs of kind ``scalar``
LR, CORRECTION, STEP_SIZE, INV_SCALE = "lr", "bias_correction", "step_size", "inv_loss_scale"


@dataclass(frozen=True)
class UpdateRule:
    """What the update needs from the params' ``optimizer`` section."""

    kind: str                                  # SGD | Adam | AdamW
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    correct_bias: bool = True
    max_gradient_norm: Optional[float] = None

    @classmethod
    def of(cls, cfg) -> "UpdateRule":
        return cls(cfg.optimizer_type, tuple(cfg.betas), cfg.eps, cfg.weight_decay or 0.0, cfg.momentum or 0.0,
                   bool(cfg.correct_bias), cfg.max_gradient_norm)

    def state_keys(self) -> tuple[str, ...]:
        """Optimizer state per weight, as runtime/optim.py names it."""
        if self.kind == "SGD":
            return ("momentum",) if self.momentum else ()
        return ("exp_avg", "exp_avg_sq")


def bias_correction(rule: UpdateRule, step: int) -> float:
    """Adam's ``sqrt(1 - beta2^t) / (1 - beta1^t)`` at the 0-based ``step`` (1 without it)."""
    if rule.kind == "SGD" or not rule.correct_bias:
        return 1.0
    t = step + 1
    b1, b2 = rule.betas
    return math.sqrt(1 - b2 ** t) / (1 - b1 ** t)


def step_scalars(rule: UpdateRule, lr: float, step: int, loss_scale: float = 1.0) -> dict[str, float]:
    """The scalar inputs of the step ``step`` (0-based): learning rate, bias correction, Adam's
    step size ``lr * correction`` (both in float64, as runtime/optim.py has them) and the inverse
    loss scale."""
    correction = bias_correction(rule, step)
    return {LR: lr, CORRECTION: correction, STEP_SIZE: lr * correction, INV_SCALE: 1.0 / loss_scale}


def apply(rule: UpdateRule, params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict],
          decayed: list[bool], scalars: dict[str, torch.Tensor]):
    """(new weights, new states, global norm before clipping, finite) for one step; ``scalars``:
    ``step_scalars`` as 0-d float32 tensors (``INV_SCALE`` only for float16 programs). Each
    operation is the runtime's in-place one written out of place, so the two round alike."""
    lr, correction, step_size = scalars[LR], scalars[CORRECTION], scalars[STEP_SIZE]
    inv_scale = scalars.get(INV_SCALE)
    if inv_scale is not None:
        grads = [g * inv_scale for g in grads]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
    else:
        finite = None
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads)) if grads else torch.zeros(())
    limit = rule.max_gradient_norm
    coef = torch.where(norm > limit, limit / (norm + 1e-6), torch.ones_like(norm)) if limit is not None else None
    new_p, new_s = [], []
    for p, g, st, dec in zip(params, grads, states, decayed):
        # one weight's ops together, clipping to the skip: a traced program holds them as one run
        # per weight (the compiled executor's regions group a repeated layer's weights)
        if coef is not None:
            g = g * coef.to(g.dtype)
        new, out = _one(rule, p, g, st, rule.weight_decay if dec and rule.weight_decay else None,
                        lr, correction, step_size)
        if finite is not None:                 # an overflow: the step is skipped
            new = torch.where(finite, new, p)
            out = {k: torch.where(finite, v, st[k]) for k, v in out.items()}
        new_p.append(new)
        new_s.append(out)
    return new_p, new_s, norm, finite


def _one(rule: UpdateRule, p, g, st: dict, wd, lr, correction, step_size):
    """One weight's (new value, new state) from its clipped gradient; ``wd``: its decay or None."""
    if rule.kind == "SGD":
        if wd is not None:
            g = g + wd * p
        out = {}
        if rule.momentum:
            g = torch.add(st["momentum"] * rule.momentum, g)
            out["momentum"] = g
        return torch.add(p, g * lr, alpha=-1), out
    b1, b2 = rule.betas
    if rule.kind == "Adam" and wd is not None:
        g = g + wd * p
    m = torch.add(st["exp_avg"] * b1, g, alpha=1 - b1)
    v = torch.addcmul(st["exp_avg_sq"] * b2, g, g, value=1 - b2)
    denom = torch.sqrt(v) + rule.eps
    if rule.kind == "AdamW" and wd is not None:
        return p - ((m / denom) * correction + wd * p) * lr, {"exp_avg": m, "exp_avg_sq": v}
    # addcdiv(m, denom, value=-step_size): (value * m) / denom
    return p - (step_size * m) / denom, {"exp_avg": m, "exp_avg_sq": v}
