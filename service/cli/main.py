"""The `embedserve` command line: the parser and `main()` (the console script). The only place that reads flags and
the environment (through `service.cli.common`); each subcommand lives in its own module of `service.cli`."""

from __future__ import annotations

import argparse
import sys

import service
from service.cli import analysis, bench, compare, embed, index, serve
from service.cli.common import EXIT_INTERRUPTED, EXIT_USAGE, exit_code
from service.cli.logs import quiet_grpc_core, resolve, setup_logging
from service.errors import EmbedServeError

_LEVEL_HELP = "DEBUG, INFO, WARNING or ERROR (or EMBEDSERVE_LOG_LEVEL; default INFO for serve, else WARNING)"
_FORMAT_HELP = "text (default) or json: one JSON object per line (or EMBEDSERVE_LOG_FORMAT)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, in the order `--help` lists them."""
    parser = argparse.ArgumentParser(prog="embedserve", description=service.__doc__)
    parser.add_argument("--version", action="version", version=f"embedserve {service.__version__}")
    parser.add_argument("--log-level", help=_LEVEL_HELP)
    parser.add_argument("--log-format", choices=["text", "json"], help=_FORMAT_HELP)
    parser.add_argument("--config", help="TOML config file (flags > EMBEDSERVE_* environment > file > defaults)")
    # The same options after the subcommand (`embedserve serve --log-level INFO`); unset ones keep the above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help=_LEVEL_HELP)
    common.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS, help=_FORMAT_HELP)
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True)
    embed.add_commands(sub, common)
    index.add_commands(sub, common)
    serve.add_commands(sub, common)
    bench.add_commands(sub, common)
    analysis.register(sub, common)
    compare.add_commands(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `embedserve` console script."""
    quiet_grpc_core()
    args = build_parser().parse_args(argv)
    try:
        level, fmt = resolve(args.log_level, args.log_format, command=args.command)
    except EmbedServeError as e:
        print(f"embedserve: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(level, fmt)
    try:
        return int(args.func(args))
    except EmbedServeError as e:
        print(f"embedserve: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
