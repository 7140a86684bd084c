"""One self-contained HTML page about a clustering: plots as inline SVG, thumbnails as base64 JPEG.

    data = ReportData.from_result(result, keys, truth=labels, paths=paths)     # local clustering
    data = ReportData.from_clustering(clustering, provenance=Provenance(...))  # cluster_items / ClusterClient.cluster
    Path("report.html").write_text(render_report(data))

Sections (each a `<section id=...>`, in page order, `SECTIONS`): `provenance` (model, runtime, precision, device,
source, clustering, generation time in UTC), `metrics` (the metrics table), `table` (the cluster-by-class heat map,
rows in the order of the Hungarian matching, with its colour scale), `projection` (2-D PCA by cluster and by
label, each axis with its share of the variance, each point hovering its key), `exemplars` (per cluster, the
thumbnails nearest to its centre), `silhouette` (silhouette and inertia against k), `kdistance` (the sorted
k-distance curve, with eps). A section without data says so instead of plotting. The plots are written by
`service.analysis.report_plots`, which also fixes the visual code: colour means the true label, marker shape the
cluster.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from service.analysis import evaluate
from service.analysis.report_plots import (
    cluster_marker,
    cluster_name,
    fmt,
    heatmap_svg,
    label_colours,
    label_marker,
    lines_svg,
    scatter_svg,
)
from service.types import NOISE, Clustering, ClusterResult, Contingency, ModelInfo, OutlierResult, SweepPoint

logger = logging.getLogger(__name__)

SECTIONS = ("provenance", "metrics", "table", "projection", "exemplars", "silhouette", "kdistance")
"""The ids of the report's sections, in page order."""

UNKNOWN = "not recorded"
"""What the header shows for a field its source does not record."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """Where the clustered vectors came from, for the report's header ("" / 0 where not known)."""

    model: str = ""
    """The backbone, e.g. `efficientnet_lite0`."""
    dim: int = 0
    """The embedding dimension."""
    runtime: str = ""
    """The backbone runtime: `torch`, `openvino`, `onnxruntime`."""
    precision: str = ""
    """The backbone precision, e.g. `float32`, `bfloat16`."""
    device: str = ""
    """Where the backbone ran, e.g. `cpu`, `cuda:0`."""
    version: str = ""
    """The embedserve version that computed the embeddings."""
    source: str = ""
    """Where the items came from: a Parquet file, or a server and collection."""
    features: str = "embedding"
    """What was clustered: `embedding`, or a description of the raw-pixel baseline."""

    @classmethod
    def from_model_info(cls, info: ModelInfo, *, source: str = "", features: str = "embedding") -> Provenance:
        """From what a server's `GetModelInfo` (or a local engine) reports."""
        return cls(
            model=info.backbone,
            dim=info.embedding_dim,
            runtime=info.runtime,
            precision=info.precision,
            device=info.device,
            version=info.version,
            source=source,
            features=features,
        )

    @classmethod
    def from_parquet_metadata(
        cls, meta: Mapping[bytes, bytes] | None, *, source: str = "", features: str = "embedding"
    ) -> Provenance:
        """From the `embedserve.*` schema metadata that `embedserve embed` writes (see `service.jobs.files`)."""
        meta = meta or {}

        def get(name: str) -> str:
            return meta.get(b"embedserve." + name.encode(), b"").decode("utf-8", "replace")

        dim = get("dim")
        return cls(
            model=get("model"),
            dim=int(dim) if dim.isdigit() else 0,
            runtime=get("runtime"),
            precision=get("precision"),
            device=get("device"),
            version=get("version"),
            source=source,
            features=features,
        )


