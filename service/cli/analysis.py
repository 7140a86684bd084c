"""The `cluster`, `probe`, `filter` and `report` subcommands, against a Parquet file from `embed` or a server.

    embedserve cluster --parquet oct.parquet --algorithm kmeans --k 4 --ground-truth label
    embedserve cluster --server localhost:50051 --collection oct --algorithm dbscan --ground-truth label
    embedserve probe --parquet oct.parquet --target label --group-pattern '[A-Z]-(\\d+)-'
    embedserve filter --parquet oct.parquet --examples DRUSEN/DRUSEN-9800172-2.jpeg DRUSEN/DRUSEN-9837663-1.jpeg
    embedserve report --parquet oct.parquet --k 4 --ground-truth label --out report.html

`register(subparsers, common)` adds them to the `embedserve` parser (`common` carries --log-level/--config).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from service.app.analysis import cluster_items, filter_items, outliers_items, probe_items
from service.cli.common import EXIT_OK, UsageError, add_tls_flags, add_wait_flag, connection, wait_for_server
from service.types import FetchedItems, FilterQuery, OutlierQuery, ProbeQuery

__all__ = ["UsageError", "load_parquet", "register", "run_clustering"]


def load_parquet(path: str | Path) -> FetchedItems:
    """Keys, embeddings and string attributes (path, label, ...) of a Parquet file written by `embedserve embed`."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    if "key" not in table.column_names or "embedding" not in table.column_names:
        raise UsageError(f"{path} has no key/embedding columns; is it the output of `embedserve embed`?")
    keys = [str(k) for k in table["key"].to_pylist()]
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False)).astype(np.float32)
    names = [n for n in table.column_names if n not in ("key", "embedding")]
    columns = {n: table[n].to_pylist() for n in names}
    attributes = [
        {n: str(columns[n][i]) for n in names if columns[n][i] is not None and isinstance(columns[n][i], str)}
        for i in range(len(keys))
    ]
    return FetchedItems(keys=keys, vectors=vectors, attributes=attributes)


# -- shared options -------------------------------------------------------------------------------------------------


def _add_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("data (one of)")
    src.add_argument("--parquet", help="Parquet file written by `embedserve embed`")
    src.add_argument("--server", help="HOST:PORT of a running embedserve (with --collection)")
    src.add_argument("--collection", help="collection on --server")
    src.add_argument("--keys-file", help="only the keys listed in this file (one per line)")
    src.add_argument("--token", help="bearer token for --server (or EMBEDSERVE_TOKEN)")
    add_tls_flags(src)
    src.add_argument("--timeout", type=float, default=600.0, help="deadline of a server call in seconds")
    add_wait_flag(parser)


def _add_cluster_options(parser: argparse.ArgumentParser, *, default_k: str = "auto") -> None:
    g = parser.add_argument_group("clustering")
    g.add_argument(
        "--algorithm", default="kmeans", choices=["kmeans", "dbscan", "hdbscan", "optics", "kmedoids"], help="algorithm"
    )
    g.add_argument(
        "--k", default=default_k, help=f"clusters (kmeans, kmedoids) or 'auto' to sweep (default {default_k})"
    )
    g.add_argument("--k-min", type=int, default=2, help="smallest k of the sweep (default 2)")
    g.add_argument("--k-max", type=int, default=10, help="largest k of the sweep (default 10)")
    g.add_argument("--eps", help="DBSCAN radius or 'auto' (default: a robust knee of the k-distance curve)")
    g.add_argument(
        "--min-samples", type=int, help="DBSCAN/HDBSCAN/OPTICS core neighbours (default max(3, round(ln n)))"
    )
    g.add_argument(
        "--min-cluster-size", type=int, help="HDBSCAN/OPTICS smallest cluster (default max(min_samples, sqrt(n)/2))"
    )
    g.add_argument("--n-init", type=int, help="K-means restarts (default 4)")
    g.add_argument("--metric", choices=["cosine", "euclidean"], help="DBSCAN/HDBSCAN/OPTICS distance (default cosine)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cuml", "torch", "faiss", "sklearn", "kmedoids"],
        help="where to run (default auto: GPU first)",
    )
    g.add_argument(
        "--pca", type=int, help="project onto this many principal components first (0: never; default: automatic)"
    )
    g.add_argument(
        "--features",
        default="embedding",
        choices=["embedding", "raw"],
        help="cluster the embeddings or the raw-pixel baseline (grayscale, downscaled, PCA; needs readable paths)",
    )
    g.add_argument("--raw-size", type=int, default=64, help="raw features: side of the downscaled image (default 64)")
    g.add_argument("--raw-pca", type=int, default=16, help="raw features: PCA dimensions (default 16; 0 = none)")
    g.add_argument("--ground-truth", help="attribute to score against (e.g. label): accuracy, NMI, ARI, purity")


