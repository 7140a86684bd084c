"""The `embedserve` command line: the parser and `main()` (the console script). The only place that reads flags and
the environment (through `service.cli.common`); each subcommand lives in its own module of `service.cli`."""

from __future__ import annotations

import argparse
import logging
import sys

import service
from service.cli import analysis, bench, embed, index, serve
from service.cli.common import EXIT_INTERRUPTED, EXIT_USAGE
from service.errors import EmbedServeError


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, in the order `--help` lists them."""
    parser = argparse.ArgumentParser(prog="embedserve", description=service.__doc__)
    parser.add_argument("--version", action="version", version=f"embedserve {service.__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    parser.add_argument("--config", help="TOML config file (flags > EMBEDSERVE_* environment > file > defaults)")
    # The same options after the subcommand (`embedserve serve --log-level INFO`); unset ones keep the above.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default=argparse.SUPPRESS, help="DEBUG, INFO, WARNING (default) or ERROR")
    common.add_argument("--config", default=argparse.SUPPRESS, help="TOML config file")
    sub = parser.add_subparsers(dest="command", required=True)
    embed.add_commands(sub, common)
    index.add_commands(sub, common)
    serve.add_commands(sub, common)
    bench.add_commands(sub, common)
    analysis.register(sub, common)
    return parser


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
