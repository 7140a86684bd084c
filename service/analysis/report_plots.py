"""The report's plots as inline SVG strings, written by hand (no plotting library): scatter, heat map, line plots.

One visual code per meaning, the same on every plot of the page:

- a **true label** is a colour (`LABEL_PALETTE`, Okabe-Ito then a few more hues), always on a circle;
- a **cluster** is a marker shape (`cluster_marker`) in neutral ink: eight shapes filled dark, then hollow,
  then filled mid-grey; noise is a light-grey cross;
- a **count** (the heat map) is a grey ramp with its scale drawn beside it;
- line plots use neutral inks (solid dark, dashed grey), so no hue of the page means two things.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from service.types import NOISE, Contingency

LABEL_PALETTE = (
    *("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9"),
    *("#8C564B", "#BCBD22", "#17BECF", "#F0E442"),
)
"""Colours of the true labels, in the order of the sorted class names (cycled beyond ten)."""

INK = "#1a1a1a"
"""Dark neutral ink: filled cluster markers, the first series of a line plot."""
MID_INK = "#6e6e6e"
"""Mid-grey ink: the third marker variant, the second series of a line plot."""
NOISE_COLOUR = "#b0b0b0"
"""Noise (cluster -1)."""
CLUSTER_COLOURS = frozenset({INK, MID_INK, NOISE_COLOUR, "none"})
"""Every fill or stroke a cluster marker uses (besides white outlines); disjoint from `LABEL_PALETTE`."""

SHAPES = ("circle", "square", "triangle", "diamond", "triangle-down", "plus", "x", "star")
"""Cluster marker shapes, in cluster order."""

HEAT_LOW = (255, 255, 255)
HEAT_HIGH = (77, 77, 77)
"""The heat map's grey ramp, from an empty cell to the fullest one."""


def _plus(w: float) -> list[tuple[float, float]]:
    return [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]


def _rotate(points: list[tuple[float, float]], degrees: float) -> list[tuple[float, float]]:
    a = math.radians(degrees)
    c, s = math.cos(a), math.sin(a)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _star(outer: float = 1.2, inner: float = 0.5) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        r = outer if i % 2 == 0 else inner
        a = math.radians(-90 + 36 * i)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


_POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)],
    "triangle": [(0, -1.15), (1.05, 0.75), (-1.05, 0.75)],
    "diamond": [(0, -1.25), (1.0, 0), (0, 1.25), (-1.0, 0)],
    "triangle-down": [(0, 1.15), (1.05, -0.75), (-1.05, -0.75)],
    "plus": _plus(0.36),
    "x": _rotate(_plus(0.36), 45),
    "star": _star(),
}


@dataclass(frozen=True, slots=True)
class Marker:
    """How one point is drawn: a shape from `SHAPES`, a fill ("none" for hollow) and a stroke."""

    shape: str
    fill: str
    stroke: str

    def svg(self, x: float, y: float, r: float, *, title: str | None = None, extra: str = "") -> str:
        """The SVG element of this marker centred on (x, y) with radius about `r`; `title` becomes its tooltip."""
        stroke_width = 1.6 if self.fill == "none" else 0.6
        paint = f'fill="{self.fill}" stroke="{self.stroke}" stroke-width="{stroke_width}"{extra}'
        tip = "" if title is None else f"<title>{html.escape(title)}</title>"
        if self.shape == "circle":
            return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" {paint}>{tip}</circle>'
        points = " ".join(f"{x + px * r:.1f},{y + py * r:.1f}" for px, py in _POLYGONS[self.shape])
        return f'<polygon points="{points}" {paint}>{tip}</polygon>'

    def icon(self, size: int = 14) -> str:
        """A small standalone SVG of the marker, for a heading or a table cell."""
        return (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" class="icon" aria-hidden="true">'
            f"{self.svg(size / 2, size / 2, size / 2 - 2.5)}</svg>"
        )