def _params(args: argparse.Namespace, *, curves: bool = False) -> Any:
    from service.analysis.cluster import ClusterParams

    try:
        k = None if args.k is None or str(args.k).lower() == "auto" else int(args.k)
        eps = None if args.eps is None or str(args.eps).lower() == "auto" else float(args.eps)
    except ValueError as e:
        raise UsageError(f"--k and --eps take a number or 'auto': {e}") from e
    return ClusterParams(
        algorithm=args.algorithm,
        backend=args.backend,
        k=k,
        k_min=args.k_min,
        k_max=args.k_max,
        eps=eps,
        min_samples=args.min_samples,
        min_cluster_size=args.min_cluster_size,
        n_init=args.n_init,
        seed=args.seed,
        pca_dim=args.pca,
        metric=args.metric,
        curves=curves,
    )


def _keys_filter(args: argparse.Namespace) -> list[str]:
    if not args.keys_file:
        return []
    return [line.strip() for line in Path(args.keys_file).read_text().splitlines() if line.strip()]


def _check_source(args: argparse.Namespace) -> None:
    if bool(args.parquet) == bool(args.server):
        raise UsageError("give either --parquet FILE or --server HOST:PORT --collection NAME")
    if args.server and not args.collection:
        raise UsageError("--server needs --collection")


def _client(args: argparse.Namespace) -> Any:
    from service.client.cluster import ClusterClient

    client = ClusterClient(args.server, timeout=args.timeout, **connection(args))
    try:
        wait_for_server(client, args)
    except BaseException:
        client.close()
        raise
    return client


def _local_items(args: argparse.Namespace) -> FetchedItems:
    items = load_parquet(args.parquet)
    wanted = _keys_filter(args)
    if wanted:
        index = {k: i for i, k in enumerate(items.keys)}
        missing = [k for k in wanted if k not in index]
        if missing:
            raise UsageError(f"{len(missing)} keys of --keys-file are not in {args.parquet}: {', '.join(missing[:5])}")
        rows = [index[k] for k in wanted]
        items = FetchedItems(wanted, items.vectors[rows], [items.attributes[i] for i in rows])
    return items


def _raw_features(paths: Sequence[str], args: argparse.Namespace) -> np.ndarray:
    from service.analysis.evaluate import raw_pixel_features

    if not paths or not all(paths):
        raise UsageError("--features raw needs the path of every image (the `path` column or attribute)")
    try:
        return raw_pixel_features(paths, size=args.raw_size, pca_dim=args.raw_pca or None, seed=args.seed)
    except OSError as e:
        raise UsageError(f"--features raw cannot read an image: {e}") from e


