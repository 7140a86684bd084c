"""What every `embedserve` subcommand shares: exit codes, the usage error, the engine flags, config and token.

The command line is the only place that reads flags and the environment; it does so through these helpers.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from service.config import Config, load_config
from service.errors import InvalidRequestError

EXIT_OK = 0
EXIT_IMAGES_FAILED = 1
"""`embed` finished, but some images could not be embedded (they are listed)."""
EXIT_USAGE = 2
"""The command line, a config value or a server refused what was asked (the message says why)."""
EXIT_INTERRUPTED = 130

TOKEN_ENV = "EMBEDSERVE_TOKEN"

UsageError = InvalidRequestError
"""The command line asks for something that cannot be done; the message says how to fix it.

The same class the use cases of `service.app` raise for a request they cannot serve (a missing attribute, an
unknown example key), so that the local mode of a command fails the way its server mode does."""


def token(args: argparse.Namespace) -> str | None:
    """The bearer token for `--server`: `--token`, else `$EMBEDSERVE_TOKEN`, else None."""
    value: str | None = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    return value


def load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    """The config: `overrides` (from flags) > `EMBEDSERVE_*` environment > `--config` file > defaults."""
    return load_config(getattr(args, "config", None), env=os.environ, overrides=overrides or {})


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    """The model and decoding flags of `embed` and `serve`."""
    group = parser.add_argument_group("model and decoding (override the config file and EMBEDSERVE_* variables)")
    group.add_argument("--model", help="efficientnet_lite0 (default), efficientnet_lite2 or torchscript:PATH")
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], help="where the model runs (default auto)")
    group.add_argument("--batch-size", type=int, help="images per forward pass (default 64)")
    group.add_argument("--resize", choices=["squash", "letterbox"], help="resize policy (default squash)")
    group.add_argument("--pad", choices=["zero", "white", "edge"], help="letterbox padding (default zero)")
    group.add_argument("--decode-backend", choices=["auto", "dali", "torchvision", "pillow"], help="decoder")
    group.add_argument("--amp-dtype", choices=["float16", "bfloat16"], help="autocast precision on CUDA")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of the flags `add_engine_flags` adds (None where not given)."""
    return {
        "backbone.model": args.model,
        "backbone.device": args.device,
        "backbone.amp_dtype": args.amp_dtype,
        "engine.batch_size": args.batch_size,
        "decode.resize": args.resize,
        "decode.pad": args.pad,
        "decode.backend": args.decode_backend,
    }