def explained_variance(features: np.ndarray, projection: np.ndarray) -> tuple[float, float] | None:
    """The share of the total variance of `features` that each column of its PCA `projection` carries (PC 1, PC 2).

    The projection's columns are the centred data on the principal axes, so the variance of each column over the
    summed variances of the features is PCA's explained-variance ratio. None when `features` are not at hand
    (a clustering that came over the wire) or have no variance.
    """
    x = np.asarray(features, np.float64)
    p = np.asarray(projection, np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[0] != p.shape[0] or p.ndim != 2 or p.shape[1] < 2:
        return None
    total = float(x.var(axis=0, ddof=1).sum())
    if not total > 0:
        return None
    ratio = p[:, :2].var(axis=0, ddof=1) / total
    return float(ratio[0]), float(ratio[1])


def matched_order(table: Contingency) -> tuple[list[int], set[tuple[int, int]]]:
    """The rows of `table` in the order the report draws them, and the matched (row, column) pairs.

    The matching is the evaluation's (`evaluate.hungarian_matching`, the one behind `accuracy`). Matched clusters
    come first, in the order of their class's column, so the matching runs down the diagonal; then the unmatched
    clusters by their largest class (column, then count); noise last.
    """
    pairs = evaluate.hungarian_matching(table)
    order = [r for r, _ in sorted(pairs, key=lambda rc: rc[1])]
    seen = set(order)
    rest = [i for i, c in enumerate(table.clusters) if i not in seen and c != NOISE]
    rest.sort(key=lambda i: (int(np.argmax(table.counts[i])), -int(table.counts[i].max()), table.clusters[i]))
    order += rest + [i for i, c in enumerate(table.clusters) if c == NOISE]
    return order, set(pairs)


@dataclass(kw_only=True)
class ReportData:
    """Everything the report shows, from a local clustering or from a Cluster response."""

    title: str = "embedserve clustering report"
    keys: list[str]
    assignments: np.ndarray
    truth: list[str] | None = None
    paths: list[str] | None = None
    projection: np.ndarray
    explained_variance: tuple[float, float] | None = None
    """Share of the variance of the clustered vectors on PC 1 and PC 2 (None when the vectors were not at hand)."""
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
    provenance: Provenance = field(default_factory=Provenance)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))
    """When the report was made (shown in UTC)."""

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
        provenance: Provenance | None = None,
    ) -> ReportData:
        """`details=False` skips the 2-D projection and the centre distances (zeros / NaN instead)."""
        n = len(keys)
        if details:
            projection = evaluate.projection_2d(result.features, seed=result.params.seed)
            variance = explained_variance(result.features, projection)
        else:
            projection, variance = np.zeros((n, 2), np.float32), None
        return cls(
            title=title,
            keys=list(keys),
            assignments=result.labels,
            truth=None if truth is None else list(truth),
            paths=None if paths is None else list(paths),
            projection=projection,
            explained_variance=variance,
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
            provenance=provenance or Provenance(),
        )

    @classmethod
    def from_clustering(
        cls, c: Clustering, *, title: str = "embedserve clustering report", provenance: Provenance | None = None
    ) -> ReportData:
        """From a clustering with details (projection, truth, paths): `cluster_items` here, or a Cluster call.

        The explained variance needs the clustered vectors, which a local clustering keeps and a response lacks.
        """
        r, n = c.result, len(c.keys)
        projection = c.projection[:, :2] if c.projection is not None else np.zeros((n, 2), np.float32)
        variance = explained_variance(r.features, projection) if c.projection is not None else None
        return cls(
            title=title,
            keys=list(c.keys),
            assignments=r.labels,
            truth=c.truth,
            paths=c.paths if c.paths and any(c.paths) else None,
            projection=projection,
            explained_variance=variance,
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
            provenance=provenance or Provenance(),
        )

    def cluster_order(self) -> list[int]:
        """The cluster ids (noise included) in the heat map's order: by the matching when there is a table."""
        present = set(self.assignments.tolist())
        if self.table is None:
            return sorted(present - {NOISE}) + ([NOISE] if NOISE in present else [])
        order, _ = matched_order(self.table)
        ids = [self.table.clusters[i] for i in order]
        return [c for c in ids if c in present] + sorted(present - set(ids))

    def matches(self) -> dict[int, str]:
        """Cluster id -> the class the Hungarian matching pairs it with (empty without a table)."""
        if self.table is None:
            return {}
        _, pairs = matched_order(self.table)
        return {self.table.clusters[r]: self.table.classes[c] for r, c in pairs}


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
    """Per cluster (in `data.cluster_order()`), the indices of its members nearest to its centre (noise left out)."""
    out: dict[int, list[int]] = {}
    for c in data.cluster_order():
        if c == NOISE:
            continue
        members = np.flatnonzero(data.assignments == c)
        d = np.nan_to_num(data.center_distance[members], nan=np.inf)
        out[c] = members[np.argsort(d, kind="stable")[:per_cluster]].tolist()
    return out


