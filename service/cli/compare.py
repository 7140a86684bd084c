"""`embedserve compare DIR`: the studies' comparisons in one command, one table.

    embedserve compare tests/data/oct-sample --features cnn,raw --folds 4 --group-pattern '[A-Z]+-(\\d+)-'
    embedserve compare scans/ --resize letterbox --pad zero,white,edge
    embedserve compare scans/ --backbone efficientnet_lite0,efficientnet_lite2,torchscript:resnet50.ts --json t.json

Runs in process (no server): each setting of the grid is embedded once, then judged by K-means (k = the number of
class folders) and the cross-validated linear probe; see `service.app.compare`. Progress goes to stderr, the table
to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli.common import EXIT_OK, UsageError, load

if TYPE_CHECKING:
    from service.app.compare import CompareTable

_GRID_FLAGS = ("backbone", "resize", "pad")


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(part.strip() for part in value.split(","))


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `compare` to the `embedserve` subcommands."""
    c = sub.add_parser(
        "compare",
        parents=[common],
        help="embed a labelled directory under a grid of backbones / resize / pad / features and compare them",
        description="Embed the images under DIR (one folder per class) once per setting of the grid and print one "
        "table: K-means (k = number of classes) Hungarian accuracy, NMI and ARI, the cross-validated linear probe's "
        "accuracy, and images/s. Lists are comma-separated.",
    )
    c.add_argument("directory", help="directory with one sub-folder per class (the folder name is the label)")
    grid = c.add_argument_group("the grid (comma-separated lists)")
    grid.add_argument(
        "--backbone",
        help="efficientnet_lite0, efficientnet_lite2, torchscript:PATH (default: backbone.model of the config)",
    )
    grid.add_argument("--resize", help="squash, letterbox (default: decode.resize of the config)")
    grid.add_argument("--pad", help="zero, white, edge: letterbox padding (default: decode.pad of the config)")
    grid.add_argument(
        "--features",
        default="cnn",
        help="cnn (the backbone's embedding), raw (grayscale pixels, the studies' baseline; one row whatever the "
        "backbone, resize and pad), or cnn,raw (default cnn)",
    )
    judge = c.add_argument_group("judging")
    judge.add_argument("--seed", type=int, default=0, help="seed of K-means and of the probe's folds (default 0)")
    judge.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="run K-means and the probe with N seeds from --seed, show means (default 1)",
    )
    judge.add_argument("--folds", type=int, default=5, help="probe cross-validation folds (default 5)")
    judge.add_argument(
        "--group-pattern", help="regex on the key whose first group is the group (a patient never straddles folds)"
    )
    judge.add_argument("--classifier", default="logreg", choices=["logreg", "knn"], help="probe (default logreg)")
    judge.add_argument(
        "--cluster-backend",
        default="auto",
        choices=["auto", "cuml", "torch", "faiss", "sklearn"],
        help="where K-means runs (default auto: GPU first, else FAISS)",
    )
    judge.add_argument("--raw-size", type=int, default=64, help="raw features: side of the grayscale image (64)")
    judge.add_argument(
        "--raw-pca", type=int, default=16, help="raw features: PCA dimensions K-means sees (16; 0 = all pixels)"
    )
    judge.add_argument("--json", help="also write the table (and per-seed values) to this JSON file")
    engine = c.add_argument_group("engine (override the config file and EMBEDSERVE_* variables)")
    engine.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the models run (default auto)")
    engine.add_argument(
        "--runtime", choices=["auto", "torch", "openvino", "onnxruntime"], help="backbone runtime (default auto)"
    )
    engine.add_argument("--cpu-precision", choices=["auto", "float32", "bfloat16"], help="precision on the CPU")
    engine.add_argument("--cpu-threads", type=int, metavar="N", help="threads for decode and inference together")
    engine.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    engine.add_argument("--decode-backend", choices=["auto", "dali", "torchvision", "pillow"], help="decoder")
    c.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from service.app.compare import CompareGrid, CompareOptions, run_compare
    from service.errors import ConfigError

    root = Path(args.directory)
    if not root.is_dir():  # before any model is loaded
        why = "" if root.exists() else " (it does not exist)"
        raise UsageError(f"{root} is not a directory{why}; pass the directory that holds the class folders")
    features = _split(args.features) or ()
    if "cnn" not in features:
        given = [f"--{name}" for name in _GRID_FLAGS if getattr(args, name) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} choose CNN embeddings: add cnn to --features (e.g. cnn,raw)")
    cfg = load(
        args,
        {
            "backbone.device": args.device,
            "backbone.runtime": args.runtime,
            "backbone.cpu_precision": args.cpu_precision,
            "engine.cpu_threads": args.cpu_threads,
            "engine.batch_size": args.batch_size,
            "decode.backend": args.decode_backend,
        },
    )
    resizes = _split(args.resize) or (cfg.decode.resize,)
    if args.pad is not None and "letterbox" not in resizes:
        raise UsageError("--pad only applies to letterbox resizing: add --resize letterbox (or squash,letterbox)")
    try:
        grid = CompareGrid(
            backbones=_split(args.backbone) or (cfg.backbone.model,),
            resizes=resizes,  # type: ignore[arg-type]  # the grid checks the values
            pads=_split(args.pad) or (cfg.decode.pad,),  # type: ignore[arg-type]
            features=features,  # type: ignore[arg-type]
        )
        options = CompareOptions(
            seed=args.seed,
            seeds=args.seeds,
            folds=args.folds,
            group_pattern=args.group_pattern,
            classifier=args.classifier,
            cluster_backend=args.cluster_backend,
            raw_size=args.raw_size,
            raw_pca=args.raw_pca,
        )
    except ConfigError as e:
        raise UsageError(f"compare: {e}") from e

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    table = run_compare(root, grid, options, base=cfg, progress=progress)
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table_json(table), indent=1, allow_nan=False) + "\n")
    return EXIT_OK


