"""Ranks for data-parallel training: the process group, binding programs to it, disjoint data.

Launched by torchrun (``torchrun --nproc_per_node N --no-python mmgraph run ...``), every rank runs
the same data-parallel program (collectives compiled in by ``passes/data_parallel.py``) on its
own part of every global batch. Nothing here knows models: it takes programs and samplers.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

from mmgraph.core.errors import Problem, UserError
from mmgraph.core.ops import addresses_group

# How long a collective may wait for a rank before the job ends (a dead rank must not hang it).
DEFAULT_TIMEOUT_S = 60


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    local_rank: int
    group: Optional[str]           # the default group's name, None for one process

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = Ranks(0, 1, 0, None)


def from_env(device_type: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """The ranks torchrun describes in the environment (one process without it); joins the
    process group: gloo on the CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Ranks(rank, world, local, dist.group.WORLD.group_name)


def all_sum(values: list[float], ranks: Ranks, device: torch.device | str = "cpu") -> list[float]:
    """``values`` summed over the ranks (unchanged for one process); float64, one collective."""
    if ranks.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _gather_text(text: str, ranks: Ranks) -> list[str]:
    """Every rank's ``text`` (JSON between ranks of one job: no pickle), in rank order."""
    data = torch.tensor(list(text.encode()), dtype=torch.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(ranks.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    parts = [torch.zeros(longest, dtype=torch.uint8) for _ in range(ranks.world_size)]
    dist.all_gather(parts, padded)
    return [bytes(p[:int(n.item())].tolist()).decode() for p, n in zip(parts, sizes)]


def agree(ranks: Ranks, identity: dict[str, Any]) -> None:
    """Every rank must run the same program on the same data with the same settings: each
    rank's ``identity`` (flat keys to JSON values: the program's fingerprint, the optimizer,
    the command line, the data's folders, shards and sample count) is gathered on every rank
    and compared with rank 0's. A difference stops every rank alike (exit 2), naming the rank
    and the key; it is checked before any collective the difference could derail."""
    if ranks.world_size == 1:
        return
    every = [json.loads(t) for t in _gather_text(json.dumps(identity, sort_keys=True, default=str), ranks)]
    base = every[0]
    problems = []
    for rank, other in enumerate(every[1:], start=1):
        for key in sorted(set(base) | set(other)):
            if base.get(key) != other.get(key):
                problems.append(Problem(None, f"rank {rank}", f"{key} is {_short(other.get(key))}, rank 0 has "
                                        f"{_short(base.get(key))}"))
    if problems:
        more = len(problems) - 8
        raise UserError(problems[:8] + [Problem(None, None, (f"and {more} more difference(s); " if more > 0 else "")
                                                + "every rank must run the same params, options and data")])


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def bind_group(gm: fx.GraphModule, group: str) -> fx.GraphModule:
    """The program's collectives addressed to ``group`` (compiled with a placeholder name)."""
    changed = False
    for node in gm.graph.nodes:
        if addresses_group(node) and node.args[-1] != group:
            node.args = node.args[:-1] + (group,)
            changed = True
    if changed:
        gm.recompile()
    return gm


def rank_share(batch_size: int, ranks: Ranks, source: str, key: str) -> int:
    """Samples of every global batch this rank reads: the global batch split evenly."""
    if batch_size % ranks.world_size:
        raise UserError(Problem(source, key, f"{batch_size} is not divisible by the world size "
                                f"{ranks.world_size} (each rank reads an equal part of every global batch)"))
    return batch_size // ranks.world_size


class RankSampler(torch.utils.data.Sampler):
    """This rank's part of every global batch drawn from ``base`` (a ResumableSampler): the
    samples ``[rank * share, (rank + 1) * share)`` of each run of ``global_batch`` indices. All
    ranks draw the same order, so the parts are disjoint and together make the global batch."""

    def __init__(self, base, global_batch: int, ranks: Ranks):
        self.base, self.global_batch, self.ranks = base, global_batch, ranks
        self.share = global_batch // ranks.world_size

    def __iter__(self) -> Iterator[int]:
        chunk: list[int] = []
        lo = self.ranks.rank * self.share
        for index in self.base:
            chunk.append(index)
            if len(chunk) == self.global_batch:
                yield from chunk[lo:lo + self.share]
                chunk = []
        if chunk:                                   # a last, short global batch: split what there is
            per = -(-len(chunk) // self.ranks.world_size)
            yield from chunk[self.ranks.rank * per:(self.ranks.rank + 1) * per]

    def __len__(self) -> int:
        n = len(self.base)
        full, rest = divmod(n, self.global_batch)
        per = -(-rest // self.ranks.world_size) if rest else 0
        return full * self.share + min(per, max(rest - self.ranks.rank * per, 0))

    def state_dict(self) -> dict:
        return self.base.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base.load_state_dict(state)
