"""Line plots as SVG, written by hand so that the experiments need no plotting library: panels
side by side, a line per series, optional min-max bars, a legend."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 460, 300, 56, 12, 28, 44


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    # name -> (xs, ys) or (xs, ys, lows, highs)
    series: Dict[str, Tuple[Sequence[float], ...]]
    xticks: Optional[List[str]] = None  # labels at x = 0, 1, ... (categorical x)
    ymin: Optional[float] = None
    extra: dict = field(default_factory=dict)


def _ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2, 2.5 or 5 times a power of ten."""
    if hi <= lo:
        hi = lo + 1.0
    mag = 10.0 ** math.floor(math.log10((hi - lo) / count))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= (hi - lo) / count)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) < 1e5 else f"{v:.0e}"


def _panel(p: Panel, x0: float, names: List[str]) -> List[str]:
    pts = [(x, y) for s in p.series.values() for x, y in zip(s[0], s[1])]
    lows = [v for s in p.series.values() if len(s) > 2 for v in s[2]]
    highs = [v for s in p.series.values() if len(s) > 3 for v in s[3]]
    xs = [x for x, _ in pts] or [0.0, 1.0]
    ys = [y for _, y in pts] + lows + highs or [0.0, 1.0]
    xlo, xhi = (-0.3, len(p.xticks) - 0.7) if p.xticks else (min(xs), max(xs))
    ylo = p.ymin if p.ymin is not None else min(ys)
    yt = _ticks(ylo, max(ys))
    ylo, yhi = min(yt[0], ylo), max(yt[-1], max(ys))
    if xhi <= xlo:
        xhi = xlo + 1.0
    if yhi <= ylo:
        yhi = ylo + 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    X = lambda v: x0 + LEFT + (v - xlo) / (xhi - xlo) * pw
    Y = lambda v: TOP + ph - (v - ylo) / (yhi - ylo) * ph
    out = [f'<text x="{x0 + LEFT + pw / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(p.title)}</text>',
           f'<rect x="{x0 + LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for v in yt:
        out.append(f'<line x1="{x0 + LEFT}" x2="{x0 + LEFT + pw}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 + LEFT - 4}" y="{Y(v) + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    xt = list(enumerate(p.xticks)) if p.xticks else [(v, _fmt(v)) for v in _ticks(xlo, xhi)]
    for v, name in xt:
        out.append(f'<text x="{X(v):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{escape(str(name))}</text>')
    out.append(f'<text x="{x0 + LEFT + pw / 2}" y="{H - 6}" text-anchor="middle">{escape(p.xlabel)}</text>')
    out.append(f'<text transform="translate({x0 + 14},{TOP + ph / 2}) rotate(-90)" text-anchor="middle">{escape(p.ylabel)}</text>')
    for name, s in p.series.items():
        c = COLORS[names.index(name) % len(COLORS)]
        line = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in zip(s[0], s[1]))
        out.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"/>')
        for i, (x, y) in enumerate(zip(s[0], s[1])):
            out.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="2.5" fill="{c}"/>')
            if len(s) > 3:
                out.append(f'<line x1="{X(x):.1f}" x2="{X(x):.1f}" y1="{Y(s[2][i]):.1f}" '
                           f'y2="{Y(s[3][i]):.1f}" stroke="{c}" stroke-width="1"/>')
    return out


def svg(path: Path, panels: List[Panel]) -> None:
    names = list(dict.fromkeys(n for p in panels for n in p.series))
    legend_h = 18 * len(names) + 8
    width, height = W * len(panels), H + legend_h
    body = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'font-family="sans-serif" font-size="11">', f'<rect width="100%" height="100%" fill="white"/>']
    for i, p in enumerate(panels):
        body += _panel(p, i * W, names)
    for i, name in enumerate(names):
        y = H + 12 + 18 * i
        c = COLORS[i % len(COLORS)]
        body.append(f'<line x1="{LEFT}" x2="{LEFT + 24}" y1="{y}" y2="{y}" stroke="{c}" stroke-width="2"/>')
        body.append(f'<text x="{LEFT + 30}" y="{y + 4}">{escape(name)}</text>')
    body.append("</svg>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(body) + "\n")
