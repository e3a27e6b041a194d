"""The Program: one static graph of a training (or eval) step plus typed metadata.

Nodes are ATen ops in an ``fx.Graph``; every parameter and batch field is a placeholder
(weights are never constants). Each pass returns a new Program and appends a PassRecord.
"""

from __future__ import annotations


from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Optional

import torch
import torch.fx as fx


LOSS_SCALE = "loss_scale"      # the gradient-seed input of a float16 training program
GRAD_WEIGHT = "grad_weight"    # a data-parallel program's micro-batch share of the global loss
RNG_SEED = "rng_seed"          # () int64: the run's seed, for dropout's counter-based masks
SAMPLE_INDEX = "sample_index"  # (B,) int64: each row's sample index in the training stream
RNG_FIELDS = (RNG_SEED, SAMPLE_INDEX)


class InputKind(str, Enum):
    PARAM = "param"
    BATCH = "batch"
    GRAD = "grad"      # a gradient accumulated over earlier micro-batches (data_parallel's last micro-step)
    RNG = "rng"        # the random inputs of dropout (RNG_FIELDS), set by the runtime per micro-batch
    STATE = "state"    # optimizer state (``WEIGHT::KEY``) of a program that holds the update
    SCALAR = "scalar"  # a 0-d scalar set per run: the loss scale (float16), a micro-step's gradient
                       # weight (data parallel), the update's learning rate, bias correction, ...


class Phase(str, Enum):
    FORWARD = "forward"   # everything the loss depends on
    BACKWARD = "backward"


@dataclass(frozen=True)
class InputSpec:
    """One placeholder, in placeholder order."""

    name: str                 # parameter name (Model Zoo names) or batch field
    kind: InputKind
    trainable: bool           # False for batch fields, frozen and unused parameters
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class OutputSpec:
    """``loss``, ``logits``, ``grad`` of the parameter ``target``; a program that holds the update:
    ``param_update`` (the new value of the weight ``target``, which it replaces),
    ``state_update`` (optimizer state ``target``), ``grad_norm``, ``finite`` (float16)."""

    kind: str
    target: Optional[str] = None


class LayerKind(str, Enum):
    """What a ``NodeInfo.layer`` is in the model: stated by the model's anatomy
    (``mmgraph.models.anatomy.kind_of``) and recorded by the tracer, so passes read it and never
    parse layer names."""

    BLOCK = "block"              # a repeated transformer block: what recomputation decides per layer
    EMBEDDINGS = "embeddings"    # patch / token embeddings
    PROJECTION = "projection"    # the projector (and connectors) between encoders and the LLM
    HEAD = "head"                # the LLM's final norm and LM head
    LOSS = "loss"                # the loss after the head, and its backward
    OTHER = "other"              # the model's own forward (image scatter), nodes passes add


@dataclass(frozen=True)
class NodeInfo:
    shape: tuple[int, ...]
    dtype: Optional[torch.dtype]
    module: str               # module path it came from ('' when none)
    layer: str                # e.g. 'text_model.layers.3', 'image_model.encoder0.layers.1', 'head'
    phase: Phase
    flops: int
    bytes: int
    kind: LayerKind = LayerKind.OTHER


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Kernel:
    """Ops the fusion pass grouped into one kernel (names of graph nodes, in order)."""

    id: int
    kind: str        # elementwise | reduction | matmul | attention | opaque
    layer: str
    phase: str
    nodes: tuple[str, ...]
    flops: int
    internal_bytes: int   # bytes of intermediates that never leave the kernel


@dataclass(frozen=True)
class Segment:
    """Kernels that run with one set of streamed weights (normally one layer, one phase)."""

    id: int
    phase: str
    layers: tuple[str, ...]
    kernels: tuple[int, ...]
    weights: tuple[str, ...]      # parameters streamed in for this segment
    weight_bytes: int
    grads: tuple[str, ...]        # trainable parameters whose gradients stream out
    grad_bytes: int
    grad_params: int              # elements updated by the optimizer for these gradients
    flops: int
    saved_bytes: int              # activations made here and kept for backward (on the device)
    freed_bytes: int              # kept activations whose last reader runs here
    working_bytes: int            # largest kernel working set (inputs + outputs), for one piece
    offload_bytes: int = 0        # kept activations made here and streamed out to external memory
    reload_bytes: int = 0         # offloaded activations streamed back in before this segment runs
    pieces: int = 1               # the micro-batch runs through this segment in this many pieces

    @property
    def name(self) -> str:
        layers = self.layers[0] if len(self.layers) == 1 else f"{self.layers[0]} .. {self.layers[-1]}"
        return f"{self.phase} {layers}"