# -- the page -------------------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1360px}
h1{font-size:22px;margin:0 0 10px}h2{font-size:17px;margin:22px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
table.m{border-collapse:collapse}table.m td,table.m th{padding:3px 12px;border-bottom:1px solid #eee;text-align:left}
table.m td.v{text-align:right;font-variant-numeric:tabular-nums}
dl.prov{display:grid;grid-template-columns:repeat(3,max-content);gap:4px 40px;margin:0;font-size:14px}
dl.prov div{display:flex;gap:8px}dl.prov dt{font-weight:600;min-width:86px}dl.prov dd{margin:0}
.row{display:flex;flex-wrap:wrap;gap:40px;align-items:flex-start}.row>section{min-width:0;max-width:640px}
.row figure{margin:0}figcaption{font-weight:600;margin-bottom:4px}.cl{margin:8px 0}
.cl h3{font-size:14px;margin:6px 0;display:flex;align-items:center;gap:6px}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}.thumbs figure{margin:0;font-size:10px;text-align:center;width:104px}
.thumbs img{border:4px solid #ccc;display:block;margin:auto}.note{color:#777}.warning{color:#a40}
.swatch{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:3px}
"""


def _or_unknown(value: str) -> str:
    return html.escape(value) if value else f'<span class="note">{UNKNOWN}</span>'


def _provenance_html(data: ReportData) -> str:
    p = data.provenance
    model = p.model + (f" ({p.dim}-d)" if p.model and p.dim else "")
    clustering = f"{data.algorithm} on {data.backend}" + ("" if data.k is None else f", k = {data.k}")
    if data.eps is not None:
        clustering += f", eps = {fmt(data.eps)}"
    when = data.created.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if p.features == "embedding":
        backbone = [_or_unknown(v) for v in (model, p.runtime, p.precision, p.device, p.version)]
    else:  # raw pixels: no model computed what was clustered
        backbone = ['<span class="note">none (raw pixels)</span>'] * 4 + [_or_unknown(p.version)]
    fields = [
        *zip(
            ("model", "runtime", "precision", "device", "version"),
            ("model", "runtime", "precision", "device", "embedserve"),
            backbone,
            strict=True,
        ),
        ("features", "features", html.escape(p.features)),
        ("items", "items", f"{len(data.keys)}" + (f" from {html.escape(p.source)}" if p.source else "")),
        ("clustering", "clustering", f"{html.escape(clustering)} in {data.seconds:.2f} s"),
        ("created", "generated", f'<time datetime="{when}">{when}</time>'),
    ]
    body = "".join(f'<div><dt>{name}</dt><dd data-field="{key}">{value}</dd></div>' for key, name, value in fields)
    return f'<section id="provenance"><dl class=prov>{body}</dl></section>'


def _metrics_html(data: ReportData) -> str:
    rows = []
    if data.k is not None:
        rows.append(("k", str(data.k)))
    if data.eps is not None:
        rows.append(("eps", fmt(data.eps)))
    rows += [(name, fmt(value)) for name, value in sorted(data.metrics.items()) if name != "eps"]
    sizes = evaluate.cluster_sizes(data.assignments)
    rows.append(("cluster sizes", ", ".join(f"{'noise' if c == NOISE else c}: {s}" for c, s in sizes.items())))
    body = "".join(f"<tr><th>{html.escape(a)}</th><td class=v>{html.escape(b)}</td></tr>" for a, b in rows)
    return f'<section id="metrics"><h2>Metrics</h2><table class=m>{body}</table></section>'


def _table_html(data: ReportData, colours: dict[str, str]) -> str:
    if data.table is None:
        return '<section id="table"><h2>Cluster by class</h2><p class="note">No ground truth given.</p></section>'
    order, pairs = matched_order(data.table)
    note = (
        '<p class="note">Rows follow the Hungarian matching behind <i>accuracy</i> (outlined): matched clusters '
        "in the order of their class, then unmatched clusters, then noise.</p>"
    )
    svg = heatmap_svg(data.table, order, pairs, colours)
    return f'<section id="table"><h2>Cluster by class</h2>{svg}{note}</section>'


def _axis(pc: int, data: ReportData) -> str:
    if data.explained_variance is None:
        return f"PC {pc}"
    return f"PC {pc} ({100 * data.explained_variance[pc - 1]:.1f} % of variance)"


def _projection_html(data: ReportData, colours: dict[str, str]) -> str:
    clusters = data.assignments.tolist()
    truth = data.truth
    tips = [
        "\n".join([key, cluster_name(c), *([f"label {truth[i]}"] if truth is not None else [])])
        for i, (key, c) in enumerate(zip(data.keys, clusters, strict=True))
    ]
    matches = data.matches()
    legend = [
        (cluster_name(c) + (f" \u2194 {matches[c]}" if c in matches else ""), cluster_marker(c))
        for c in data.cluster_order()
    ]
    axes = {"xlabel": _axis(1, data), "ylabel": _axis(2, data)}
    plots = [
        (
            "by cluster (marker shape)",
            scatter_svg(
                data.projection,
                [cluster_marker(c) for c in clusters],
                tips,
                legend,
                title="2-D projection, one marker shape per cluster",
                plot="scatter-cluster",
                **axes,
            ),
        )
    ]
    if truth is not None:
        plots.append(
            (
                "by label (colour)",
                scatter_svg(
                    data.projection,
                    [label_marker(colours[t]) for t in truth],
                    tips,
                    [(t or "(none)", label_marker(c)) for t, c in colours.items()],
                    title="2-D projection, one colour per label",
                    plot="scatter-label",
                    **axes,
                ),
            )
        )
    figs = "".join(f"<figure><figcaption>{t}</figcaption>{p}</figure>" for t, p in plots)
    notes = []
    if truth is None:
        notes.append("No ground truth given: no label colouring.")
    if data.explained_variance is None:
        notes.append("The share of variance per axis needs the clustered vectors, which a server does not send.")
    notes.append("Hover a point for its key.")
    note = "".join(f'<p class="note">{n}</p>' for n in notes)
    return f'<section id="projection"><h2>2-D projection (PCA)</h2><div class=row>{figs}</div>{note}</section>'


def _exemplars_html(data: ReportData, colours: dict[str, str], per_cluster: int, thumb_size: int) -> str:
    matches = data.matches()
    blocks = []
    for c, idx in exemplars(data, per_cluster).items():
        figs = []
        for i in idx:
            uri = thumbnail(data.paths[i], thumb_size) if data.paths and data.paths[i] else None
            label = data.truth[i] if data.truth is not None else ""
            border = colours.get(label, "#ccc") if data.truth is not None else "#ccc"
            img = (
                f'<img src="{uri}" alt="{html.escape(data.keys[i])}" style="border-color:{border}">'
                if uri
                else '<div class="note">no image</div>'
            )
            caption = f'<span class="swatch" style="background:{border}"></span>{html.escape(label)}' if label else ""
            figs.append(f'<figure title="{html.escape(data.keys[i])}">{img}{caption}</figure>')
        size = int((data.assignments == c).sum())
        matched = f", matched to {html.escape(matches[c])}" if c in matches else ""
        blocks.append(
            f"<div class=cl><h3>{cluster_marker(c).icon()}cluster {c} ({size} items{matched})</h3>"
            f"<div class=thumbs>{''.join(figs)}</div></div>"
        )
    note = '<p class="note">Thumbnail borders are the true label\'s colour.</p>' if data.truth is not None else ""
    return f'<section id="exemplars"><h2>Exemplars (nearest to each centre)</h2>{note}{"".join(blocks)}</section>'


def _sweep_html(data: ReportData) -> str:
    if not data.sweep:
        return '<section id="silhouette"><h2>Silhouette against k</h2><p class="note">No sweep was run.</p></section>'
    svg = lines_svg(
        [s.k for s in data.sweep],
        {"silhouette": [s.silhouette for s in data.sweep], "inertia": [s.inertia for s in data.sweep]},
        xlabel="k (number of clusters)",
        ylabels=("mean silhouette", "inertia (within-cluster sum of squares)"),
        title="silhouette and inertia against k",
        plot="sweep",
        integer_x=True,
        highlight=None if data.k is None else (data.k, f"k = {data.k}"),
    )
    return f'<section id="silhouette"><h2>Silhouette and inertia against k</h2>{svg}</section>'


def _kdistance_html(data: ReportData) -> str:
    if data.k_distance is None or not len(data.k_distance):
        return '<section id="kdistance"><h2>k-distance plot</h2><p class="note">Not computed.</p></section>'
    kd = np.asarray(data.k_distance)
    hline = (data.eps, f"eps = {fmt(data.eps)}") if data.eps is not None else None
    ylabel = (
        f"distance to neighbour {data.min_samples} (itself first)" if data.min_samples else "k-th neighbour distance"
    )
    svg = lines_svg(
        list(range(len(kd))),
        {"k-distance": kd.tolist()},
        xlabel="points, sorted by that distance",
        ylabels=(ylabel,),
        title="k-distance plot",
        plot="kdistance",
        markers=False,
        hline=hline,
    )
    return f'<section id="kdistance"><h2>k-distance plot</h2>{svg}</section>'


def render_report(data: ReportData, *, per_cluster: int = 8, thumb_size: int = 96) -> str:
    """The report as one HTML string (no external resources)."""
    colours = label_colours(sorted(set(data.truth))) if data.truth is not None else {}
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{html.escape(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        _provenance_html(data),
        *(f'<p class="warning">{html.escape(w)}</p>' for w in data.warnings),
        f"<div class=row>{_metrics_html(data)}{_table_html(data, colours)}</div>",
        _projection_html(data, colours),
        _exemplars_html(data, colours, per_cluster, thumb_size),
        f"<div class=row>{_sweep_html(data)}{_kdistance_html(data)}</div>",
        "</body></html>",
    ]
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
            f"<td>{fmt(float(result.kth_distance[i]))}</td><td>{fmt(float(result.lof[i]))}</td>"
            f"<td>{fmt(float(result.score[i]))}</td></tr>"
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