def cluster_marker(cluster: int) -> Marker:
    """The marker of a cluster: its shape cycles through `SHAPES`; each round of eight changes the fill."""
    if cluster == NOISE:
        return Marker("x", NOISE_COLOUR, NOISE_COLOUR)
    shape = SHAPES[cluster % len(SHAPES)]
    variant = (cluster // len(SHAPES)) % 3
    if variant == 0:
        return Marker(shape, INK, "#ffffff")
    if variant == 1:
        return Marker(shape, "none", INK)
    return Marker(shape, MID_INK, "#ffffff")


def label_colours(classes: Sequence[str]) -> dict[str, str]:
    """The colour of each class, by its position in `classes` (pass them sorted for a stable page)."""
    return {c: LABEL_PALETTE[i % len(LABEL_PALETTE)] for i, c in enumerate(classes)}


def label_marker(colour: str) -> Marker:
    return Marker("circle", colour, "#ffffff")


def cluster_name(cluster: int) -> str:
    return "noise" if cluster == NOISE else f"cluster {cluster}"


# -- axes -----------------------------------------------------------------------------------------------------------


def fmt(v: float) -> str:
    """A number as the report prints it: 3 significant decimals, `n/a` for NaN/inf, integers without decimals."""
    if not math.isfinite(v):
        return "n/a"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v - round(v)) > 1e-9 else str(round(v))


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About `n` round tick values between `lo` and `hi`."""
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def data_range(v: np.ndarray) -> tuple[float, float]:
    """The finite min..max of `v`, padded by 5 % (0..1 when nothing is finite)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * 0.05 or 1.0
    return lo - pad, hi + pad