@dataclass(frozen=True)
class SegmentTime:
    compute_s: float
    stream_in_s: float
    stream_out_s: float
    optimizer_s: float
    in_start: float
    in_end: float
    start: float
    end: float
    out_end: float
    opt_end: float
    live_bytes: int               # kept activations + this segment's working set
    bottleneck: str               # compute | stream-in | stream-out
    piece_overhead_s: float = 0.0  # of compute_s: the cost of running the micro-batch in pieces
    reload_s: float = 0.0         # of stream_in_s: offloaded activations coming back
    offload_s: float = 0.0        # of stream_out_s: kept activations going out


@dataclass(frozen=True)
class Schedule:
    target: str
    precision: str
    micro_batch_size: int
    batch_size: int
    tokens_per_sample: int
    times: tuple[SegmentTime, ...]
    micro_step_s: float           # one micro-batch, forward + backward, streams overlapped
    optimizer_tail_s: float       # optimizer work left after the last gradient arrives
    step_s: float                 # a whole batch: micro-steps + optimizer tail
    samples_per_s: float
    tokens_per_s: float
    utilization: float            # model FLOPs / (step time x peak)
    weight_bytes_in: int          # per micro-step
    grad_bytes_out: int           # per micro-step
    peak_memory_bytes: int
    weight_buffer_bytes: int
    memory_bytes: int
    fits: bool
    max_micro_batch_size: int
    recompute_flops: int = 0      # per micro-step, made again in the backward (remat)
    recompute_s: float = 0.0      # their share of the micro-step's compute time
    compute_s: float = 0.0        # per micro-step, summed over segments
    stream_in_s: float = 0.0
    stream_out_s: float = 0.0
    bottleneck: str = ""          # compute | stream-in | stream-out: the largest of the three
    real_token_share: float = 1.0  # of each row, from the data's statistics (packing raises it)
    offload_bytes: int = 0        # per micro-step, kept activations streamed out (and back in)
    piece_overhead_s: float = 0.0  # per micro-step, compute time spent on running in pieces
    micro_steps: int = 1          # micro-batches per step (the last may be smaller)

    @property
    def real_tokens_per_s(self) -> float:
        """Non-pad tokens per second: what padding does not waste."""
        return self.tokens_per_s * self.real_token_share


@dataclass(frozen=True)
class RematLayer:
    """What the remat pass decided for one layer: the forward values its backward keeps and
    the ones it recomputes (names of the original forward nodes), with their sizes."""

    layer: str
    policy: str                   # none | selective | full
    kept: tuple[str, ...]
    recomputed: tuple[str, ...]
    kept_bytes: int               # activations of this layer kept across forward/backward
    recomputed_bytes: int         # made again in the backward (one layer's extra working set)
    saved_bytes: int              # kept_bytes of policy none minus kept_bytes here
    extra_flops: int


@dataclass(frozen=True)
class RematPlan:
    """The remat pass's result: per layer, and the peak-memory arithmetic behind the choice."""

    policy: str                   # as requested: none | selective | full | auto
    layers: tuple[RematLayer, ...]
    clones: tuple[str, ...]       # backward nodes that recompute a forward value
    kept_bytes: int               # every activation crossing the forward/backward boundary
    layer_work_bytes: int         # largest one layer's recomputed values
    attention_scores_bytes: int   # largest attention score tensor a layer materializes
    kernel_work_bytes: int        # largest kernel working set (inputs + outputs)
    weight_buffer_bytes: int      # two weight buffers (0 when weights stay on the device)
    estimated_peak_bytes: int
    memory_bytes: int             # the target's memory (0: no target)

    @property
    def extra_flops(self) -> int:
        return sum(layer.extra_flops for layer in self.layers)

    def policy_of(self, layer: str) -> str:
        return next((x.policy for x in self.layers if x.layer == layer), "none")