def format_table(table: CompareTable) -> str:
    """The table `compare` prints: a header line, then one line per setting."""
    o = table.options
    classes = ", ".join(f"{name} {count}" for name, count in table.classes.items())
    seeds = f"seed {o.seed}" if o.seeds == 1 else f"mean of seeds {o.seed}..{o.seed + o.seeds - 1}"
    folds = sorted({row.probe_folds for row in table.rows})
    grouped = f", grouped by {table.grouped_by}" if table.grouped_by else ""
    lines = [
        f"{table.images} images, {len(table.classes)} classes ({classes}); {seeds}",
        f"K-means: k = {len(table.classes)}, Hungarian accuracy / NMI / ARI against the class folders; "
        f"probe: {o.classifier}, {'/'.join(map(str, folds))} folds{grouped}, chance {table.chance:.3f}",
        "",
    ]
    headers = ["setting", "dim", "n", "img/s", "km acc", "km nmi", "km ari", "probe"]
    body = [
        [
            row.setting.name,
            str(row.dim),
            str(row.n),
            f"{row.images_per_second:.1f}",
            f"{row.kmeans['accuracy']:.3f}",
            f"{row.kmeans['nmi']:.3f}",
            f"{row.kmeans['ari']:.3f}",
            f"{row.probe_accuracy:.3f}",
        ]
        for row in table.rows
    ]
    widths = [max(len(r[i]) for r in [headers, *body]) for i in range(len(headers))]
    for r in [headers, *body]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    models = list(dict.fromkeys(row.model for row in table.rows if row.model))
    if models:
        lines += ["", f"ran: {'; '.join(models)}"]
    return "\n".join(lines)


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


def table_json(table: CompareTable) -> dict[str, Any]:
    """What `--json` writes: the grid's options and, per setting, every number of the table plus per-seed values."""
    o = table.options
    return {
        "directory": table.root,
        "images": table.images,
        "classes": table.classes,
        "chance": table.chance,
        "options": {
            "seed": o.seed,
            "seeds": o.seeds,
            "folds": o.folds,
            "group_pattern": o.group_pattern,
            "classifier": o.classifier,
            "cluster_backend": o.cluster_backend,
            "raw_size": o.raw_size,
            "raw_pca": o.raw_pca,
        },
        "rows": [
            {
                "setting": row.setting.name,
                "features": row.setting.features,
                "backbone": row.setting.backbone,
                "resize": row.setting.resize,
                "pad": row.setting.pad,
                "model": row.model,
                "dim": row.dim,
                "n": row.n,
                "failed": row.failed,
                "seconds": row.seconds,
                "images_per_second": row.images_per_second,
                "kmeans": {
                    "backend": row.kmeans_backend,
                    **{m: _finite(v) for m, v in row.kmeans.items()},
                    "per_seed": [{m: _finite(v) for m, v in s.items()} for s in row.kmeans_per_seed],
                },
                "probe": {
                    "accuracy": row.probe_accuracy,
                    "folds": row.probe_folds,
                    "per_seed": row.probe_per_seed,
                },
            }
            for row in table.rows
        ],
    }
