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

from mmgraph.config import OptimizerConfig
from mmgraph.runtime.optim import Optimizer


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
                 rank: int, world_size: int, group: Optional[dist.ProcessGroup] = None):
        super().__init__(cfg, params)
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
