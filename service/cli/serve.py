"""`embedserve serve`: the gRPC server (Embedder and Clusterer) in the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from service.cli.common import add_engine_flags, engine_overrides, load


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Add `serve` to the `embedserve` subcommands."""
    serve = sub.add_parser("serve", parents=[common], help="run the gRPC server")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051; 0 = any free port)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 9464; -1 = off)")
    serve.add_argument("--data-dir", help="where collections live (default ./var/embedserve)")
    add_engine_flags(serve)
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
    from service.api.clusterer import add_clusterer
    from service.api.errors import RequestIdFilter
    from service.api.server import run_server

    for handler in logging.getLogger().handlers:  # every line logged while handling a call names its request
        handler.addFilter(RequestIdFilter())

    overrides = engine_overrides(args) | {
        "server.host": args.host,
        "server.port": args.port,
        "server.metrics_port": args.metrics_port,
        "data_dir": args.data_dir,
    }
    return run_server(load(args, overrides), extra_servicers=[add_clusterer], extra_service_names=[CLUSTER_SERVICE])
