"""One self-contained HTML page about a clustering: plots as inline SVG, thumbnails as base64 JPEG.

    data = ReportData.from_result(result, keys, truth=labels, paths=paths)     # local clustering
    data = ReportData.from_clustering(clustering)                              # ClusterClient.cluster, details
    Path("report.html").write_text(render_report(data))

Sections (each an `<section id=...>`): `metrics` (the metrics table), `projection` (2-D PCA coloured by cluster
and by label), `table` (the cluster-by-class heat map), `exemplars` (per cluster, the thumbnails nearest to its
centre), `silhouette` (silhouette and inertia against k), `kdistance` (the sorted k-distance curve, with eps).
A section without data says so instead of plotting. No plotting library is needed: the SVG is written here.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from service.analysis import evaluate
from service.types import Clustering, ClusterResult, OutlierResult, SweepPoint

logger = logging.getLogger(__name__)

SECTIONS = ("metrics", "projection", "table", "exemplars", "silhouette", "kdistance")
"""The ids of the report's sections, in page order."""

# A colour-blind-friendly qualitative palette (Okabe-Ito, then Tableau 10); noise is grey.
PALETTE = (
    *("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"),
    *("#4E79A7", "#F28E2B", "#59A14F", "#E15759", "#76B7B2", "#EDC948", "#B07AA1", "#FF9DA7"),
)
NOISE_COLOUR = "#b0b0b0"


@dataclass(kw_only=True)
class ReportData:
    """Everything the report shows, from a local clustering or from a Cluster response."""

    title: str = "embedserve clustering report"
    keys: list[str]
    assignments: np.ndarray
    truth: list[str] | None = None
    paths: list[str] | None = None
    projection: np.ndarray
    center_distance: np.ndarray
    algorithm: str
    backend: str
    seconds: float
    k: int | None = None
    eps: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    table: evaluate.Contingency | None = None
    sweep: list[SweepPoint] = field(default_factory=list)
    k_distance: np.ndarray | None = None
    min_samples: int | None = None
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def from_result(
        cls,
        result: ClusterResult,
        keys: Sequence[str],
        *,
        truth: Sequence[str] | None = None,
        paths: Sequence[str] | None = None,
        title: str = "embedserve clustering report",
        details: bool = True,
    ) -> ReportData:
        """`details=False` skips the 2-D projection and the centre distances (zeros / NaN instead)."""
        n = len(keys)
        return cls(
            title=title,
            keys=list(keys),
            assignments=result.labels,
            truth=None if truth is None else list(truth),
            paths=None if paths is None else list(paths),
            projection=evaluate.projection_2d(result.features, seed=result.params.seed)
            if details
            else np.zeros((n, 2), np.float32),
            center_distance=result.center_distances() if details else np.full(n, np.nan, np.float32),
            algorithm=result.algorithm,
            backend=result.backend,
            seconds=result.seconds,
            k=result.k,
            eps=result.eps,
            metrics=dict(result.metrics),
            table=result.table,
            sweep=list(result.sweep),
            k_distance=result.k_distance,
            min_samples=result.params.min_samples,
            warnings=list(result.warnings),
        )

    @classmethod
    def from_clustering(cls, c: Clustering, *, title: str = "embedserve clustering report") -> ReportData:
        """From a clustering that came over the wire (a Cluster call with details: projection, truth, paths)."""
        r, n = c.result, len(c.keys)
        return cls(
            title=title,
            keys=list(c.keys),
            assignments=r.labels,
            truth=c.truth,
            paths=c.paths if c.paths and any(c.paths) else None,
            projection=c.projection[:, :2] if c.projection is not None else np.zeros((n, 2), np.float32),
            center_distance=c.center_distance if c.center_distance is not None else np.full(n, np.nan),
            algorithm=r.algorithm,
            backend=r.backend,
            seconds=r.seconds,
            k=r.k,
            eps=r.eps,
            metrics=dict(r.metrics),
            table=r.table,
            sweep=list(r.sweep),
            k_distance=r.k_distance,
            min_samples=r.params.min_samples,
            warnings=list(r.warnings),
        )


