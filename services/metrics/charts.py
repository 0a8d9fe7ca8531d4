"""SVG pictures of a cluster: the radar of its six features and its collaboration network.

Both are self-contained SVG 1.1 documents (no scripts, fonts, stylesheets or images from
elsewhere), drawn from the same numbers the JSON routes serve, so a browser, a slide or
a report can embed them as they are. Text is escaped; coordinates are rounded to 0.1.

* **Radar**: one axis per feature (0 at the centre, 1 at the rim, rings at quarters);
  a feature with no value is drawn at 0 and labelled "n/a".
* **Network**: the firms placed by a force-directed layout (networkx
  ``spring_layout``, fixed seed, so the same network gives the same picture), coloured
  by region with a legend, sized by degree; ties drawn thicker for more weight,
  conversation-only ties dashed. Each node carries a ``<title>`` (id, region, actor
  type) that browsers show on hover.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape, quoteattr

import networkx as nx

from services.metrics.config import MetricsConfig
from services.metrics.indicators import FEATURES

SVG_NS = "http://www.w3.org/2000/svg"
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
FONT = 'font-family="sans-serif"'


def _f(value: float) -> str:
    return f"{value:.1f}"


def _open(width: int, height: int, title: str) -> list[str]:
    return [
        f'<svg xmlns="{SVG_NS}" version="1.1" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]


def radar_svg(features: dict[str, float | None], title: str) -> str:
    """The six feature scores (0-1) as a radar chart."""
    keys = [k for k in features if k in FEATURES]
    width, height, cx, cy, radius = 560, 520, 280.0, 270.0, 170.0
    parts = _open(width, height, title)
    parts.append(
        f'<text x="{cx:.0f}" y="28" text-anchor="middle" font-size="16" {FONT}>'
        f"{escape(title)}</text>"
    )
    n = max(len(keys), 1)

    def point(i: int, r: float) -> tuple[float, float]:
        angle = -math.pi / 2 + 2 * math.pi * i / n
        return cx + r * math.cos(angle), cy + r * math.sin(angle)

    for ring in (0.25, 0.5, 0.75, 1.0):
        ring_points = " ".join(
            f"{_f(x)},{_f(y)}" for x, y in (point(i, radius * ring) for i in range(n))
        )
        parts.append(f'<polygon points="{ring_points}" fill="none" stroke="#cccccc"/>')
    for i, key in enumerate(keys):
        x, y = point(i, radius)
        parts.append(
            f'<line x1="{_f(cx)}" y1="{_f(cy)}" x2="{_f(x)}" y2="{_f(y)}" stroke="#cccccc"/>'
        )
        lx, ly = point(i, radius + 28)
        anchor = "middle" if abs(lx - cx) < 1 else ("start" if lx > cx else "end")
        score = features[key]
        shown = "n/a" if score is None else f"{score:.2f}"
        parts.append(
            f'<text x="{_f(lx)}" y="{_f(ly)}" text-anchor="{anchor}" font-size="12" {FONT}>'
            f"{escape(FEATURES[key])} ({shown})</text>"
        )
    shape = " ".join(
        f"{_f(x)},{_f(y)}"
        for x, y in (
            point(i, radius * min(1.0, max(0.0, features[k] or 0.0))) for i, k in enumerate(keys)
        )
    )
    parts.append(
        f'<polygon class="scores" points="{shape}" fill="#1f77b4" fill-opacity="0.35" '
        'stroke="#1f77b4" stroke-width="2"/>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def network_svg(graph: nx.Graph, config: MetricsConfig, title: str) -> str:
    """The collaboration network, nodes coloured by region."""
    width, height, margin, legend = 720, 560, 40.0, 150.0
    parts = _open(width, height, title)
    parts.append(
        f'<text x="{(width - legend) / 2:.0f}" y="24" text-anchor="middle" font-size="16" '
        f"{FONT}>{escape(title)}</text>"
    )
    nodes = sorted(graph.nodes)
    regions = sorted({graph.nodes[n]["region"] for n in nodes})
    colour = {r: PALETTE[i % len(PALETTE)] for i, r in enumerate(regions)}
    area_w, area_h = width - legend - 2 * margin, height - 2 * margin - 20
    position: dict[str, tuple[float, float]] = {}
    if nodes:
        ordered = nx.Graph()
        ordered.add_nodes_from(nodes)
        ordered.add_edges_from(
            (a, b, {"weight": graph.edges[a, b]["weight"]})
            for a, b in sorted(tuple(sorted(e)) for e in graph.edges)
        )
        layout = nx.spring_layout(ordered, seed=config.network.seed, weight="weight")
        xs = [float(layout[n][0]) for n in nodes]
        ys = [float(layout[n][1]) for n in nodes]
        span_x = (max(xs) - min(xs)) or 1.0
        span_y = (max(ys) - min(ys)) or 1.0
        for node, x, y in zip(nodes, xs, ys, strict=True):
            px = margin + (x - min(xs)) / span_x * area_w if len(nodes) > 1 else margin + area_w / 2
            py = margin + 20 + (y - min(ys)) / span_y * area_h if len(nodes) > 1 else height / 2
            position[node] = (px, py)
    top = max((d.get("weight", 0.0) for _, _, d in graph.edges(data=True)), default=1.0) or 1.0
    parts.append('<g class="edges" stroke="#888888" stroke-opacity="0.7">')
    for a, b in sorted(tuple(sorted(e)) for e in graph.edges):
        data = graph.edges[a, b]
        (x1, y1), (x2, y2) = position[a], position[b]
        stroke = 0.8 + 4 * data["weight"] / top
        dash = ' stroke-dasharray="4 3"' if data.get("work_weight", 0.0) <= 0 else ""
        parts.append(
            f'<line x1="{_f(x1)}" y1="{_f(y1)}" x2="{_f(x2)}" y2="{_f(y2)}" '
            f'stroke-width="{stroke:.2f}"{dash}/>'
        )
    parts.append("</g>")
    parts.append('<g class="nodes" stroke="#ffffff" stroke-width="1.5">')
    for node in nodes:
        data = graph.nodes[node]
        x, y = position[node]
        r = 6 + 2 * math.sqrt(graph.degree(node))
        label = f"{node} — {data['region']}, {data['actor_type'].replace('_', ' ')}"
        parts.append(
            f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{r:.1f}" fill="{colour[data["region"]]}" '
            f"data-firm={quoteattr(node)} data-region={quoteattr(data['region'])}>"
            f"<title>{escape(label)}</title></circle>"
        )
    parts.append("</g>")
    lx = width - legend + 10
    parts.append(f'<g class="legend" font-size="12" {FONT}>')
    parts.append(f'<text x="{lx}" y="{margin + 4:.0f}" font-weight="bold">Regions</text>')
    for i, region in enumerate(regions):
        y = margin + 24 + 20 * i
        parts.append(f'<circle cx="{lx + 6}" cy="{y - 4:.0f}" r="6" fill="{colour[region]}"/>')
        parts.append(f'<text x="{lx + 18}" y="{y:.0f}">{escape(region)}</text>')
    parts.append("</g>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
