"""``mmgraph check``: validate a params file and summarize the model it describes."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from mmgraph.core.config import Params, SequenceLayout, ViTModelConfig, load_params
from mmgraph.models import build_model, component_of
from mmgraph.models.freeze import FreezeReport
from mmgraph.runtime.data import describe_data


@dataclass(frozen=True)
class ComponentCount:
    name: str
    total: int
    trainable: int

    @property
    def frozen(self) -> int:
        return self.total - self.trainable


@dataclass(frozen=True)
class CheckSummary:
    params: Params
    mode: str
    components: list[ComponentCount]
    freeze: FreezeReport
    freeze_sizes: dict[str, int]
    layout: SequenceLayout
    data: Optional[str] = None      # the data the params point to, checked (when it exists)

    @property
    def total(self) -> ComponentCount:
        return ComponentCount("total", sum(c.total for c in self.components),
                              sum(c.trainable for c in self.components))


def check(path: str, mode: str = "train") -> CheckSummary:
    """Validate ``path`` for ``mode`` and count parameters on the meta device (no weights)."""
    params = load_params(path, mode)
    model, report = build_model(params, device="meta")
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    sizes = {}
    for name, p in model.named_parameters():
        entry = totals[component_of(name)]
        entry[0] += p.numel()
        entry[1] += p.numel() if p.requires_grad else 0
        sizes[name] = p.numel()
    components = [ComponentCount(k, *v) for k, v in totals.items()]
    freeze_sizes = {pat: sum(sizes[n] for n in names) for pat, names in report.matches.items()}

    return CheckSummary(params, mode, components, report, freeze_sizes, params.layout(mode),
                        describe_data(params, mode))


def format_summary(s: CheckSummary) -> str:
    lines = [f"params: {s.params.path} (mode {s.mode}): valid", ""]
    width = max(len(c.name) for c in s.components + [s.total])
    lines.append(f"{'component':<{width}}  {'parameters':>15}  {'trainable':>15}  {'frozen':>15}")
    for c in s.components + [s.total]:
        lines.append(f"{c.name:<{width}}  {c.total:>15,}  {c.trainable:>15,}  {c.frozen:>15,}")
    lines += ["", "freeze patterns (model.freeze):"]
    if not s.freeze.matches:
        lines.append("  none: every parameter trains")
    for pattern, names in s.freeze.matches.items():
        lines.append(f"  {pattern!r}: {len(names)} tensors, {s.freeze_sizes[pattern]:,} parameters")
    lay = s.layout
    lines += ["", "sequence layout:"]
    lines.append(f"  max_sequence_length {lay.max_sequence_length}, vocab_size {lay.vocab_size}")
    lines.append(f"  images per sample: up to {lay.max_num_img} of {'x'.join(map(str, lay.image_data_size))}")
    for i, entry in enumerate(s.params.model.image_model_list.image_models):
        vit = entry.image_model[0]
        if isinstance(vit, ViTModelConfig):
            gh, gw = vit.grid
            lines.append(f"  encoder {i}: {gh}x{gw} patches of {vit.patch_size[0]}x{vit.patch_size[1]}"
                         f"{' + CLS' if vit.prepend_cls_token else ''}, features after block "
                         f"{vit.num_layers_used} of {vit.num_hidden_layers}{' + final norm' if vit.uses_final_norm else ''} "
                         f"(image_layer_idx {vit.image_layer_idx})")
    mode = s.params.model.image_model_list.image_feature_select_mode
    conn = s.params.model.image_model_list.connector
    how = f"connector {conn.name}" if conn else f"image_feature_select_mode {mode}"
    lines.append(f"  tokens per image: {lay.num_patches} ({how})")
    lines.append(f"  text tokens at full images: {lay.max_sequence_length - lay.max_num_img * lay.num_patches}")
    data = s.params.input_for(s.mode)
    if data is not None:
        mbs = data.micro_batch_size
        lines.append(f"  batch_size {data.batch_size}" + (f", micro_batch_size {mbs}" if mbs else ""))
        split = s.params.micro_batch_sizes(s.mode)
        if len(split) > 1 and split[-1] != split[0]:
            lines.append(f"  micro-batches per step: {len(split) - 1} of {split[0]} and a last one of {split[-1]}")
    lines += _ignored_lines(s.params)
    if s.data:
        lines += ["", s.data]
    return "\n".join(lines)


def _ignored_lines(params: Params) -> list[str]:
    """Keys accepted but not used (Cerebras-only settings; see docs/params.md)."""
    if not params.ignored:
        return []
    lines = ["", f"ignored keys ({params.file_layout} layout; they change nothing here, see docs/params.md):"]
    lines += [f"  {where}: {why}" for where, why in params.ignored]
    return lines
