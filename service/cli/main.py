"""The `embedserve` command line. The only place that reads flags and the environment."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import service
from service.config import Config, load_config
from service.errors import EmbedServeError

if TYPE_CHECKING:
    from service.jobs.embed_dir import EmbedJobOptions, JobSummary
    from service.types import ModelInfo

logger = logging.getLogger("embedserve")

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model and decoding (override the config file and EMBEDSERVE_* variables)")
    group.add_argument("--model", help="efficientnet_lite0 (default), efficientnet_lite2 or torchscript:PATH")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    group.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    group.add_argument("--resize", choices=["squash", "letterbox"], help="resize policy (default squash)")
    group.add_argument("--pad", choices=["zero", "white", "edge"], help="letterbox padding (default zero)")
    group.add_argument("--decode-backend", choices=["auto", "dali", "torchvision", "pillow"], help="decoder")
    group.add_argument("--amp-dtype", choices=["float16", "bfloat16"], help="autocast precision on CUDA")


def _engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone.model": args.model,
        "backbone.device": args.device,
        "backbone.amp_dtype": args.amp_dtype,
        "engine.batch_size": args.batch_size,
        "decode.resize": args.resize,
        "decode.pad": args.pad,
        "decode.backend": args.decode_backend,
    }


def _config(args: argparse.Namespace, overrides: dict[str, Any]) -> Config:
    return load_config(args.config, env=os.environ, overrides=overrides)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def cmd_embed(args: argparse.Namespace) -> int:
    from service.jobs.embed_dir import EmbedJobOptions

    options = EmbedJobOptions(
        root=Path(args.directory),
        out=Path(args.out),
        labels=not args.no_labels,
        progress=not args.quiet,
        part_rows=args.part_rows,
    )
    if args.store and not args.server:
        raise EmbedServeError("--store keeps the vectors in a server's index: add --server HOST:PORT")
    # A plain `kill` should stop as cleanly as Ctrl-C: flush what was embedded, leave a resumable output.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
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

    cfg = _config(args, _engine_overrides(args))
    with Engine.from_config(cfg) as engine:
        _describe(engine.info, cfg.engine.batch_size, args.quiet, "")
        return run_embed_job(engine, options)


def _embed_remote(args: argparse.Namespace, options: EmbedJobOptions) -> JobSummary:
    from service.client.sync import RemoteEmbedder
    from service.jobs.embed_dir import run_embed_job

    token = args.token or os.environ.get("EMBEDSERVE_TOKEN", "")
    batch_size = args.batch_size or 32
    with RemoteEmbedder(
        args.server, batch_size=batch_size, token=token or None, store=args.store, collection=args.collection
    ) as remote:
        _describe(remote.info, batch_size, args.quiet, f" at {args.server}")
        return run_embed_job(remote, options)


def cmd_export_backbone(args: argparse.Namespace) -> int:
    from service.embedding.backbone import export_torchscript

    spec = export_torchscript(args.model, args.out)
    print(f"wrote {args.out}: {spec.name}, {spec.embedding_dim}-d, input {spec.input_size}x{spec.input_size}")
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from service.api.server import run_server

    overrides = _engine_overrides(args) | {
        "server.host": args.host,
        "server.port": args.port,
        "server.metrics_port": args.metrics_port,
        "data_dir": args.data_dir,
    }
    from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
    from service.api.clusterer import add_clusterer

    return run_server(_config(args, overrides), extra_servicers=[add_clusterer], extra_service_names=[CLUSTER_SERVICE])


def cmd_bench(args: argparse.Namespace) -> int:
    if args.bench_command == "generate":
        from bench import generate

        return generate.run(args)
    if args.bench_command == "run":
        from bench import run

        return run.run(args)
    from bench import kernels

    argv = (
        ["--device", args.device] + (["--quick"] if args.quick else []) + (["--json", args.json] if args.json else [])
    )
    return int(kernels.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedserve", description=service.__doc__)
    parser.add_argument("--version", action="version", version=f"embedserve {service.__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    parser.add_argument("--config", help="TOML config file (flags > EMBEDSERVE_* environment > file > defaults)")
    # The same options after the subcommand (`embedserve serve --log-level INFO`); unset ones keep the above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING (default) or ERROR")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True)

    embed = sub.add_parser("embed", parents=[common], help="embed every image under a directory into a Parquet file")
    embed.add_argument("directory", help="directory to walk recursively")
    embed.add_argument("--out", required=True, help="Parquet file to write; re-running resumes it")
    embed.add_argument("--no-labels", action="store_true", help="leave `label` null instead of the parent folder")
    embed.add_argument(
        "--quiet", action="store_true", help="no progress bar (the summary and failures are still printed)"
    )
    embed.add_argument("--server", help="HOST:PORT of a running embedserve: stream the images to it instead")
    embed.add_argument("--token", help="bearer token for --server (or EMBEDSERVE_TOKEN)")
    embed.add_argument(
        "--store", action="store_true", help="also store the vectors (with label and path) in the server's index"
    )
    embed.add_argument("--collection", default="", help="collection for --store (default: default)")
    embed.add_argument(
        "--part-rows",
        type=int,
        default=2048,
        help="rows per crash-safe part file: at most this many are lost to a kill",
    )
    _add_engine_flags(embed)
    embed.set_defaults(func=cmd_embed)

    export = sub.add_parser("export-backbone", parents=[common], help="write a built-in backbone as TorchScript")
    export.add_argument("--model", default="efficientnet_lite0", help="efficientnet_lite0 or efficientnet_lite2")
    export.add_argument("--out", required=True, help="file to write, e.g. model.ts")
    export.set_defaults(func=cmd_export_backbone)

    from service.cli.index import add_commands as add_index_commands

    add_index_commands(sub, common)

    serve = sub.add_parser("serve", parents=[common], help="run the gRPC server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464; -1 = off)")
    serve.add_argument("--data-dir", help="where collections live (default ./var/embedserve)")
    _add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", parents=[common], help="benchmarks and the synthetic OCT data set")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    generate = bench_sub.add_parser("generate", parents=[common], help="write a synthetic twin of the Kermany OCT set")
    _add_generate_arguments(generate)
    bench_run = bench_sub.add_parser("run", parents=[common], help="time every stage against the baseline")
    _add_run_arguments(bench_run)
    kernels = bench_sub.add_parser("kernels", parents=[common], help="time each kernel against its torch reference")
    kernels.add_argument("--device", default="cuda", help="device to time on (default cuda)")
    kernels.add_argument("--quick", action="store_true", help="small inputs, a few seconds")
    kernels.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(func=cmd_bench)
    from service.cli.analysis import register as register_cluster_commands

    register_cluster_commands(sub, common)
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    from bench import run

    run.add_arguments(parser)


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from bench import generate

    generate.add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embedserve` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EmbedServeError as e:
        print(f"embedserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
