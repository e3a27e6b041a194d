"""``report.html``: one self-contained page (inline SVG and CSS, no network) with the simulated
schedule as a timeline, memory over the step, and a per-segment table."""

from __future__ import annotations

from html import escape

_COLORS = {"compute": "#4c78a8", "in": "#f58518", "out": "#54a24b", "opt": "#b279a2"}


def _ms(s: float) -> str:
    return f"{s * 1e3:,.3f}"


def _timeline(segs: list[dict], width: int = 1100, row: int = 14) -> str:
    end = max((max(s["end_s"], s["out_end_s"]) for s in segs), default=0.0) or 1.0
    x = lambda t: 230 + (width - 240) * t / end  # noqa: E731
    height = 30 + row * len(segs)
    out = [f'<svg width="{width}" height="{height}" font-family="monospace" font-size="10">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, s in enumerate(segs):
        y = 20 + i * row
        out.append(f'<text x="2" y="{y + 10}">{escape(s["name"][:36])}</text>')
        bars = [("in", s["in_start_s"], s["in_end_s"]), ("compute", s["start_s"], s["end_s"]),
                ("out", s["end_s"] if s["stream_out_s"] else s["out_end_s"], s["out_end_s"])]
        for kind, a, b in bars:
            if b > a:
                off = {"in": 0, "compute": 4, "out": 8}[kind]
                out.append(f'<rect x="{x(a):.2f}" y="{y + off}" width="{max(x(b) - x(a), 0.5):.2f}" height="4" '
                           f'fill="{_COLORS[kind]}"><title>{kind} {_ms(a)}-{_ms(b)} ms</title></rect>')
    out.append(f'<text x="230" y="12">0 ms</text><text x="{width - 90}" y="12">{_ms(end)} ms</text>')
    return "\n".join(out + ["</svg>"])


def _memory(segs: list[dict], capacity: float, buffers: float, width: int = 1100, height: int = 180) -> str:
    peak = max([s["live_bytes"] + buffers for s in segs] + [capacity]) or 1.0
    n = max(len(segs), 1)
    y = lambda v: height - 20 - (height - 40) * v / peak  # noqa: E731
    out = [f'<svg width="{width}" height="{height}" font-family="monospace" font-size="10">',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, s in enumerate(segs):
        bx = 60 + (width - 70) * i / n
        bw = max((width - 70) / n - 1, 1)
        top = y(s["live_bytes"] + buffers)
        out.append(f'<rect x="{bx:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{height - 20 - top:.1f}" '
                   f'fill="#72b7b2"><title>{escape(s["name"])}: {(s["live_bytes"] + buffers) / 1e9:.3f} GB</title></rect>')
    cy = y(capacity)
    out.append(f'<line x1="60" x2="{width}" y1="{cy:.1f}" y2="{cy:.1f}" stroke="#e45756" stroke-dasharray="4"/>')
    out.append(f'<text x="62" y="{cy - 3:.1f}" fill="#e45756">device memory {capacity / 1e9:.1f} GB</text>')
    out.append(f'<text x="2" y="{height - 5}">segments in execution order</text>')
    return "\n".join(out + ["</svg>"])


def _remat(plan, t: dict) -> str:
    """Activation recomputation per layer: policy, kept and recomputed values, memory saved."""
    if not plan:
        return ""
    mb = lambda n: f"{n / 1e6:,.1f}"  # noqa: E731
    rows = "\n".join(
        f"<tr><td>{escape(x['layer'])}</td><td>{x['policy']}</td>"
        f"<td title=\"{escape(' '.join(x['kept']))}\">{len(x['kept'])} values, {mb(x['kept_bytes'])} MB</td>"
        f"<td title=\"{escape(' '.join(x['recomputed']))}\">{len(x['recomputed'])} ops, {mb(x['recomputed_bytes'])} MB</td>"
        f"<td>{mb(x['saved_bytes'])}</td><td>{x['extra_flops'] / 1e9:,.2f}</td></tr>" for x in plan["layers"])
    flops = t.get("recompute_flops_per_micro_step", plan["extra_flops"])
    return f"""<h2>Activation recomputation: {escape(plan['policy'])}</h2>
<p>Kept across forward/backward: {plan['kept_bytes'] / 1e9:,.2f} GB (saves {plan['saved_bytes'] / 1e9:,.2f} GB);
recomputed {flops / 1e12:,.3f} TFLOP per micro-batch ({t.get('recompute_s_per_micro_step', 0.0) * 1e3:,.3f} ms);
largest layer's recomputed values {plan['layer_work_bytes'] / 1e9:,.3f} GB, attention scores
{plan['attention_scores_bytes'] / 1e9:,.3f} GB. Hover a cell for the values' names.</p>
<table><tr><th>layer</th><th>policy</th><th>kept</th><th>recomputed</th><th>saved MB</th><th>extra GFLOP</th></tr>
{rows}</table>"""


def _memory_plan(mem) -> str:
    """How the step fits: the mechanisms the compiler chose among the target's (passes/memory.py)."""
    if not mem:
        return ""
    gb = lambda n: f"{n / 1e9:,.3f}"  # noqa: E731
    layers = mem["recompute"]["layers"]
    rows = [("recompute", ", ".join(f"{n} layers {p}" for p, n in layers.items() if n) or "none",
             f"{mem['recompute']['estimated_s'] * 1e3:,.2f} ms compute"),
            ("pieces", (f"{len(mem['pieces']['segments'])} segments in pieces, down to {mem['pieces']['pieces']} "
                        f"pieces of {mem['pieces']['smallest_piece_samples']} samples") if mem["pieces"]["segments"]
             else "none", f"{mem['pieces']['estimated_overhead_s'] * 1e3:,.2f} ms overhead"),
            ("offload", (f"{len(mem['offload']['layers'])} layers ({escape(mem['offload']['layers'][0])} .. "
                         f"{escape(mem['offload']['layers'][-1])}), {gb(mem['offload']['bytes'])} GB")
             if mem["offload"]["layers"] else "none", f"{mem['offload']['estimated_link_s'] * 1e3:,.2f} ms of link time")]
    body = "\n".join(f"<tr><th>{k}</th><td>{escape(v)}</td><td>{escape(c)}</td></tr>" for k, v, c in rows)
    return f"""<h2>Memory plan: {escape(', '.join(mem['mechanisms']) or 'no mechanism needed')}</h2>
<p>Estimated peak {gb(mem['estimated_peak_bytes'])} GB of {gb(mem['memory_bytes'])} GB: kept activations
{gb(mem['kept_bytes'])} GB + the largest working set {gb(mem['working_bytes'])} GB + weight buffers
{gb(mem['buffer_bytes'])} GB. Mechanisms the target offers: {escape(', '.join(mem['available']) or 'none')}.</p>
<table><tr><th>mechanism</th><th>chosen</th><th>cost per micro-step</th></tr>
{body}</table>"""


def _scaling(scaling) -> str:
    """Data parallelism on 1..16 systems (passes/scaling.py)."""
    if not scaling:
        return ""
    rows = "\n".join(
        f"<tr><td>{p['systems']}</td><td>{p['micro_steps']}</td><td>{_ms(p['step_s'])}</td>"
        f"<td>{p['samples_per_s']:,.1f}</td><td>{p['efficiency']:.1%}</td><td>{_ms(p['comm_s'])}</td>"
        f"<td>{_ms(p['hidden_s'])}</td></tr>" for p in scaling["points"])
    return f"""<h2>Data parallel on N systems ({escape(scaling['topology'])})</h2>
<p>The global batch split across N systems, each running the same program; efficiency is samples/s
over N times one system's (docs/distributed.md).</p>
<table><tr><th>systems</th><th>micro-steps each</th><th>step ms</th><th>samples/s</th><th>efficiency</th>
<th>exposed comm ms</th><th>hidden comm ms</th></tr>
{rows}</table>"""


def _cirh(cirh) -> str:
    """The vendor's lowering (torch-cirh-opt): CIRH ops by kind, or why it did not run."""
    if not cirh:
        return ""
    if "ops" not in cirh:
        return f"<h2>CIRH (Cerebras's lowering)</h2><p>Not run: {escape(cirh['found'])}.</p>"
    rows = "\n".join(f"<tr><td>{escape(k)}</td><td>{v:,}</td></tr>"
                     for k, v in sorted(cirh["ops"].items(), key=lambda kv: (-kv[1], kv[0])))
    mode = " in strict-soundness mode" if cirh.get("strict_soundness_mode") else ""
    return f"""<h2>CIRH (Cerebras's lowering)</h2>
<p>{escape(cirh['checked'])}, lowered by the vendor's own tool{mode}
(<code>{escape(cirh['command'])}</code>, {cirh['seconds']:.2f} s): {cirh['total_ops']:,} CIRH ops,
saved as <code>program.cirh.mlir</code>.</p>
<table><tr><th>CIRH op</th><th>count</th></tr>
{rows}</table>"""


def render_html(report: dict) -> str:
    t = report["target"]
    segs = t["segments"]
    rows = "\n".join(
        f"<tr><td>{s['id']}</td><td>{escape(s['name'])}</td><td>{s['kernels']}</td>"
        f"<td>{s['weight_bytes'] / 1e6:,.1f}</td><td>{s['grad_bytes'] / 1e6:,.1f}</td>"
        f"<td>{s['flops'] / 1e9:,.2f}</td><td>{_ms(s['compute_s'])}</td><td>{_ms(s['stream_in_s'])}</td>"
        f"<td>{_ms(s['stream_out_s'])}</td><td>{s['live_bytes'] / 1e9:,.3f}</td><td>{s['bottleneck']}</td></tr>"
        for s in segs)
    fit = "fits" if t["fits"] else f"does NOT fit (largest micro-batch that fits: {t['max_micro_batch_size']})"
    facts = [
        ("target", f"{t['name']}: {t['description']}"),
        ("params", report["params"]),
        ("precision", t["precision"]),
        ("micro-batch / batch", f"{t['micro_batch_size']} / {t['batch_size']}"),
        ("step", f"{_ms(t['step_s'])} ms ({_ms(t['micro_step_s'])} ms per micro-batch)"),
        ("throughput", f"{t['samples_per_s']:,.2f} samples/s, {t['tokens_per_s']:,.0f} tokens/s "
                       f"({t.get('real_tokens_per_s', t['tokens_per_s']):,.0f} real, non-pad)"),
        ("utilization", f"{t['utilization']:.2%} of peak"),
        ("streamed per micro-batch", f"weights in {t['weight_bytes_in_per_micro_step'] / 1e9:,.2f} GB, "
                                     f"gradients out {t['gradient_bytes_out_per_micro_step'] / 1e9:,.2f} GB"),
        ("memory", f"peak {t['peak_memory_bytes'] / 1e9:,.2f} GB of {t['memory_bytes'] / 1e9:,.1f} GB: {fit}"),
        ("bottlenecks", ", ".join(f"{k} segments {v}" for k, v in t["bottlenecks"].items())),
        ("the step is", t.get("bottleneck_words", "")),
    ]
    fact_rows = "\n".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in facts)
    notes = "".join(f"<li>{escape(x)}</li>" for x in t["sources"] + t["assumptions"])
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>mmgraph: {escape(t['name'])} report</title>
<style>
body {{ font-family: sans-serif; margin: 20px; color: #222; }}
table {{ border-collapse: collapse; font-size: 12px; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
th {{ background: #f3f3f3; text-align: left; }}
.key span {{ display: inline-block; width: 12px; height: 8px; margin: 0 4px 0 12px; }}
</style></head><body>
<h1>Simulated step on {escape(t['name'])}</h1>
<table>{fact_rows}</table>
<h2>Schedule</h2>
<div class="key"><span style="background:{_COLORS['in']}"></span>weights in
<span style="background:{_COLORS['compute']}"></span>compute
<span style="background:{_COLORS['out']}"></span>gradients out</div>
{_timeline(segs)}
<h2>Memory over the step</h2>
{_memory(segs, t['memory_bytes'], 2 * t['weight_buffer_bytes'])}
<h2>Segments</h2>
<table><tr><th>#</th><th>segment</th><th>kernels</th><th>weights MB</th><th>grads MB</th><th>GFLOP</th>
<th>compute ms</th><th>in ms</th><th>out ms</th><th>live GB</th><th>bottleneck</th></tr>
{rows}</table>
{_memory_plan(report.get("memory"))}
{_remat(report.get("remat"), t)}
{_scaling(report.get("scaling"))}
{_cirh(report.get("cirh"))}
<h2>Sources and assumptions</h2><ul>{notes}</ul>
</body></html>
"""
