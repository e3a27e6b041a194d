"""Hardware targets as data (``configs/targets/*.yaml``): what the simulator knows of a machine.

Every figure is in SI units (bytes, bytes/s, FLOP/s, seconds). A target file lists its public
sources and its assumptions beside the numbers; docs/targets.md explains the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field, ValidationError, field_validator

import mmgraph.configs as _shipped_configs
from mmgraph.core.config.base import Section
from mmgraph.core.config.reading import format_errors, read_yaml
from mmgraph.core.errors import Problem, UserError, did_you_mean
from mmgraph.core.ops import OP_SET_SUFFIX, load_op_set, op_set_path

Positive = Annotated[float, Field(gt=0)]
Share = Annotated[float, Field(gt=0, le=1)]
# The shipped targets are package data (mmgraph.configs, folder targets/): found through the package,
# so an installed wheel finds them as the source tree does.
TARGET_DIR = Path(_shipped_configs.__file__).resolve().parent / "targets"


class PeakFlops(Section):
    fp16: Positive
    bf16: Positive
    fp32: Positive


class Compute(Section):
    cores: Annotated[int, Field(gt=0)]
    peak_flops: PeakFlops
    efficiency: Share = 1.0                   # share of peak a matmul-class kernel reaches
    # Optional measured curve [[flops, efficiency], ...]: small matmuls reach less of the peak.
    matmul_efficiency: list[tuple[Positive, Share]] = []
    attention_efficiency: list[tuple[Positive, Share]] = []   # same, for fused attention
    transcendental_rate: Optional[Positive] = None           # exp/log/sigmoid elements per second
    kernel_overhead_s: Annotated[float, Field(ge=0)] = 0.0   # per kernel (launch, dispatch)
    # Share of its roofline time (the largest of compute, memory and transcendental time) an op
    # reaches inside a whole step, where operands come from other ops: cold caches, strided and
    # skinny operands unlike the calibration's. Host targets measure it on a generic step.
    op_efficiency: Share = 1.0
    granularity: Literal["kernel", "op"] = "kernel"          # what runs as one unit


class Memory(Section):
    bytes: Positive                           # on-device memory: activations + weight buffers
    bandwidth: Positive                       # bytes/s
    # Share of ``bandwidth`` that memory-bound kernels reach (a measured stream benchmark / datasheet).
    bandwidth_efficiency: Share = 1.0
    cache_bytes: Annotated[float, Field(ge=0)] = 0.0    # ops moving at most this many bytes ...
    cache_bandwidth: Optional[Positive] = None           # ... run at this bandwidth (CPU caches)
    weight_buffer_share: Share = 0.25         # share of memory reserved for streamed weights


class Stream(Section):
    enabled: bool = True                      # False: weights stay in device memory
    bandwidth: Positive                       # bytes/s, each direction
    weight_share: Share = 1.0                 # share of the link usable for weights/gradients
    latency_s: Annotated[float, Field(ge=0)] = 0.0

    @property
    def effective(self) -> float:
        return self.bandwidth * self.weight_share


class ExternalMemory(Section):
    bytes: Positive
    optimizer_update_rate: Positive           # parameters updated per second, off device
    optimizer_tensor_overhead_s: Annotated[float, Field(ge=0)] = 0.0   # per gradient tensor clipped + updated


class Pieces(Section):
    """Running a micro-batch through a segment in pieces of samples: the segment's working set
    (its largest kernel's values and the values it recomputes) is one piece's."""

    enabled: bool = False
    overhead_s: Annotated[float, Field(ge=0)] = 0.0     # per piece and segment (fill and drain)
    min_samples: Annotated[int, Field(gt=0)] = 1        # the smallest piece


class Offload(Section):
    """Kept activations streamed out to external memory in the forward pass and back in before
    their backward segment, over the weight link (gradients use the out-direction only in the
    backward; weights the in-direction in both)."""

    enabled: bool = False


class Mechanisms(Section):
    """What the compiler may do to fit a step in device memory (passes/memory.py)."""

    recompute: bool = True
    pieces: Pieces = Pieces()
    offload: Offload = Offload()

    def names(self) -> tuple[str, ...]:
        return tuple(n for n, on in (("recompute", self.recompute), ("pieces", self.pieces.enabled),
                                     ("offload", self.offload.enabled)) if on)


class Interconnect(Section):
    """How several systems train one model data-parallel (``compiler/scaling.py``, ``passes/cluster.py``)."""

    topology: Literal["swarmx", "ring"]       # swarmx: broadcast weights / reduce gradients in a tree
    bandwidth: Positive = 1.0                 # ring: bytes/s each direction per system, within a node
    bandwidth_across_nodes: Optional[Positive] = None   # ring: per system, between nodes
    systems_per_node: Annotated[int, Field(gt=0)] = 1
    latency_s: Annotated[float, Field(ge=0)] = 0.0      # per hop (swarmx) or per ring step
    # Share of the link a large ring collective reaches (NCCL bus bandwidth / link rate, measured).
    efficiency: Share = 1.0
    efficiency_across_nodes: Optional[Share] = None      # the same between nodes (default: efficiency)

    def ring_bandwidth(self, systems: int) -> float:
        """The slowest link a ring over ``systems`` crosses."""
        if systems > self.systems_per_node and self.bandwidth_across_nodes:
            return min(self.bandwidth, self.bandwidth_across_nodes)
        return self.bandwidth

    def collective_bandwidth(self, systems: int) -> float:
        """The bus bandwidth a large ring collective reaches over ``systems``: the slowest link
        times its measured efficiency."""
        if systems > self.systems_per_node and self.bandwidth_across_nodes:
            across = self.bandwidth_across_nodes * (self.efficiency_across_nodes or self.efficiency)
            return min(self.bandwidth * self.efficiency, across)
        return self.bandwidth * self.efficiency


class Target(Section):
    name: str
    kind: Literal["wafer", "gpu", "host"]
    description: str = ""
    compute: Compute
    memory: Memory
    fabric_bandwidth: Optional[Positive] = None
    stream: Stream
    external_memory: ExternalMemory
    interconnect: Optional[Interconnect] = None
    # The ops it lowers: an op set (configs/targets/NAME.ops, the vendor's list with its source);
    # none: every op of the registry (host and GPU executors run ATen). The legalize pass reads it.
    ops: Optional[str] = None
    mechanisms: Mechanisms = Mechanisms()
    sources: list[str] = []
    assumptions: list[str] = []

    def matmul_share(self, flops: float, attention: bool = False) -> float:
        """Share of peak a matmul (or attention) of this many FLOPs reaches (log-interpolated)."""
        curve = sorted(self.compute.attention_efficiency if attention and self.compute.attention_efficiency
                       else self.compute.matmul_efficiency)
        if not curve:
            return self.compute.efficiency
        if flops <= curve[0][0]:
            return curve[0][1]
        for (f0, e0), (f1, e1) in zip(curve, curve[1:]):
            if flops <= f1:
                w = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
                return e0 + w * (e1 - e0)
        return curve[-1][1]

    @property
    def stream_enabled(self) -> bool:
        return self.stream.enabled

    @field_validator("ops")
    @classmethod
    def _known_op_set(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and not op_set_path(name).is_file():
            known = sorted(p.name.removesuffix(OP_SET_SUFFIX) for p in TARGET_DIR.glob(f"*{OP_SET_SUFFIX}"))
            raise ValueError(f"unknown op set {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")
        return name

    def op_set(self):
        """The op set this target lowers (None: every registered op)."""

        return load_op_set(self.ops) if self.ops else None


def user_target_dir() -> Path:
    """Where ``mmgraph calibrate`` writes ``host.yaml`` ($MMGRAPH_HOME, else ~/.cache/mmgraph)."""
    home = os.environ.get("MMGRAPH_HOME") or Path.home() / ".cache" / "mmgraph"
    return Path(home) / "targets"


def shipped_targets() -> list[str]:
    return sorted(p.stem for p in TARGET_DIR.glob("*.yaml"))


def resolve_target(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    for folder in (TARGET_DIR, user_target_dir()):
        candidate = folder / f"{name_or_path}.yaml"
        if candidate.is_file():
            return candidate
    if name_or_path == "host":
        raise UserError(Problem(None, "--target host", f"no host target yet: run `mmgraph calibrate` "
                                f"(writes {user_target_dir() / 'host.yaml'})"))
    known = shipped_targets() + ["host"]
    raise UserError(Problem(None, "--target", f"unknown target {name_or_path!r}"
                            f"{did_you_mean(name_or_path, known)}; known: {', '.join(known)} or a YAML path"))


def load_target(name_or_path: str) -> Target:
    path = str(resolve_target(name_or_path))
    raw = read_yaml(path)
    try:
        return Target.model_validate(raw)
    except ValidationError as err:
        problems = []
        for p in format_errors(path, "", Target, err):
            problems.append(Problem(p.file, (p.where or "").lstrip("."), p.message))
        raise UserError(problems) from None
