"""What every `embedserve` subcommand shares: exit codes, the usage error, the engine flags, config and token.

The command line is the only place that reads flags and the environment; it does so through these helpers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.config import Config, load_config
from service.errors import (
    CollectionNotFoundError,
    EmbedServeError,
    EngineUnavailableError,
    ImageError,
    InvalidRequestError,
    KeyNotFoundError,
    NoIndexError,
)

EXIT_OK = 0
EXIT_FAILED = 1
"""The work failed: `embed` finished but some images could not be embedded (they are listed), an image given to
`neighbors --image` could not be embedded, or `serve` lost its engine."""
EXIT_IMAGES_FAILED = EXIT_FAILED
EXIT_USAGE = 2
"""The command line or a config value is wrong, the server refused the request as malformed (INVALID_ARGUMENT,
FAILED_PRECONDITION), or `serve` could not bind its port or open its data directory; the message says why."""
EXIT_UNAVAILABLE = 3
"""No answer: the server could not be reached, is not serving (UNAVAILABLE), busy (RESOURCE_EXHAUSTED) or too slow
(DEADLINE_EXCEEDED); retrying later may succeed."""
EXIT_NOT_FOUND = 4
"""A collection or key that does not exist (NOT_FOUND)."""
EXIT_AUTH = 5
"""The server wants a token, or another one (UNAUTHENTICATED, PERMISSION_DENIED)."""
EXIT_SERVER_ERROR = 6
"""The server failed internally (INTERNAL, UNKNOWN and any other status); its log has the request id."""
EXIT_INTERRUPTED = 130
"""Ctrl-C or SIGTERM (what was done is kept)."""

_EXIT_BY_STATUS = {
    "INVALID_ARGUMENT": EXIT_USAGE,
    "FAILED_PRECONDITION": EXIT_USAGE,
    "OUT_OF_RANGE": EXIT_USAGE,
    "ALREADY_EXISTS": EXIT_USAGE,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "RESOURCE_EXHAUSTED": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "CANCELLED": EXIT_UNAVAILABLE,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
}

TOKEN_ENV = "EMBEDSERVE_TOKEN"
TLS_ENV = "EMBEDSERVE_TLS"
CA_CERT_ENV = "EMBEDSERVE_CA_CERT"

UsageError = InvalidRequestError
"""The command line asks for something that cannot be done; the message says how to fix it.

The same class the use cases of `service.app` raise for a request they cannot serve (a missing attribute, an
unknown example key), so that the local mode of a command fails the way its server mode does."""


def token(args: argparse.Namespace) -> str | None:
    """The bearer token for `--server`: `--token`, else `$EMBEDSERVE_TOKEN`, else None."""
    value: str | None = getattr(args, "token", None) or os.environ.get(TOKEN_ENV) or None
    return value


def exit_code(error: BaseException) -> int:
    """The documented exit code for an error that ended a command (see the README's exit-code table)."""
    status = getattr(getattr(error, "code", None), "name", None)  # a client's RemoteError carries a gRPC code
    if isinstance(status, str):
        return _EXIT_BY_STATUS.get(status, EXIT_SERVER_ERROR)
    if isinstance(error, CollectionNotFoundError | KeyNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, EngineUnavailableError | NoIndexError):
        return EXIT_UNAVAILABLE
    if isinstance(error, ImageError):
        return EXIT_FAILED
    if isinstance(error, EmbedServeError):
        return EXIT_USAGE
    return EXIT_SERVER_ERROR


def add_tls_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--tls` and `--ca-cert`: how a subcommand reaches a `--server` that serves TLS (see `connection`)."""
    parser.add_argument(
        "--tls", action="store_true", default=None, help="connect with TLS (or EMBEDSERVE_TLS=1); implied by --ca-cert"
    )
    parser.add_argument(
        "--ca-cert", help="PEM file of the CA that signed the server's certificate (or EMBEDSERVE_CA_CERT)"
    )


def _env_flag(value: str) -> bool:
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise UsageError(f"{TLS_ENV}={value!r}: use 1 or 0")


def connection(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a client for `--server`: token, tls and root_certificates (flags > environment)."""
    ca_path = getattr(args, "ca_cert", None) or os.environ.get(CA_CERT_ENV) or None
    tls = getattr(args, "tls", None)
    if tls is None:
        tls = _env_flag(os.environ.get(TLS_ENV, ""))
    root: bytes | None = None
    if ca_path:
        try:
            root = Path(ca_path).read_bytes()
        except OSError as e:
            raise UsageError(f"--ca-cert {ca_path}: cannot read it ({e.strerror}); give a PEM file") from e
        tls = True
    return {"token": token(args), "tls": bool(tls), "root_certificates": root}


DEFAULT_WAIT_SECONDS = 60.0
"""How long a client subcommand waits for its server to be SERVING (starting, loading the model, restarting)."""


def add_wait_flag(parser: argparse.ArgumentParser) -> None:
    """`--wait SECONDS`: how long a client subcommand waits for `--server` to serve (and, for `embed`, to resume)."""
    parser.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT_SECONDS,
        metavar="SECONDS",
        help=f"wait up to this long for --server to serve, also after a restart (default {DEFAULT_WAIT_SECONDS:g}; "
        "0 = fail at once); then exit 3",
    )


def wait_notice(args: argparse.Namespace) -> Callable[[str], None]:
    """What a client prints, once per wait, when `--server` is not SERVING yet: where, why, and for how long."""

    def notice(reason: str) -> None:
        print(
            f"embedserve: waiting up to {args.wait:g} s for {args.server} to serve ({reason}); --wait changes it",
            file=sys.stderr,
            flush=True,
        )

    return notice


def wait_for_server(client: Any, args: argparse.Namespace) -> None:
    """Block until `client`'s server is SERVING, for at most `--wait` seconds (RemoteError UNAVAILABLE: exit 3)."""
    wait = float(getattr(args, "wait", DEFAULT_WAIT_SECONDS))
    if wait < 0:
        raise UsageError(f"--wait {wait:g}: give a number of seconds >= 0")
    if wait > 0:
        client.wait_until_serving(wait, on_wait=wait_notice(args))


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
    group.add_argument(
        "--runtime",
        choices=["auto", "torch", "openvino", "onnxruntime"],
        help="backbone runtime (default auto: OpenVINO on an x86 CPU, torch on CUDA)",
    )
    group.add_argument(
        "--cpu-precision",
        choices=["auto", "float32", "bfloat16"],
        help="precision on the CPU (default auto: bfloat16 where the CPU has AMX or AVX512-BF16)",
    )
    group.add_argument(
        "--cpu-threads", type=int, metavar="N", help="threads for decode and inference together (default: all cores)"
    )
    group.add_argument("--decode-workers", type=int, metavar="N", help="decode threads (default: from the budget)")


def engine_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides of the flags `add_engine_flags` adds (None where not given)."""
    return {
        "backbone.model": args.model,
        "backbone.device": args.device,
        "backbone.amp_dtype": args.amp_dtype,
        "backbone.runtime": args.runtime,
        "backbone.cpu_precision": args.cpu_precision,
        "engine.cpu_threads": args.cpu_threads,
        "decode.workers": args.decode_workers,
        "engine.batch_size": args.batch_size,
        "decode.resize": args.resize,
        "decode.pad": args.pad,
        "decode.backend": args.decode_backend,
    }
