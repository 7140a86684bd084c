"""`embedserve embed` (a directory of images into a Parquet file, locally or through a server) and
`embedserve export-backbone`.

    embedserve embed tests/data/oct-sample --out oct.parquet
    embedserve embed scans/ --out scans.parquet --server HOST:PORT --store --collection oct
    embedserve embed /shared/scans --out /shared/scans.parquet --ray ray://HEAD:10001
    embedserve export-backbone --model efficientnet_lite0 --out lite0.ts
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from service.cli.common import (
    EXIT_IMAGES_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    UsageError,
    add_engine_flags,
    add_tls_flags,
    add_wait_flag,
    connection,
    engine_overrides,
    load,
    wait_notice,
)

if TYPE_CHECKING:
    from service.jobs.embed_dir import EmbedJobOptions, JobSummary
    from service.types import ModelInfo


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `embed` and `export-backbone` to the `embedserve` subcommands."""
    embed = sub.add_parser("embed", parents=[common], help="embed every image under a directory into a Parquet file")
    embed.add_argument("directory", help="directory to walk recursively")
    embed.add_argument("--out", required=True, help="Parquet file to write; re-running resumes it")
    embed.add_argument("--no-labels", action="store_true", help="leave `label` null instead of the parent folder")
    embed.add_argument(
        "--quiet", action="store_true", help="no progress bar (the summary and failures are still printed)"
    )
    embed.add_argument("--server", help="HOST:PORT of a running embedserve: stream the images to it instead")
    embed.add_argument("--token", help="bearer token for --server (or EMBEDSERVE_TOKEN)")
    add_tls_flags(embed)
    embed.add_argument(
        "--store", action="store_true", help="also store the vectors (with label and path) in the server's index"
    )
    embed.add_argument("--collection", default="", help="collection for --store (default: default)")
    embed.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="NAME=REGEX",
        help="with --store, also store NAME captured from each relative path by REGEX (its group NAME, else its "
        "first group, else the match); repeatable, e.g. --attr 'patient=-(\\d+)-'",
    )
    embed.add_argument(
        "--attributes",
        metavar="CSV",
        help="with --store, also store the columns of this CSV file's row for each key (a header with `key`)",
    )
    add_wait_flag(embed)
    embed.add_argument(
        "--ray",
        nargs="?",
        const="auto",
        metavar="ADDRESS",
        help="run the job on Ray Data (pip install 'embedserve[ray]'): actors on every node embed (or, with "
        "--server, stream to the server); ADDRESS of the cluster, or `auto` (the default) = $RAY_ADDRESS, else "
        "Ray started on this machine; every node must see DIRECTORY at the same path",
    )
    embed.add_argument(
        "--part-rows",
        type=int,
        default=2048,
        help="rows per crash-safe part file: at most this many are lost to a kill",
    )
    add_engine_flags(embed)
    embed.set_defaults(func=cmd_embed)

    export = sub.add_parser("export-backbone", parents=[common], help="write a built-in backbone as TorchScript")
    export.add_argument("--model", default="efficientnet_lite0", help="efficientnet_lite0 or efficientnet_lite2")
    export.add_argument("--out", required=True, help="file to write, e.g. model.ts")
    export.set_defaults(func=cmd_export_backbone)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_embed(args: argparse.Namespace) -> int:
    from service.jobs.attributes import AttributeRules
    from service.jobs.embed_dir import EmbedJobOptions

    root = Path(args.directory)
    if not root.is_dir():  # before a model is loaded or a server is dialled
        why = "" if root.exists() else " (it does not exist)"
        raise UsageError(f"{root} is not a directory{why}; pass the directory that holds the images")
    if args.store and not args.server:
        raise UsageError("--store keeps the vectors in a server's index: add --server HOST:PORT")
    if (args.attr or args.attributes) and not args.store:
        raise UsageError("--attr and --attributes are stored in the server's index: add --server HOST:PORT --store")
    attributes = AttributeRules.build(attrs=args.attr, csv_path=Path(args.attributes) if args.attributes else None)
    options = EmbedJobOptions(
        root=root,
        out=Path(args.out),
        labels=not args.no_labels,
        progress=not args.quiet,
        part_rows=args.part_rows,
        attributes=attributes or None,
    )
    # A plain `kill` should stop as cleanly as Ctrl-C: flush what was embedded, leave a resumable output.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if args.ray:
            summary = _embed_ray(args, options)
        else:
            summary = _embed_remote(args, options) if args.server else _embed_local(args, options)
    except KeyboardInterrupt:
        print(
            f"interrupted: what was embedded is kept; re-run the same command to resume into {options.out}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    rate = summary.images_per_second
    print(
        f"{summary.embedded} embedded, {summary.failed} failed, {summary.already_done} already in {options.out} "
        f"({summary.found} found) in {summary.seconds:.1f} s, {rate:.1f} images/s",
        file=sys.stderr,
    )
    if summary.failed:
        print(f"failures listed in {summary.failures_path}:", file=sys.stderr)
        for key, reason, message in summary.failures[:10]:
            print(f"  {key}: {reason}: {message}", file=sys.stderr)
        if summary.failed > 10:
            print(f"  ... and {summary.failed - 10} more", file=sys.stderr)
        return EXIT_IMAGES_FAILED
    return EXIT_OK


def _describe(info: ModelInfo, batch_size: int, quiet: bool, where: str) -> None:
    if not quiet:
        print(
            f"model {info.backbone} ({info.embedding_dim}-d, {info.precision} on {info.device}{where}), "
            f"decode {info.decode_backend}, batch {batch_size}",
            file=sys.stderr,
        )


def _embed_local(args: argparse.Namespace, options: EmbedJobOptions) -> JobSummary:
    from service.embedding.engine import Engine
    from service.jobs.embed_dir import run_embed_job

    cfg = load(args, engine_overrides(args))
    with Engine.from_config(cfg) as engine:
        _describe(engine.info, cfg.engine.batch_size, args.quiet, "")
        return run_embed_job(engine, options)


def _embed_remote(args: argparse.Namespace, options: EmbedJobOptions) -> JobSummary:
    from service.client.remote import RemoteEmbedder
    from service.jobs.embed_dir import run_embed_job

    batch_size = args.batch_size or 32
    if args.wait < 0:
        raise UsageError(f"--wait {args.wait:g}: give a number of seconds >= 0")
    # Waits for SERVING, and resumes after the server drains or restarts, up to --wait each time (then exit 3).
    with RemoteEmbedder(
        args.server,
        batch_size=batch_size,
        **connection(args),
        store=args.store,
        collection=args.collection,
        wait=args.wait,
        on_wait=wait_notice(args),
    ) as remote:
        _describe(remote.info, batch_size, args.quiet, f" at {args.server}")
        return run_embed_job(remote, options)


def _embed_ray(args: argparse.Namespace, options: EmbedJobOptions) -> JobSummary:
    try:
        from service.jobs import ray_job
    except ImportError as e:
        raise UsageError(f"--ray needs Ray ({e}): pip install 'embedserve[ray]'") from e
    from service.jobs.embed_dir import run_embed_job

    address = args.ray if args.ray != "auto" else os.environ.get("RAY_ADDRESS") or ray_job.LOCAL
    factory: ray_job.EngineFactory | ray_job.ServerFactory
    if args.server:
        if args.wait < 0:
            raise UsageError(f"--wait {args.wait:g}: give a number of seconds >= 0")
        batch_size = args.batch_size or 32
        client = {"batch_size": batch_size, **connection(args), "store": args.store, "collection": args.collection}
        factory = ray_job.ServerFactory(target=args.server, client_options=client | {"wait": args.wait})
        where = f" at {args.server}"
    else:
        cfg = load(args, engine_overrides(args))
        factory, batch_size, where = ray_job.EngineFactory(cfg=cfg), cfg.engine.batch_size, ""
    ray_options = ray_job.RayJobOptions(address=address)
    with ray_job.ray_session(ray_options):
        embedder = ray_job.RayEmbedder.create(factory, ray_options, batch_size=batch_size)
        plan = embedder.plan
        _describe(embedder.info, batch_size, args.quiet, f"{where}; Ray: {plan.actors} actors x {plan.num_cpus} CPUs")
        summary = run_embed_job(embedder, options)
    if not args.quiet:
        nodes = ", ".join(f"{node[:8]}: {count}" for node, count in sorted(embedder.images_by_node.items()))
        print(f"images embedded per Ray node: {nodes or 'none'}", file=sys.stderr)
    return summary


def cmd_export_backbone(args: argparse.Namespace) -> int:
    from service.embedding.backbone import export_torchscript

    spec = export_torchscript(args.model, args.out)
    print(f"wrote {args.out}: {spec.name}, {spec.embedding_dim}-d, input {spec.input_size}x{spec.input_size}")
    return EXIT_OK
