"""ZeRO stage 1: the optimizer state sharded across ranks.

Every rank holds all weights and, after the program's all-reduce, all gradients (so clipping by
the global norm is the same everywhere), but keeps optimizer state (Adam's two moments, SGD's
momentum) only for the parameters it owns and updates only those; each owner then broadcasts
its updated parameters, one flat buffer per owner, so every rank ends the step with the same
weights. Ownership is a balanced split of the trainable parameters by size, decided the same way
on every rank.

Checkpoints hold the whole optimizer state, gathered on save: a run resumes with any world size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from mmgraph.core.config import OptimizerConfig
from mmgraph.runtime.optim import Optimizer, clip_to_norm, squared_norm


def partition(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Owner rank of each parameter: largest first, each to the least loaded rank (ties: lowest)."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += sizes[name]
    return owner


class ShardedOptimizer(Optimizer):
    """``Optimizer`` whose state and update cover this rank's shard; weights broadcast after."""

    def __init__(self, cfg: OptimizerConfig, params: dict[str, torch.Tensor], trainable: list[str],
                 rank: int, world_size: int, group: Optional[dist.ProcessGroup] = None, decay=None):
        super().__init__(cfg, params, decay)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.owner = partition({n: params[n].numel() for n in trainable}, world_size)

    def owned(self, rank: Optional[int] = None) -> list[str]:
        r = self.rank if rank is None else rank
        return sorted(n for n, o in self.owner.items() if o == r)

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> float:
        mine = {n: g for n, g in grads.items() if self.owner.get(n) == self.rank}
        lr = super().step(mine)
        self._broadcast_updates()
        return lr

    def _broadcast_updates(self) -> None:
        for rank in range(self.world_size):
            names = self.owned(rank)
            if not names:
                continue
            flat = torch.cat([self.params[n].reshape(-1) for n in names])
            dist.broadcast(flat, src=rank, group=self.group)
            if rank != self.rank:
                offset = 0
                for n in names:
                    p = self.params[n]
                    p.copy_(flat[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values())

    def state_dict(self) -> dict:
        """The whole state (every rank's shard), gathered: the same dict on every rank."""
        local = super().state_dict()
        shards: list = [None] * self.world_size
        dist.all_gather_object(shards, {k: v.cpu() for k, v in local.items()}, group=self.group)
        whole: dict = {}
        for shard in shards:
            whole.update(shard)
        return whole

    def load_state_dict(self, state: dict) -> None:
        """Keep this rank's part of a whole state (saved with any world size)."""
        super().load_state_dict(state)
        self.state = {n: st for n, st in self.state.items() if self.owner.get(n) == self.rank}


class GradShardOptimizer:
    """ZeRO-2: the program hands each rank its shard of every reduced gradient bucket
    (``grad_shard`` outputs, see passes/data_parallel.py); the rank keeps the matching shard of
    the flattened weights and of the optimizer state, updates it, and all-gathers the bucket's
    weights back. The update is element by element the same as the whole optimizer's; the
    gradient norm for clipping is summed across ranks."""

    def __init__(self, cfg: OptimizerConfig, params: dict[str, torch.Tensor], buckets, rank: int,
                 world_size: int, group: Optional[dist.ProcessGroup] = None, no_decay: frozenset[str] = frozenset()):
        self.cfg, self.params, self.buckets = cfg, params, list(buckets)
        self.rank, self.world_size, self.group = rank, world_size, group
        self.shards = {f"bucket{b.index}": self._flat(b)[self._range(b)].clone() for b in self.buckets}
        self.inner = Optimizer(cfg, self.shards, {f"bucket{b.index}": self._decay_mask(b, no_decay)
                                                  for b in self.buckets if no_decay & set(b.targets)})

    @property
    def step_count(self) -> int:
        return self.inner.step_count

    def _range(self, bucket) -> slice:
        size = bucket.numel // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def _flat(self, bucket) -> torch.Tensor:
        flat = torch.cat([self.params[t].reshape(-1) for t in bucket.targets])
        return torch.nn.functional.pad(flat, (0, bucket.numel - flat.numel()))

    def _decay_mask(self, bucket, no_decay: frozenset[str]) -> torch.Tensor:
        """1 where this rank's shard of the bucket holds a decayed weight, else 0."""
        parts = [torch.full((self.params[t].numel(),), float(t not in no_decay)) for t in bucket.targets]
        flat = torch.nn.functional.pad(torch.cat(parts), (0, bucket.numel - sum(p.numel() for p in parts)))
        return flat[self._range(bucket)].to(self.shards[f"bucket{bucket.index}"].device)

    def clip(self, grads: dict[str, torch.Tensor]) -> float:
        """Clip by the global norm: each rank's shards' squares, summed across ranks."""
        total = squared_norm(grads).clone()
        dist.all_reduce(total, group=self.group)
        return clip_to_norm(grads, torch.sqrt(total), self.cfg.max_gradient_norm)

    @torch.no_grad()
    def refresh(self) -> None:
        """Take this rank's shards from the weights as they are now: the weights are the truth
        (a checkpoint or initial weights copied in after this optimizer was built), the shards
        only this rank's working copy of them."""
        for b in self.buckets:
            self.shards[f"bucket{b.index}"].copy_(self._flat(b)[self._range(b)])

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> float:
        self.refresh()                  # never update a stale copy: nothing else may write one
        lr = self.inner.step(grads)
        for b in self.buckets:
            shard = self.shards[f"bucket{b.index}"]
            whole = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
            dist.all_gather_into_tensor(whole, shard, group=self.group)
            offset = 0
            for name in b.targets:
                p = self.params[name]
                p.copy_(whole[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        return lr

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for st in self.inner.state.values() for t in st.values())

    def state_dict(self) -> dict:
        """The whole state under the parameters' names, as the plain optimizer saves it."""
        out: dict = {"step_count": torch.tensor(self.inner.step_count)}
        for b in self.buckets:
            for key, shard in sorted(self.inner.state.get(f"bucket{b.index}", {}).items()):
                whole = torch.empty(b.numel, dtype=shard.dtype, device=shard.device)
                dist.all_gather_into_tensor(whole, shard.contiguous(), group=self.group)
                offset = 0
                for name, shape in zip(b.targets, b.shapes):
                    n = self.params[name].numel()
                    out[f"{name}::{key}"] = whole[offset:offset + n].view(shape).cpu().clone()
                    offset += n
        return out

    def load_state_dict(self, state: dict) -> None:
        """This rank's shards of a whole state (saved with any world size or none)."""
        self.inner.step_count = int(state["step_count"])
        self.inner.state = {}
        keys = {k.rpartition("::")[2] for k in state if k != "step_count"}
        for b in self.buckets:
            for key in sorted(keys):
                parts = [state.get(f"{name}::{key}") for name in b.targets]
                if any(p is None for p in parts):
                    continue
                flat = torch.cat([p.reshape(-1) for p in parts])
                flat = torch.nn.functional.pad(flat, (0, b.numel - flat.numel()))
                self.inner.state.setdefault(f"bucket{b.index}", {})[key] = flat[self._range(b)].clone()


def optimizer_state_bytes(optimizer, weights: dict[str, torch.Tensor], trainable: list[str]) -> tuple[int, int]:
    """(bytes of optimizer state this rank holds once the first step made it, bytes of the whole
    state): Adam/AdamW keep two tensors per element, SGD with momentum one."""
    if optimizer is None:
        return 0, 0
    cfg = optimizer.cfg
    slots = 2 if cfg.optimizer_type in ("Adam", "AdamW") else int(bool(cfg.momentum))
    whole = sum(weights[n].numel() * weights[n].element_size() for n in trainable)
    if isinstance(optimizer, ShardedOptimizer):
        mine = sum(weights[n].numel() * weights[n].element_size() for n in optimizer.owned())
    elif isinstance(optimizer, GradShardOptimizer):
        mine = sum(t.numel() * t.element_size() for t in optimizer.shards.values())
    else:
        mine = whole
    return slots * mine, slots * whole