# -- SVG primitives -------------------------------------------------------------------------------------------------


def _colour(cluster: int) -> str:
    return NOISE_COLOUR if cluster == evaluate.NOISE else PALETTE[cluster % len(PALETTE)]


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return "n/a"
    if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
        return f"{v:.3g}"
    return f"{v:.3f}".rstrip("0").rstrip(".") if abs(v - round(v)) > 1e-9 else str(round(v))


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


@dataclass(frozen=True, slots=True)
class _Frame:
    """A plot area: data ranges mapped onto a `width`×`height` SVG with margins for the axes."""

    x0: float
    x1: float
    y0: float
    y1: float
    width: int = 420
    height: int = 320
    left: int = 56
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
        out = [
            f'<rect x="{self.left}" y="{self.top}" width="{self.width - self.left - self.right}" '
            f'height="{self.height - self.top - self.bottom}" fill="none" stroke="#888"/>'
        ]
        xt = _ticks(self.x0, self.x1)
        if integer_x:
            xt = sorted({round(t) for t in xt if abs(t - round(t)) < 1e-9})
        for t in xt:
            x = self.sx(t)
            out.append(
                f'<line x1="{x:.1f}" y1="{self.height - self.bottom}" x2="{x:.1f}" '
                f'y2="{self.height - self.bottom + 4}" stroke="#888"/>'
            )
            out.append(f'<text x="{x:.1f}" y="{self.height - self.bottom + 16}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.sy(t)
            out.append(f'<line x1="{self.left - 4}" y1="{y:.1f}" x2="{self.left}" y2="{y:.1f}" stroke="#888"/>')
            out.append(f'<text x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        out.append(
            f'<text x="{(self.left + self.width - self.right) / 2:.0f}" y="{self.height - 8}" '
            f'text-anchor="middle">{html.escape(xlabel)}</text>'
        )
        cy = (self.top + self.height - self.bottom) / 2
        out.append(
            f'<text transform="translate(14,{cy:.0f}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>'
        )
        return out


def _svg(body: list[str], width: int, height: int, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="{html.escape(label)}" font-family="sans-serif" font-size="11">'
        + "".join(body)
        + "</svg>"
    )


def _range(v: np.ndarray) -> tuple[float, float]:
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = (hi - lo) * 0.05 or 1.0
    return lo - pad, hi + pad


def scatter_svg(points: np.ndarray, groups: Sequence[str], colours: dict[str, str], title: str) -> str:
    """A scatter plot of 2-D `points`, each coloured by its group, with a legend."""
    xr, yr = _range(points[:, 0]), _range(points[:, 1])
    f = _Frame(*xr, *yr, width=420, height=340)
    body = f.axes("PC 1", "PC 2")
    for (x, y), g in zip(points.tolist(), groups, strict=True):
        body.append(
            f'<circle cx="{f.sx(x):.1f}" cy="{f.sy(y):.1f}" r="3.5" fill="{colours[g]}" '
            f'fill-opacity="0.8" stroke="#fff" stroke-width="0.5"><title>{html.escape(g)}</title></circle>'
        )
    legend = []
    for i, (g, c) in enumerate(colours.items()):
        y = 24 + 16 * i
        legend.append(f'<circle cx="436" cy="{y - 4}" r="5" fill="{c}"/>')
        legend.append(f'<text x="446" y="{y}">{html.escape(g)}</text>')
    return _svg(body + legend, 560, 340, title)


def heatmap_svg(table: evaluate.Contingency) -> str:
    """The cluster-by-class table as a heat map (rows clusters, columns classes), counts written in the cells."""
    rows, cols = len(table.clusters), len(table.classes)
    cell, left, top = 68, 70, 60
    width, height = left + cols * cell + 20, top + rows * cell + 20
    peak = max(int(table.counts.max()), 1)
    body = []
    for j, c in enumerate(table.classes):
        x = left + j * cell + cell / 2
        body.append(f'<text x="{x:.0f}" y="{top - 8}" text-anchor="middle" font-weight="bold">{html.escape(c)}</text>')
    for i, k in enumerate(table.clusters):
        y = top + i * cell
        name = "noise" if k == evaluate.NOISE else f"cluster {k}"
        body.append(f'<text x="{left - 8}" y="{y + cell / 2 + 4:.0f}" text-anchor="end">{name}</text>')
        for j in range(cols):
            v = int(table.counts[i, j])
            t = v / peak
            shade = f"rgb({int(255 - 200 * t)},{int(255 - 140 * t)},{int(255 - 60 * t)})"
            ink = "#fff" if t > 0.6 else "#222"
            x = left + j * cell
            body.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{shade}" stroke="#fff"/>')
            body.append(
                f'<text x="{x + cell / 2:.0f}" y="{y + cell / 2 + 4:.0f}" text-anchor="middle" fill="{ink}">{v}</text>'
            )
    body.append(f'<text x="{left + cols * cell / 2:.0f}" y="16" text-anchor="middle">class (ground truth)</text>')
    return _svg(body, width, height, "cluster-by-class heat map")


def lines_svg(
    x: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    title: str,
    *,
    markers: bool = True,
    integer_x: bool = False,
    hline: tuple[float, str] | None = None,
    highlight: float | None = None,
) -> str:
    """Line plots sharing an x axis; each series is scaled to its own range when there are two (twin axes).

    With two series, the first uses the left axis and the second is drawn dashed against its own min..max,
    labelled on the right. `hline` draws a horizontal reference (value, label); `highlight` a vertical marker.
    """
    names = list(series)
    xs = np.asarray(x, np.float64)
    first = np.asarray(series[names[0]], np.float64)
    f = _Frame(*_range(xs), *_range(first), width=460, height=340, right=64, top=40)
    body = f.axes(xlabel, names[0], integer_x=integer_x)
    for idx, name in enumerate(names):
        ys = np.asarray(series[name], np.float64)
        g = f if idx == 0 else _Frame(f.x0, f.x1, *_range(ys), width=460, height=340, right=64, top=40)
        colour = PALETTE[idx]
        pts = [(g.sx(a), g.sy(b)) for a, b in zip(xs.tolist(), ys.tolist(), strict=True) if math.isfinite(b)]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
        dash = ' stroke-dasharray="5,3"' if idx else ""
        body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        if markers:
            body += [f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="{colour}"/>' for px, py in pts]
        if idx:
            for t in _ticks(g.y0, g.y1):
                body.append(f'<text x="{g.width - g.right + 6}" y="{g.sy(t) + 4:.1f}" fill="{colour}">{_fmt(t)}</text>')
        body.append(
            f'<text x="{f.left + 160 * idx}" y="{f.top - 12}" fill="{colour}">'
            f"{'— ' if idx == 0 else '-- '}{html.escape(name)}</text>"
        )
    if hline is not None:
        y = f.sy(hline[0])
        body.append(
            f'<line x1="{f.left}" y1="{y:.1f}" x2="{f.width - f.right}" y2="{y:.1f}" stroke="#D55E00" '
            f'stroke-dasharray="4,3"/><text x="{f.width - f.right - 4}" y="{y - 4:.1f}" text-anchor="end" '
            f'fill="#D55E00">{html.escape(hline[1])}</text>'
        )
    if highlight is not None:
        xh = f.sx(highlight)
        body.append(
            f'<line x1="{xh:.1f}" y1="{f.top}" x2="{xh:.1f}" y2="{f.height - f.bottom}" stroke="#009E73" '
            f'stroke-dasharray="4,3"/>'
        )
    return _svg(body, f.width, f.height, title)


# -- thumbnails -----------------------------------------------------------------------------------------------------


def thumbnail(path: str, size: int = 96) -> str | None:
    """A `data:` URI of a JPEG thumbnail of the image at `path` (None when it cannot be read)."""
    from PIL import Image

    try:
        with Image.open(path) as src:
            img = src.convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=80)
    except (OSError, ValueError) as e:
        logger.warning("no thumbnail for %s: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def exemplars(data: ReportData, per_cluster: int) -> dict[int, list[int]]:
    """Per cluster, the indices of its members nearest to its centre (noise left out)."""
    out: dict[int, list[int]] = {}
    for c in sorted(set(data.assignments.tolist()) - {evaluate.NOISE}):
        members = np.flatnonzero(data.assignments == c)
        d = np.nan_to_num(data.center_distance[members], nan=np.inf)
        out[c] = members[np.argsort(d, kind="stable")[:per_cluster]].tolist()
    return out


# -- the page -------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table.m{border-collapse:collapse}table.m td,table.m th{padding:3px 12px;border-bottom:1px solid #eee;text-align:left}
table.m td.v{text-align:right;font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:24px}.row figure{margin:0}.cl{margin:8px 0}.cl h3{font-size:14px;margin:6px 0}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}.thumbs figure{margin:0;font-size:10px;text-align:center;width:100px}
.thumbs img{border:3px solid #ccc;display:block;margin:auto}.note{color:#777}
"""


def _metrics_html(data: ReportData) -> str:
    rows = [
        ("algorithm", data.algorithm),
        ("backend", data.backend),
        ("items", str(len(data.keys))),
        ("seconds", f"{data.seconds:.3f}"),
    ]
    if data.k is not None:
        rows.append(("k", str(data.k)))
    if data.eps is not None:
        rows.append(("eps", _fmt(data.eps)))
    rows += [(name, _fmt(value)) for name, value in sorted(data.metrics.items()) if name != "eps"]
    sizes = evaluate.cluster_sizes(data.assignments)
    rows.append(("cluster sizes", ", ".join(f"{'noise' if c == -1 else c}: {s}" for c, s in sizes.items())))
    body = "".join(f"<tr><th>{html.escape(a)}</th><td class=v>{html.escape(b)}</td></tr>" for a, b in rows)
    return f"<table class=m>{body}</table>"


def render_report(data: ReportData, *, per_cluster: int = 8, thumb_size: int = 96) -> str:
    """The report as one HTML string (no external resources)."""
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        f"<p>{len(data.keys)} items, {html.escape(data.algorithm)} on {html.escape(data.backend)}"
        f"{'' if data.k is None else f', k = {data.k}'}.</p>",
        *(f'<p class="warning">{html.escape(w)}</p>' for w in data.warnings),
        f'<section id="metrics"><h2>Metrics</h2>{_metrics_html(data)}</section>',
    ]
    # Projection coloured by cluster and by label.
    clusters = data.assignments.tolist()
    cnames = ["noise" if c == evaluate.NOISE else f"cluster {c}" for c in clusters]
    ccolours = {("noise" if c == -1 else f"cluster {c}"): _colour(c) for c in sorted(set(clusters))}
    plots = [scatter_svg(data.projection, cnames, ccolours, "2-D projection coloured by cluster")]
    if data.truth is not None:
        classes = sorted(set(data.truth))
        lcolours = {c: PALETTE[(i + 8) % len(PALETTE)] for i, c in enumerate(classes)}
        plots.append(scatter_svg(data.projection, data.truth, lcolours, "2-D projection coloured by label"))
    titles = ["by cluster", "by label"]
    figs = "".join(f"<figure><figcaption>{t}</figcaption>{p}</figure>" for t, p in zip(titles, plots, strict=False))
    note = "" if data.truth is not None else '<p class="note">No ground truth given: no label colouring.</p>'
    parts.append(f'<section id="projection"><h2>2-D projection (PCA)</h2><div class=row>{figs}</div>{note}</section>')
    # Cluster-by-class table.
    if data.table is not None:
        parts.append(f'<section id="table"><h2>Cluster by class</h2>{heatmap_svg(data.table)}</section>')
    else:
        parts.append(
            '<section id="table"><h2>Cluster by class</h2><p class="note">No ground truth given.</p></section>'
        )
    # Exemplars.
    blocks = []
    for c, idx in exemplars(data, per_cluster).items():
        figs_c = []
        for i in idx:
            uri = thumbnail(data.paths[i], thumb_size) if data.paths and data.paths[i] else None
            label = data.truth[i] if data.truth is not None else ""
            img = (
                f'<img src="{uri}" alt="{html.escape(data.keys[i])}" style="border-color:{_colour(c)}">'
                if uri
                else '<div class="note">no image</div>'
            )
            figs_c.append(f'<figure title="{html.escape(data.keys[i])}">{img}{html.escape(label)}</figure>')
        size = int((data.assignments == c).sum())
        blocks.append(
            f'<div class=cl><h3 style="color:{_colour(c)}">cluster {c} ({size} items)</h3>'
            f"<div class=thumbs>{''.join(figs_c)}</div></div>"
        )
    parts.append(f'<section id="exemplars"><h2>Exemplars (nearest to each centre)</h2>{"".join(blocks)}</section>')
    # Silhouette vs k.
    if data.sweep:
        ks = [s.k for s in data.sweep]
        svg = lines_svg(
            ks,
            {"silhouette": [s.silhouette for s in data.sweep], "inertia": [s.inertia for s in data.sweep]},
            "k",
            "silhouette and inertia against k",
            integer_x=True,
            highlight=data.k,
        )
        parts.append(f'<section id="silhouette"><h2>Silhouette and inertia against k</h2>{svg}</section>')
    else:
        parts.append(
            '<section id="silhouette"><h2>Silhouette against k</h2><p class="note">No sweep was run.</p></section>'
        )
    # k-distance.
    if data.k_distance is not None and len(data.k_distance):
        kd = np.asarray(data.k_distance)
        hline = (data.eps, f"eps = {_fmt(data.eps)}") if data.eps is not None else None
        label = f"k-distance (k = {data.min_samples}, the point itself first)" if data.min_samples else "k-distance"
        svg = lines_svg(
            list(range(len(kd))), {label: kd.tolist()}, "points, sorted", "k-distance plot", markers=False, hline=hline
        )
        parts.append(f'<section id="kdistance"><h2>k-distance plot</h2>{svg}</section>')
    else:
        parts.append('<section id="kdistance"><h2>k-distance plot</h2><p class="note">Not computed.</p></section>')
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(data: ReportData, out: str | Path, **kwargs: int) -> Path:
    """Render and write the report; returns the path."""
    path = Path(out)
    path.write_text(render_report(data, **kwargs), encoding="utf-8")
    return path


def render_outliers(result: OutlierResult, *, title: str = "embedserve outliers", thumb_size: int = 96) -> str:
    """The outlier ranking as one HTML page: rank, key, both scores and a thumbnail of each item (its `path`)."""
    rows = []
    for rank, key in enumerate(result.keys, start=1):
        i = rank - 1
        uri = thumbnail(result.paths[i], thumb_size) if result.paths and result.paths[i] else None
        img = f'<img src="{uri}" alt="{html.escape(key)}">' if uri else '<span class="note">no image</span>'
        rows.append(
            f"<tr><td>{rank}</td><td>{img}</td><td>{html.escape(key)}</td>"
            f"<td>{_fmt(float(result.kth_distance[i]))}</td><td>{_fmt(float(result.lof[i]))}</td>"
            f"<td>{_fmt(float(result.score[i]))}</td></tr>"
        )
    head = "<tr><th>rank</th><th>image</th><th>key</th><th>k-th neighbour distance</th><th>LOF</th><th>score</th></tr>"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(result.keys)} of {result.n} items, most unusual first; "
        f"k = {result.k} neighbours (cosine).</p>"
        f'<section id="outliers"><table>{head}{"".join(rows)}</table></section></body></html>'
    )


def write_outliers(result: OutlierResult, out: str | Path, **kw: Any) -> Path:
    """Write `render_outliers(result, **kw)` to `out`; returns the path."""
    path = Path(out)
    path.write_text(render_outliers(result, **kw), encoding="utf-8")
    return path