@dataclass(frozen=True)
class MemoryPlan:
    """How the step fits the device (passes/memory.py): the mechanisms the compiler chose among
    the target's (``mechanisms`` in its YAML), with what each costs, and the estimated peak.

    - recompute: per layer in the RematPlan (none | selective | full);
    - pieces: a segment whose working set does not fit runs the micro-batch in pieces
      (``segment_pieces``; the smallest is ``piece_samples``, ``pieces`` of them), so its working
      set is one piece's, at the target's overhead per piece and segment;
    - offload: the kept activations of ``offloaded`` layers stream out to external memory in the
      forward pass and back in before their backward segment (over the weight link).
    """

    micro_batch_size: int
    pieces: int
    piece_samples: int
    offloaded: tuple[str, ...]        # layers whose kept activations leave the device
    offload_bytes: int                # per micro-step, out in the forward and back in the backward
    kept_bytes: int                   # kept activations resident on the device (after offload)
    working_bytes: int                # the largest segment working set, one piece (recomputed values included)
    buffer_bytes: int                 # weight buffers (or resident weights)
    estimated_peak_bytes: int
    memory_bytes: int
    estimated_step_s: float           # per micro-step, the planner's estimate (the cost pass simulates)
    recompute_s: float                # estimated compute time of the recomputation, per micro-step
    piece_overhead_s: float           # per micro-step
    offload_s: float                  # per micro-step, stream time of offload out + back in (maybe hidden)
    fits: bool
    mechanisms: tuple[str, ...]       # the mechanisms used, in words (recompute, pieces, offload)
    available: tuple[str, ...]        # the target's mechanisms
    note: str = ""                    # why: the choice in a sentence
    # (layer, phase, piece samples) of the segments that run in pieces; the others run whole
    segment_pieces: tuple[tuple[str, str, int], ...] = ()

    def piece_for(self, layer: str, phase: str) -> int:
        """The piece size a segment of ``layer`` in ``phase`` runs in (the micro-batch: whole)."""
        return next((q for lay, ph, q in self.segment_pieces if lay == layer and ph == phase), self.micro_batch_size)


@dataclass(frozen=True)
class Bucket:
    """Gradients reduced by one collective: output positions, in backward order."""

    index: int
    outputs: tuple[int, ...]     # positions in the program's outputs
    targets: tuple[str, ...]     # the parameters whose gradients these are
    dtype: torch.dtype
    numel: int                   # elements of the flat bucket (padded to the world size when sharded)
    bytes: int
    issue_after: str             # the node after which the collective is issued
    collective: str              # node name of the collective
    shapes: tuple[tuple[int, ...], ...] = ()   # of the gradients, in bucket order


ANNOTATIONS = ("kernels", "segments", "schedule", "remat", "memory")   # a Program's optional analyses


@dataclass(frozen=True)
class Contract:
    """What a pass needs and leaves among a Program's annotations (``ANNOTATIONS``): the
    pipeline refuses to run it without ``requires``, checks ``provides`` after it, and clears
    what it ``invalidates`` and does not provide again (a graph change makes them stale)."""

    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    invalidates: tuple[str, ...] = ()


GRAPH_CHANGE = Contract(invalidates=ANNOTATIONS)      # a rewrite before fusion: nothing derived survives


@dataclass(frozen=True)
class Program:
    gm: fx.GraphModule
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    info: dict[str, NodeInfo]
    mode: str
    precision: str = "fp32"            # what the trace computes in: fp32, or bf16/fp16 (autocast)
    history: tuple[PassRecord, ...] = ()
    kernels: Optional[tuple[Kernel, ...]] = None
    refusals: tuple[tuple[str, str, str], ...] = ()   # (node, producer, reason) fusion refused
    segments: Optional[tuple[Segment, ...]] = None
    schedule: Optional[Schedule] = None
    remat: Optional[RematPlan] = None
    memory: Optional[MemoryPlan] = None
    world_size: int = 1                # ranks the data_parallel pass compiled the program for
    collectives: tuple[Bucket, ...] = ()   # data_parallel's buckets

    def ops(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    @property
    def batch_size(self) -> int:
        """The (micro-)batch the program was traced for: the leading size of its batch inputs."""
        return next(s.shape[0] for s in self.inputs if s.kind == InputKind.BATCH and s.shape)

    def flops(self, phase: Optional[Phase] = None) -> int:
        return sum(i.flops for n, i in self.info.items() if phase is None or i.phase == phase)

    def kernel_dag(self):
        """Kernels as networkx nodes (ids), data dependencies between them as edges."""
        import networkx as nx

        owner = {name: k.id for k in self.kernels for name in k.nodes}
        dag = nx.DiGraph()
        dag.add_nodes_from(k.id for k in self.kernels)
        for node in self.ops():
            for a in node.all_input_nodes:
                if a.name in owner and node.name in owner and owner[a.name] != owner[node.name]:
                    dag.add_edge(owner[a.name], owner[node.name])
        return dag

    def with_pass_result(self, gm: fx.GraphModule, info: dict[str, NodeInfo],
                         outputs: Optional[tuple[OutputSpec, ...]] = None) -> "Program":
        """A new Program with a pass's graph (history is appended by the pipeline)."""
        return replace(self, gm=gm, info=info, outputs=self.outputs if outputs is None else outputs)

    def recorded(self, record: PassRecord) -> "Program":
        return replace(self, history=self.history + (record,))