def run_clustering(args: argparse.Namespace, *, details: bool) -> Any:
    """Cluster as the arguments say, locally or on the server; returns a `ReportData`."""
    from service.analysis.report import ReportData

    _check_source(args)
    params = _params(args, curves=details)
    title = f"embedserve: {args.algorithm} on {args.parquet or args.collection}"
    if args.server and args.features == "embedding":
        with _client(args) as client:
            clustering = client.cluster(
                args.collection,
                params,
                keys=_keys_filter(args),
                ground_truth_attribute=args.ground_truth or "",
                include_details=details,
            )
        return ReportData.from_clustering(clustering, title=title)
    if args.server:
        # Raw pixels: ask the server for the keys, paths and labels only, then work here.
        from service.analysis.cluster import ClusterParams

        with _client(args) as client:
            r = client.cluster(
                args.collection,
                ClusterParams(k=2, n_init=1),
                keys=_keys_filter(args),
                ground_truth_attribute=args.ground_truth or "",
                include_details=True,
            )
        paths = r.paths or [""] * len(r.keys)
        attributes = [{"path": p} for p in paths]
        if args.ground_truth and r.truth:
            for a, t in zip(attributes, r.truth, strict=True):
                a[args.ground_truth] = t
        items = FetchedItems(r.keys, _raw_features(paths, args), attributes)
    else:
        items = _local_items(args)
        if args.features == "raw":
            items = FetchedItems(
                items.keys, _raw_features([a.get("path", "") for a in items.attributes], args), items.attributes
            )
    clustering = cluster_items(items, params, ground_truth_attribute=args.ground_truth or "", include_details=details)
    return ReportData.from_clustering(clustering, title=title)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def _write_json(path: str, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")


# -- commands -------------------------------------------------------------------------------------------------------


def cmd_cluster(args: argparse.Namespace) -> int:
    data = run_clustering(args, details=False)
    k = f", k = {data.k}" if data.k is not None else ""
    eps = f", eps = {data.eps:.4g}" if data.eps is not None else ""
    print(f"{data.algorithm} on {data.backend}: {len(data.keys)} items{k}{eps}, {data.seconds:.2f} s")
    for warning in data.warnings:
        print(f"warning: {warning}")
    if data.table is not None:
        print(f"\ncluster by {args.ground_truth}:\n{data.table.format()}")
    print("\nmetrics:")
    for name, value in sorted(data.metrics.items()):
        print(f"  {name:18s} {value:.4f}" if math.isfinite(value) else f"  {name:18s} n/a")
    if data.sweep:
        print("\nk sweep (silhouette, inertia):")
        for s in data.sweep:
            mark = "  <- chosen" if s.k == data.k else ""
            print(f"  k={s.k:<4d} {s.silhouette:8.4f}  {s.inertia:12.4f}{mark}")
    if args.json:
        payload = {
            "algorithm": data.algorithm,
            "backend": data.backend,
            "seconds": data.seconds,
            "k": data.k,
            "eps": data.eps,
            "metrics": {n: _finite(v) for n, v in data.metrics.items()},
            "assignments": dict(zip(data.keys, data.assignments.tolist(), strict=True)),
            "table": None
            if data.table is None
            else {
                "clusters": data.table.clusters,
                "classes": data.table.classes,
                "counts": data.table.counts.tolist(),
            },
            "sweep": [{"k": s.k, "silhouette": _finite(s.silhouette), "inertia": s.inertia} for s in data.sweep],
            "warnings": data.warnings,
        }
        _write_json(args.json, payload)
    return EXIT_OK


def _server_labels(args: argparse.Namespace) -> FetchedItems:
    """For `probe --server --features raw`: the keys with their `path`, target (and --group) attributes, no vectors.

    The Cluster call with details is what returns paths and attribute values; its clustering itself is not used.
    """
    from service.analysis.cluster import ClusterParams

    wanted = [args.target] + ([args.group] if args.group else [])
    attributes: list[dict[str, str]] = []
    keys: list[str] = []
    with _client(args) as client:
        for name in wanted:
            r = client.cluster(
                args.collection,
                ClusterParams(k=2, n_init=1),
                keys=_keys_filter(args),
                ground_truth_attribute=name,
                include_details=True,
            )
            if not attributes:
                keys = list(r.keys)
                paths = r.paths or [""] * len(keys)
                attributes = [{"path": p} for p in paths]
            values = dict(zip(r.keys, r.truth or [""] * len(r.keys), strict=True))
            for key, a in zip(keys, attributes, strict=True):
                a[name] = values.get(key, "")
    return FetchedItems(keys, np.zeros((len(keys), 0), np.float32), attributes)


def _image_paths(items: FetchedItems, args: argparse.Namespace) -> list[str]:
    """Where `--features raw` reads each image: DIR/key with `--image-dir DIR`, else the item's `path`."""
    if args.image_dir:
        root = Path(args.image_dir)
        if not root.is_dir():
            raise UsageError(f"--image-dir {root} is not a directory; give the directory that `embed` walked")
        return [str(root / key) for key in items.keys]
    paths = [a.get("path", "") for a in items.attributes]
    if not all(paths):
        raise UsageError(
            "--features raw needs the path of every image: these items have no `path`; pass --image-dir DIR, "
            "the directory given to `embed` (the keys are paths relative to it)"
        )
    missing = next((path for path in paths if not Path(path).is_file()), None)
    if missing is not None:
        raise UsageError(
            f"--features raw cannot read {missing}: there is no such file here; pass --image-dir DIR, the directory "
            "given to `embed` (the keys are paths relative to it)"
        )
    return paths


def cmd_probe(args: argparse.Namespace) -> int:
    _check_source(args)
    if args.image_dir and args.features != "raw":
        raise UsageError("--image-dir is where --features raw reads the images: add --features raw")
    if args.server and args.features == "embedding":
        if args.group_pattern:
            raise UsageError(
                "--group-pattern works on --parquet (or with --features raw); against a server, store the group as an "
                "attribute and pass --group"
            )
        with _client(args) as client:
            result = client.probe(
                args.collection,
                args.target,
                keys=_keys_filter(args),
                group_attribute=args.group or "",
                classifier=args.classifier,
                folds=args.folds,
                knn_k=args.knn_k,
                seed=args.seed,
            )
    else:
        items = _server_labels(args) if args.server else _local_items(args)
        if args.features == "raw":
            raw = _raw_features(_image_paths(items, args), args)
            items = FetchedItems(items.keys, raw, items.attributes)
        groups, group_name = None, None
        if args.group_pattern and not args.group:
            pattern = re.compile(args.group_pattern)
            groups = []
            for key in items.keys:
                m = pattern.search(key)
                if m is None:
                    raise UsageError(f"--group-pattern {args.group_pattern!r} does not match key {key!r}")
                groups.append(m.group(1) if m.groups() else m.group(0))
            group_name = f"pattern {args.group_pattern}"
        query = ProbeQuery(
            collection=args.parquet or args.collection,
            target_attribute=args.target,
            group_attribute=args.group or "",
            classifier=args.classifier,
            folds=args.folds,
            knn_k=args.knn_k,
            seed=args.seed,
        )
        result = probe_items(items, query, groups=groups, group_name=group_name)
    print(f"{len(result.confusion.sum(axis=1))} classes, {int(result.confusion.sum())} items")
    print(result.format())
    if args.json:
        _write_json(
            args.json,
            {
                "classifier": result.classifier,
                "folds": result.folds,
                "grouped_by": result.grouped_by,
                "accuracy": result.accuracy,
                "fold_accuracy": result.fold_accuracy,
                "chance": result.chance,
                "per_class": [
                    {"class": c.name, "precision": c.precision, "recall": c.recall, "f1": c.f1, "support": c.support}
                    for c in result.per_class
                ],
                "classes": result.classes,
                "confusion": result.confusion.tolist(),
            },
        )
    return EXIT_OK


def cmd_filter(args: argparse.Namespace) -> int:
    _check_source(args)
    examples = list(args.examples or [])
    if args.examples_file:
        examples += [ln.strip() for ln in Path(args.examples_file).read_text().splitlines() if ln.strip()]
    if not examples and not args.cluster_id:
        raise UsageError("give --examples KEY..., --examples-file FILE or --cluster-id N...")
    by_cluster = args.by_cluster or bool(args.cluster_id)
    unwanted_values = set(args.unwanted_values or [])
    if args.unwanted_attribute and not unwanted_values:
        raise UsageError("--unwanted-attribute needs --unwanted-values (the values that should be removed)")
    if args.server:
        with _client(args) as client:
            result = client.filter(
                args.collection,
                keys=_keys_filter(args),
                example_keys=examples,
                cluster_ids=args.cluster_id or [],
                by_cluster=by_cluster,
                params=_params(args) if by_cluster else None,
                max_distance=args.max_distance,
                unwanted_attribute=args.unwanted_attribute or "",
                unwanted_values=sorted(unwanted_values),
                method=args.method,
            )
    else:
        query = FilterQuery(
            collection=args.parquet,
            example_keys=examples,
            cluster_ids=args.cluster_id or [],
            by_cluster=by_cluster,
            cluster=_params(args) if by_cluster else None,
            max_distance=args.max_distance,
            unwanted_attribute=args.unwanted_attribute or "",
            unwanted_values=sorted(unwanted_values),
            method=args.method,
        )
        result = filter_items(_local_items(args), query)
    removed_clusters = result.removed_clusters
    how = f"clusters {removed_clusters}" if result.method == "cluster" else f"distance <= {result.threshold:.4g}"
    print(f"remove {len(result.remove)}, keep {len(result.keep)} (by {how})")
    if result.reason:
        print(f"method chosen: {result.reason}")
    if result.precision is not None and result.recall is not None and result.quality is not None:
        print(
            f"precision {result.precision:.3f}, recall {result.recall:.3f}, "
            f"quality 0.3·P + 0.7·R = {result.quality:.3f}"
        )
    if args.remove_out:
        Path(args.remove_out).write_text("".join(f"{k}\n" for k in result.remove))
    if args.keep_out:
        Path(args.keep_out).write_text("".join(f"{k}\n" for k in result.keep))
    if not args.remove_out and not args.json:
        for key in result.remove:
            print(key)
    if args.json:
        _write_json(
            args.json,
            {
                "method": result.method,
                "reason": result.reason,
                "threshold": result.threshold,
                "removed_clusters": removed_clusters,
                "remove": result.remove,
                "keep": result.keep,
                "precision": result.precision,
                "recall": result.recall,
                "quality": result.quality,
            },
        )
    return EXIT_OK


def cmd_outliers(args: argparse.Namespace) -> int:
    from service.analysis.report import write_outliers

    _check_source(args)
    if args.server:
        with _client(args) as client:
            result = client.outliers(args.collection, keys=_keys_filter(args), k=args.k, top=args.top)
    else:
        result = outliers_items(_local_items(args), OutlierQuery(collection=args.parquet, k=args.k, top=args.top))
    print(f"{len(result.keys)} of {result.n} items, most unusual first (k = {result.k}, cosine)")
    print(f"{'rank':>4}  {'kth-dist':>8}  {'LOF':>6}  {'score':>5}  key")
    for rank, key in enumerate(result.keys, start=1):
        i = rank - 1
        print(f"{rank:4d}  {result.kth_distance[i]:8.4f}  {result.lof[i]:6.3f}  {result.score[i]:5.3f}  {key}")
    if args.report:
        path = write_outliers(result, args.report)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        _write_json(
            args.json,
            {
                "k": result.k,
                "n": result.n,
                "items": [
                    {"key": key, "kth_distance": float(d), "lof": float(f), "score": float(sc)}
                    for key, d, f, sc in zip(result.keys, result.kth_distance, result.lof, result.score, strict=True)
                ],
            },
        )
    return EXIT_OK


def _report_provenance(args: argparse.Namespace) -> Any:
    """What the report's header says about the vectors: the Parquet file's metadata, or the server's model."""
    from service.analysis.report import Provenance

    if args.features == "raw":
        pca = f"PCA to {args.raw_pca}" if args.raw_pca else "all pixels"
        features = f"raw pixels ({args.raw_size}x{args.raw_size} grayscale, {pca})"
    else:
        features = "embedding"
    if args.parquet:
        import pyarrow.parquet as pq

        try:
            meta = pq.read_schema(args.parquet).metadata
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read {args.parquet}: {e}") from e
        return Provenance.from_parquet_metadata(meta, source=str(args.parquet), features=features)
    from service.client import EmbedClient, RemoteError

    source = f"collection {args.collection} on {args.server}"
    try:
        with EmbedClient(args.server, timeout=args.timeout, **connection(args)) as client:
            info = client.model_info()
    except RemoteError as e:
        print(f"warning: no model info from {args.server} for the report's header: {e}", file=sys.stderr)
        return Provenance(source=source, features=features)
    return Provenance.from_model_info(info, source=f"{source} (model: the server's)", features=features)


def cmd_report(args: argparse.Namespace) -> int:
    from service.analysis.report import write_report

    data = run_clustering(args, details=True)
    data.provenance = _report_provenance(args)
    path = write_report(data, args.out, per_cluster=args.exemplars)
    print(f"wrote {path} ({len(data.keys)} items, {data.algorithm} on {data.backend})", file=sys.stderr)
    return EXIT_OK


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `cluster`, `probe`, `filter` and `report` to the `embedserve` subcommands."""
    c = sub.add_parser("cluster", parents=[common], help="cluster stored embeddings and score the clusters")
    _add_source(c)
    _add_cluster_options(c)
    c.add_argument("--json", help="also write the assignments, metrics and table to this JSON file")
    c.set_defaults(func=cmd_cluster)

    p = sub.add_parser("probe", parents=[common], help="cross-validated linear probe / kNN classifier on embeddings")
    _add_source(p)
    p.add_argument("--target", default="label", help="attribute to predict (default label)")
    p.add_argument("--classifier", default="logreg", choices=["logreg", "knn"], help="classifier (default logreg)")
    p.add_argument("--group", help="attribute whose values never straddle a split (e.g. patient)")
    p.add_argument("--group-pattern", help="regex on the key whose first group is the group (Parquet only)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--knn-k", type=int, default=5, help="neighbours of the kNN classifier (default 5)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the folds")
    p.add_argument(
        "--features",
        default="embedding",
        choices=["embedding", "raw"],
        help="probe the embeddings or flattened grayscale pixels (the studies' baseline; reads the images: their "
        "`path`, or --image-dir; with --server the probe then runs here)",
    )
    p.add_argument("--raw-size", type=int, default=64, help="raw features: side of the downscaled image (default 64)")
    p.add_argument("--raw-pca", type=int, default=0, help="raw features: PCA dimensions (default 0 = all pixels)")
    p.add_argument(
        "--image-dir",
        help="raw features: read each image as DIR/KEY (the directory given to `embed`) instead of its `path`; "
        "with --server, the paths the server stored may not exist here",
    )
    p.add_argument("--json", help="also write the results to this JSON file")
    p.set_defaults(func=cmd_probe)

    f = sub.add_parser("filter", parents=[common], help="find the images to remove: like examples, or in clusters")
    _add_source(f)
    f.add_argument("--examples", nargs="+", help="keys of unwanted images")
    f.add_argument("--examples-file", help="file with keys of unwanted images, one per line")
    f.add_argument("--cluster-id", type=int, nargs="+", help="remove these clusters (of the clustering options)")
    f.add_argument("--by-cluster", action="store_true", help="remove the clusters holding the examples")
    f.add_argument(
        "--method",
        default="auto",
        choices=["auto", "distance", "cluster"],
        help="auto (default): the examples' density cluster, else the smaller side of a 2-way split, else the gap "
        "in the distances; distance: within --max-distance (default the examples' spread); cluster: --by-cluster",
    )
    f.add_argument("--max-distance", type=float, help="remove items this close to an example (default: their spread)")
    f.add_argument("--unwanted-attribute", help="score the removal: the attribute that marks unwanted items")
    f.add_argument("--unwanted-values", nargs="+", help="values of --unwanted-attribute that should be removed")
    f.add_argument("--remove-out", help="write the keys to remove to this file")
    f.add_argument("--keep-out", help="write the keys to keep to this file")
    f.add_argument("--json", help="also write the results to this JSON file")
    _add_cluster_options(f, default_k="auto")
    f.set_defaults(func=cmd_filter)

    o = sub.add_parser("outliers", parents=[common], help="rank items by k-th neighbour distance and LOF")
    _add_source(o)
    o.add_argument("--k", type=int, help="neighbours of both scores (default max(5, round(ln n)))")
    o.add_argument("--top", type=int, default=20, help="show the TOP most unusual items (default 20; 0 = all)")
    o.add_argument("--report", help="also write an HTML page with a thumbnail of each ranked item")
    o.add_argument("--json", help="also write the ranking to this JSON file")
    o.set_defaults(func=cmd_outliers)

    r = sub.add_parser("report", parents=[common], help="write a self-contained HTML report of a clustering")
    _add_source(r)
    _add_cluster_options(r)
    r.add_argument("--out", required=True, help="HTML file to write")
    r.add_argument("--exemplars", type=int, default=8, help="thumbnails per cluster (default 8)")
    r.set_defaults(func=cmd_report)
