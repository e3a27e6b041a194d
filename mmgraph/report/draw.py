"""Drawings of the kernel graph: DOT text and a self-contained SVG (no graphviz needed).

Large programs are collapsed per layer and phase (one box per layer, with its kernel count)
so a 7B model stays readable.
"""

from __future__ import annotations

from html import escape

import networkx as nx

from mmgraph.core.ir import Program

COLLAPSE_ABOVE = 200
_FILL = {"matmul": "#9ecae1", "attention": "#fdae6b", "reduction": "#a1d99b",
         "elementwise": "#e0e0e0", "opaque": "#fbb4c4", "layer": "#dadaeb"}


def kernel_graph(program: Program) -> nx.DiGraph:
    """Kernels as nodes, data dependencies as edges (collapsed per layer when large)."""
    g = program.kernel_dag()
    for k in program.kernels:
        g.nodes[k.id].update(label=f"k{k.id} {k.kind}\\n{k.layer}\\n{len(k.nodes)} ops", kind=k.kind,
                             phase=k.phase, layer=k.layer, flops=k.flops)
    if g.number_of_nodes() <= COLLAPSE_ABOVE:
        return g
    return _collapse(g)


def _collapse(g: nx.DiGraph) -> nx.DiGraph:
    key = {n: (d["layer"], d["phase"]) for n, d in g.nodes(data=True)}
    out = nx.DiGraph()
    for n, d in g.nodes(data=True):
        k = key[n]
        if k not in out:
            out.add_node(k, count=0, flops=0, kind="layer", phase=d["phase"])
        out.nodes[k]["count"] += 1
        out.nodes[k]["flops"] += d["flops"]
    for a, b in g.edges():
        if key[a] != key[b]:
            out.add_edge(key[a], key[b])
    for k, d in out.nodes(data=True):
        d["label"] = f"{k[0]}\\n{k[1]}: {d['count']} kernels"
    return nx.relabel_nodes(out, {k: f"{k[0]}/{k[1]}" for k in list(out.nodes)})


def to_dot(g: nx.DiGraph, title: str = "kernels") -> str:
    ids = {n: i for i, n in enumerate(g.nodes)}
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, style=filled, fontname=monospace];"]
    for n, d in g.nodes(data=True):
        color = _FILL.get(d.get("kind"), "#ffffff")
        lines.append(f'  n{ids[n]} [label="{d["label"]}", fillcolor="{color}"];')
    lines += [f"  n{ids[a]} -> n{ids[b]};" for a, b in g.edges()]
    return "\n".join(lines + ["}"]) + "\n"


def to_svg(g: nx.DiGraph, box_w: int = 190, box_h: int = 46, gap_x: int = 20, gap_y: int = 34) -> str:
    """Layered drawing: each topological generation is one row. A collapsed graph may have
    cycles (a layer used before and after another); the members of a cycle share a row."""
    dag = nx.condensation(g)
    rows = [[n for scc in generation for n in sorted(dag.nodes[scc]["members"], key=str)]
            for generation in nx.topological_generations(dag)]
    pos = {}
    for r, row in enumerate(rows):
        for c, n in enumerate(row):
            pos[n] = (10 + c * (box_w + gap_x), 10 + r * (box_h + gap_y))
    width = 20 + max(len(row) for row in rows) * (box_w + gap_x) if rows else 100
    height = 20 + len(rows) * (box_h + gap_y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="10">']
    for a, b in g.edges():
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(f'<line x1="{x1 + box_w / 2}" y1="{y1 + box_h}" x2="{x2 + box_w / 2}" y2="{y2}" '
                   f'stroke="#888" stroke-width="0.7"/>')
    for n, d in g.nodes(data=True):
        x, y = pos[n]
        fill = _FILL.get(d.get("kind"), "#ffffff")
        out.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}" stroke="#444"/>')
        for i, line in enumerate(d["label"].split("\\n")[:3]):
            out.append(f'<text x="{x + 4}" y="{y + 13 + 13 * i}">{escape(line[:30])}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"
