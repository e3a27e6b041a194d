"""How a step fits its target, for a person: the micro-batch ``auto`` / ``explore`` chooses (the
best predicted throughput that fits, ``mmgraph.compiler.pipeline.choose_micro_batch``) and the
size words the compile summary uses. ``mmgraph compile`` and ``mmgraph run`` both choose here."""

from __future__ import annotations

from mmgraph.compiler.pipeline import choose_micro_batch as choose
from mmgraph.core.config import micro_batch_search
from mmgraph.core.errors import Problem, UserError


def input_section(mode: str) -> str:
    return "eval_input" if mode == "eval" else "train_input"


def human_gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def human_size(n: float) -> str:
    return human_gb(n) if n >= 1e9 else f"{n / 1e6:.2f} MB"


def choose_micro_batch(params, mode: str, target, remat=None, search=None) -> tuple[int, str]:
    """``micro_batch_size: auto`` (the divisors of batch_size) or ``explore`` (every micro-batch
    in its range, as a table): the micro-batch with the best predicted throughput that fits
    (mmgraph.compiler.pipeline.choose_micro_batch)."""
    data = params.input_for(mode)
    search = search or micro_batch_search(data.micro_batch_size, data.batch_size) or \
        micro_batch_search("auto", data.batch_size)
    choice = choose(params, mode, target, remat, search.sizes(data.batch_size))
    if choice is None:
        raise UserError(Problem(params.path, f"{input_section(mode)}.micro_batch_size",
                                f"{search.kind}: not even the smallest candidate ({search.low}) fits on {target.name} "
                                f"with its mechanisms ({', '.join(target.mechanisms.names())}) "
                                f"(compile with micro_batch_size: {search.low} for the arithmetic)"))
    if search.kind == "explore":
        print(explore_table(choice, target, search))
    else:
        tried = ", ".join(f"{p.micro_batch_size} ({_plan_words(p)}{'' if p.fits else ', does not fit'}): "
                          f"{p.samples_per_s:,.1f} samples/s" for p in choice.candidates)
        print(f"micro_batch_size auto: {choice.micro_batch_size} with remat {choice.policy} "
              f"(best predicted throughput on {target.name} of {tried})")
    return choice.micro_batch_size, choice.policy


def _plan_words(p) -> str:
    """A plan's mechanisms in a few words: recompute per layer, pieces, offload."""
    counts = ", ".join(f"{n} {pol}" for pol, n in sorted(p.counts().items())) or "no layers"
    words = [f"recompute {counts}"]
    if p.pieces > 1:
        words.append(f"pieces down to {p.piece_samples}")
    if p.offloaded:
        words.append(f"offload {len(p.offloaded)} layers")
    return "; ".join(words)


def explore_table(choice, target, search) -> str:
    """``micro_batch_size: explore``: every candidate's fit, recompute policy, mechanisms and
    predicted samples/s, as the Model Zoo's explore reports them."""
    lines = [f"micro_batch_size explore on {target.name}: {search.low} .. {search.high} "
             f"(figures scaled from the step traced at micro-batch {choice.probe}; mechanisms available: "
             f"{', '.join(target.mechanisms.names()) if target.stream_enabled else 'recompute'})",
             f"{'mbs':>5} {'fits':>5} {'peak':>10} {'recompute (layers)':<24} {'pieces':>14} {'offload':>8} "
             f"{'micro-step ms':>14} {'samples/s':>10}"]
    for p in choice.candidates:
        counts = ", ".join(f"{n} {pol}" for pol, n in sorted(p.counts().items())) or "-"
        pieces = f"{p.pieces} of {p.piece_samples}" if p.pieces > 1 else "-"
        offload = f"{len(p.offloaded)} layers" if p.offloaded else "-"
        mark = "  <- best" if p.micro_batch_size == choice.micro_batch_size else ""
        lines.append(f"{p.micro_batch_size:>5} {'yes' if p.fits else 'no':>5} {human_size(p.peak_bytes):>10} {counts:<24} "
                     f"{pieces:>14} {offload:>8} {p.step_s * 1e3:>14.1f} {p.samples_per_s:>10.1f}{mark}")
    lines.append(f"micro_batch_size explore: {choice.micro_batch_size} (the best predicted throughput that fits; "
                 f"compiled below)")
    return "\n".join(lines)