@dataclass(frozen=True, slots=True)
class Frame:
    """A plot area: data ranges mapped onto a `width`×`height` SVG with margins for the axes."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int = 420
    height: int = 320
    left: int = 60
    right: int = 16
    top: int = 16
    bottom: int = 44

    def sx(self, x: float) -> float:
        span = self.x1 - self.x0 or 1.0
        return self.left + (x - self.x0) / span * (self.width - self.left - self.right)

    def sy(self, y: float) -> float:
        span = self.y1 - self.y0 or 1.0
        return self.height - self.bottom - (y - self.y0) / span * (self.height - self.top - self.bottom)

    def axes(self, xlabel: str, ylabel: str, *, integer_x: bool = False) -> list[str]:
        """The frame, the ticks of both axes and the two axis titles (class `axis-title`, `data-axis` x / y)."""
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.width - self.left - self.right}" '
            f'height="{self.height - self.top - self.bottom}" fill="none" stroke="#888"/>'
        ]
        xt = ticks(self.x0, self.x1)
        if integer_x:
            xt = sorted({round(t) for t in xt if abs(t - round(t)) < 1e-9})
        for t in xt:
            x = self.sx(t)
            out.append(
                f'<line x1="{x:.1f}" y1="{self.height - self.bottom}" x2="{x:.1f}" '
                f'y2="{self.height - self.bottom + 4}" stroke="#888"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{self.height - self.bottom + 16}" text-anchor="middle">{fmt(t)}</text>')
        for t in ticks(self.y0, self.y1):
            y = self.sy(t)
            out.append(f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{self.left}" y2="{y:.1f}" stroke="#888"/>')
            out.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{fmt(t)}</text>')
        out.append(
            f'<text class="axis-title" data-axis="x" x="{(self.left + self.width - self.right) / 2:.0f}" '
            f'y="{self.height - 8}" text-anchor="middle">{html.escape(xlabel)}</text>'
        )
        cy = (self.top + self.height - self.bottom) / 2
        out.append(
            f'<text class="axis-title" data-axis="y" transform="translate(14,{cy:.0f}) rotate(-90)" '
            f'text-anchor="middle">{html.escape(ylabel)}</text>'
        )
        return out


def svg(body: Sequence[str], width: int, height: int, label: str, *, plot: str) -> str:
    """Wrap SVG elements in a root `<svg>` with an accessible label; `plot` names it (`data-plot`)."""
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(label)}" data-plot="{plot}" font-family="sans-serif" font-size="11">'
        + "".join(body)
        + "</svg>"
    )


# -- plots ----------------------------------------------------------------------------------------------------------


def scatter_svg(
    points: np.ndarray,
    markers: Sequence[Marker],
    tips: Sequence[str],
    legend: Sequence[tuple[str, Marker]],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    plot: str,
) -> str:
    """A scatter plot of 2-D `points`, each drawn with its marker and hovering its tip, with a legend on the right."""
    f = Frame(*data_range(points[:, 0]), *data_range(points[:, 1]), width=440, height=360)
    body = f.axes(xlabel, ylabel)
    for (x, y), m, tip in zip(points.tolist(), markers, tips, strict=True):
        body.append(m.svg(f.sx(x), f.sy(y), 4.8, title=tip, extra=' class="point" fill-opacity="0.85"'))
    for i, (name, m) in enumerate(legend):
        y = 26 + 18 * i
        body.append(f'<g class="legend">{m.svg(f.width + 8, y - 4, 5.0)}')
        body.append(f'<text x="{f.width + 20}" y="{y}">{html.escape(name)}</text></g>')
    return svg(body, f.width + 140, f.height, title, plot=plot)


def heat_colour(t: float) -> str:
    """The grey of a cell filled to `t` of the fullest (0..1)."""
    t = min(max(t, 0.0), 1.0)
    r, g, b = (round(lo + (hi - lo) * t) for lo, hi in zip(HEAT_LOW, HEAT_HIGH, strict=True))
    return f"rgb({r},{g},{b})"


def heatmap_svg(
    table: Contingency,
    order: Sequence[int],
    matched: set[tuple[int, int]],
    colours: dict[str, str],
) -> str:
    """The cluster-by-class table as a heat map: rows are `table.clusters[i]` for `i` in `order`, columns the
    classes (with their label colour); `matched` (row, column) index pairs get a thick outline. Beside it, the
    colour scale (`<g id="heatmap-scale">`) from 0 to the fullest cell."""
    rows, cols = len(order), len(table.classes)
    cell, left, top = 64, 112, 64
    peak = max(int(table.counts.max()) if table.counts.size else 0, 1)
    grid_w = cols * cell
    width, height = left + grid_w + 110, max(top + rows * cell + 24, top + 200)
    body = [f'<text x="{left + grid_w / 2:.0f}" y="16" text-anchor="middle">class (ground truth)</text>']
    for j, c in enumerate(table.classes):
        x = left + j * cell + cell / 2
        body.append(
            f'<circle cx="{x:.0f}" cy="{top - 30}" r="5" fill="{colours[c]}"/>'
            f'<text class="col" data-class="{html.escape(c)}" x="{x:.0f}" y="{top - 10}" text-anchor="middle" '
            f'font-weight="bold">{html.escape(c)}</text>'
        )
    for pos, i in enumerate(order):
        k = table.clusters[i]
        y = top + pos * cell
        body.append(cluster_marker(k).svg(14, y + cell / 2, 5.0))
        body.append(
            f'<text class="row" data-cluster="{k}" x="{left - 8}" y="{y + cell / 2 + 4:.0f}" '
            f'text-anchor="end">{cluster_name(k)}</text>'
        )
        for j in range(cols):
            v = int(table.counts[i, j])
            t = v / peak
            x = left + j * cell
            ink = "#fff" if t > 0.55 else "#222"
            body.append(
                f'<rect class="cell" data-cluster="{k}" data-class="{html.escape(table.classes[j])}" data-count="{v}" '
                f'x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{heat_colour(t)}" stroke="#fff"/>'
            )
            if (i, j) in matched:
                body.append(
                    f'<rect class="matched" data-cluster="{k}" data-class="{html.escape(table.classes[j])}" '
                    f'x="{x + 3}" y="{y + 3}" width="{cell - 6}" height="{cell - 6}" '
                    f'fill="none" stroke="#000" stroke-width="2.5"/>'
                )
            body.append(
                f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="middle" fill="{ink}">{v}</text>'
            )
    body.append(_scale(left + grid_w + 24, top, peak))
    return svg(body, width, height, "cluster-by-class heat map", plot="heatmap")


def _scale(x: int, top: int, peak: int, *, steps: int = 8, bar_h: int = 160) -> str:
    """A vertical colour bar from 0 (bottom) to `peak` (top), with tick labels and a title."""
    out = [f'<g id="heatmap-scale" data-min="0" data-max="{peak}">']
    h = bar_h / steps
    for s in range(steps):
        t = (s + 0.5) / steps
        y = top + bar_h - (s + 1) * h
        out.append(f'<rect x="{x}" y="{y:.1f}" width="14" height="{h + 0.5:.1f}" fill="{heat_colour(t)}"/>')
    out.append(f'<rect x="{x}" y="{top}" width="14" height="{bar_h}" fill="none" stroke="#888"/>')
    values = sorted({0, peak // 2, peak}) if peak > 1 else [0, peak]
    for v in values:
        y = top + bar_h - v / peak * bar_h
        out.append(f'<line x1="{x + 14}" y1="{y:.1f}" x2="{x + 18}" y2="{y:.1f}" stroke="#888"/>')
        out.append(f'<text class="tick" x="{x + 21}" y="{y + 4:.1f}">{v}</text>')
    out.append(f'<text x="{x - 4}" y="{top + bar_h + 18}">items per cell</text>')
    out.append(
        f'<rect x="{x}" y="{top + bar_h + 28}" width="14" height="14" fill="none" stroke="#000" stroke-width="2"/>'
        f'<text x="{x + 20}" y="{top + bar_h + 39}">matched</text></g>'
    )
    return "".join(out)


SERIES_INKS = (INK, MID_INK)
SERIES_MARKERS = ("circle", "square")


def lines_svg(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    *,
    xlabel: str,
    ylabels: Sequence[str],
    title: str,
    plot: str,
    markers: bool = True,
    integer_x: bool = False,
    hline: tuple[float, str] | None = None,
    highlight: tuple[float, str] | None = None,
) -> str:
    """One or two line plots sharing an x axis; the second series (dashed, grey) gets its own right-hand axis.

    `ylabels` are the axis titles, one per series (left, then right). `hline` draws a horizontal reference
    (value, label) against the first axis; `highlight` a vertical marker (x, label).
    """
    names = list(series)
    if len(names) not in (1, 2) or len(ylabels) != len(names):
        raise ValueError(f"lines_svg draws one or two series with one axis title each, got {names} / {ylabels}")
    xs = np.asarray(x, np.float64)
    right = 72 if len(names) == 2 else 16
    first = np.asarray(series[names[0]], np.float64)
    f = Frame(*data_range(xs), *data_range(first), width=500, height=340, right=right, top=40)
    body = f.axes(xlabel, ylabels[0], integer_x=integer_x)
    for idx, name in enumerate(names):
        ys = np.asarray(series[name], np.float64)
        g = f if idx == 0 else Frame(f.x0, f.x1, *data_range(ys), width=f.width, height=f.height, right=right, top=40)
        ink = SERIES_INKS[idx]
        pts = [(g.sx(a), g.sy(b)) for a, b in zip(xs.tolist(), ys.tolist(), strict=True) if math.isfinite(b)]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        dash = ' stroke-dasharray="6,3"' if idx else ""
        body.append(f'<polyline points="{path}" fill="none" stroke="{ink}" stroke-width="2"{dash}/>')
        marker = Marker(SERIES_MARKERS[idx], ink, "#ffffff")
        if markers:
            body += [marker.svg(px, py, 3.6) for px, py in pts]
        if idx:
            edge = g.width - g.right
            body.append(f'<line x1="{edge}" y1="{g.top}" x2="{edge}" y2="{g.height - g.bottom}" stroke="#888"/>')
            for t in ticks(g.y0, g.y1):
                body.append(f'<text x="{edge + 6}" y="{g.sy(t) + 4:.1f}" fill="{ink}">{fmt(t)}</text>')
            cy = (g.top + g.height - g.bottom) / 2
            body.append(
                f'<text class="axis-title" data-axis="y2" transform="translate({g.width - 12},{cy:.0f}) rotate(90)" '
                f'text-anchor="middle" fill="{ink}">{html.escape(ylabels[idx])}</text>'
            )
        lx = f.left + 190 * idx
        body.append(
            f'<g class="legend"><line x1="{lx}" y1="{f.top - 16}" x2="{lx + 22}" y2="{f.top - 16}" stroke="{ink}" '
            f'stroke-width="2"{dash}/>{marker.svg(lx + 11, f.top - 16, 3.6)}'
            f'<text x="{lx + 28}" y="{f.top - 12}">{html.escape(name)}</text></g>'
        )
    if hline is not None and math.isfinite(hline[0]):
        y = f.sy(hline[0])
        body.append(
            f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.width - f.right}" y2="{y:.1f}" stroke="{MID_INK}" '
            f'stroke-dasharray="4,3"/><text x="{f.width - f.right - 4}" y="{y - 4:.1f}" text-anchor="end" '
            f'fill="{INK}">{html.escape(hline[1])}</text>'
        )
    if highlight is not None:
        xh = f.sx(highlight[0])
        body.append(
            f'<line class="highlight" x1="{xh:.1f}" y1="{f.top}" x2="{xh:.1f}" y2="{f.height - f.bottom}" '
            f'stroke="{INK}" stroke-dasharray="2,3"/><text x="{xh + 4:.1f}" y="{f.top + 12}">'
            f"{html.escape(highlight[1])}</text>"
        )
    return svg(body, f.width, f.height, title, plot=plot)
