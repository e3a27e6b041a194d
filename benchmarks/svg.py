"""Horizontal bar charts as plain SVG (no plotting library: matplotlib is not a dependency).

A chart is a list of bars, each with a label, a value and optionally a min-max whisker and a
series (which picks its colour); vertical reference lines mark a peer (1.0) or a target. The
output is deterministic (no dates, no ids), so a re-render without new results changes nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional
from xml.sax.saxutils import escape

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")


@dataclass
class Bar:
    label: str
    value: float
    lo: Optional[float] = None
    hi: Optional[float] = None
    series: str = ""
    note: str = ""            # printed after the value, e.g. "(3 repeats)"


@dataclass
class Line:
    value: float
    label: str
    color: str = "#444444"


def _ticks(top: float) -> list[float]:
    if top <= 0:
        return [0.0]
    raw = top / 5
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(top / step) + 1)]


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return f"{int(v):,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def hbar(title: str, bars: list[Bar], unit: str, lines: tuple[Line, ...] = (), width: int = 760) -> str:
    """An SVG document: one horizontal bar per entry, whiskers from ``lo`` to ``hi``."""
    left, right, top_m, row, bottom = 330, 110, 44, 24, 40
    width = max(width, 8 * len(title) + 40)          # room for the title
    plot_w = width - left - right
    series = list(dict.fromkeys(b.series for b in bars if b.series))
    legend = [ln for ln in lines if ln.label]
    height = top_m + row * max(len(bars), 1) + bottom + 16 * len(legend) + (22 if len(series) > 1 else 0) + 6
    top = max([b.hi if b.hi is not None else b.value for b in bars] + [ln.value for ln in lines] + [1e-12])
    top *= 1.08
    ticks = _ticks(top)
    top = max(top, ticks[-1])

    def x(v: float) -> float:
        return left + plot_w * max(v, 0.0) / top

    color = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2:.0f}" y="20" text-anchor="middle" font-size="14" font-weight="bold">'
           f'{escape(title)}</text>']
    base = top_m + row * len(bars)
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{top_m - 4}" x2="{x(t):.1f}" y2="{base}" stroke="#e0e0e0"/>')
        out.append(f'<text x="{x(t):.1f}" y="{base + 14}" text-anchor="middle" fill="#555">{_fmt(t)}</text>')
    out.append(f'<text x="{left + plot_w / 2:.0f}" y="{base + 30}" text-anchor="middle" fill="#333">'
               f'{escape(unit)}</text>')
    for i, b in enumerate(bars):
        y = top_m + row * i
        c = color.get(b.series, PALETTE[0])
        out.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end">{escape(b.label)}</text>')
        out.append(f'<rect x="{left}" y="{y + 4}" width="{x(b.value) - left:.1f}" height="{row - 8}" fill="{c}"/>')
        if b.lo is not None and b.hi is not None:
            ym = y + row / 2
            out.append(f'<line x1="{x(b.lo):.1f}" y1="{ym:.1f}" x2="{x(b.hi):.1f}" y2="{ym:.1f}" stroke="#222"/>')
            for v in (b.lo, b.hi):
                out.append(f'<line x1="{x(v):.1f}" y1="{ym - 5:.1f}" x2="{x(v):.1f}" y2="{ym + 5:.1f}" stroke="#222"/>')
        end = max(x(b.value), x(b.hi) if b.hi is not None else 0)
        out.append(f'<text x="{end + 6:.1f}" y="{y + 15}" fill="#222">{escape(_fmt(b.value) + (" " + b.note if b.note else ""))}</text>')
    for ln in lines:
        out.append(f'<line x1="{x(ln.value):.1f}" y1="{top_m - 8}" x2="{x(ln.value):.1f}" y2="{base}" '
                   f'stroke="{ln.color}" stroke-dasharray="5,3" stroke-width="1.5"/>')
    legend_y = base + 50
    for j, ln in enumerate(legend):                      # reference lines: legend under the axis
        y = legend_y + 16 * j
        out.append(f'<line x1="{left}" y1="{y - 4}" x2="{left + 24}" y2="{y - 4}" stroke="{ln.color}" '
                   f'stroke-dasharray="5,3" stroke-width="1.5"/>')
        out.append(f'<text x="{left + 30}" y="{y}" fill="{ln.color}">{escape(ln.label)}</text>')
    if len(series) > 1:                                   # series: legend at the bottom
        lx = left
        for s in series:
            out.append(f'<rect x="{lx}" y="{height - 14}" width="10" height="10" fill="{color[s]}"/>')
            out.append(f'<text x="{lx + 14}" y="{height - 5}">{escape(s)}</text>')
            lx += 34 + 7 * len(s)
    out.append("</svg>")
    return "\n".join(out) + "\n"
