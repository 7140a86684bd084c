"""Logging of the `embedserve` command line: the level, text or JSON lines, and the quieted library loggers.

    setup_logging(level=None, fmt=None, command="serve")   # flags > EMBEDSERVE_LOG_LEVEL / _FORMAT > defaults

`serve` logs at INFO by default (its address, model and readiness are the first thing an operator needs); the other
commands at WARNING, since they print their own results. `--log-format json` writes one JSON object per line with
`ts`, `level`, `logger`, `message`, and `request_id` when the record has one (see `RequestIdFilter` of the server).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from datetime import UTC, datetime
from typing import Literal

from service.errors import ConfigError

LOG_LEVEL_ENV = "EMBEDSERVE_LOG_LEVEL"
LOG_FORMAT_ENV = "EMBEDSERVE_LOG_FORMAT"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]

QUIET_LOGGERS = ("faiss.loader",)
"""Libraries whose INFO lines are noise to an operator (faiss probes AVX-512 / AVX2 builds and logs each miss)."""

_HANDLER_NAME = "embedserve-cli"
_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: ts (UTC, ISO 8601), level, logger, message, request_id, exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def resolve(
    level: str | None, fmt: str | None, *, command: str, env: Mapping[str, str] | None = None
) -> tuple[str, LogFormat]:
    """The level and format to use: flag, else `EMBEDSERVE_LOG_LEVEL` / `EMBEDSERVE_LOG_FORMAT`, else the default
    (INFO for `serve`, WARNING otherwise; text). Raises ConfigError naming the accepted values."""
    env = os.environ if env is None else env
    chosen = (level or env.get(LOG_LEVEL_ENV) or ("INFO" if command == "serve" else "WARNING")).upper()
    if chosen not in LEVELS:
        raise ConfigError(f"log level {chosen!r}: use one of {', '.join(LEVELS)} (--log-level or {LOG_LEVEL_ENV})")
    form = (fmt or env.get(LOG_FORMAT_ENV) or "text").lower()
    if form == "text":
        return chosen, "text"
    if form == "json":
        return chosen, "json"
    raise ConfigError(f"log format {form!r}: use text or json (--log-format or {LOG_FORMAT_ENV})")


def quiet_grpc_core(env: MutableMapping[str, str] | None = None) -> None:
    """Default `GRPC_VERBOSITY` to ERROR (an operator's own value wins): otherwise gRPC's C core writes INFO lines
    such as "skipping fork() handlers" to stderr, outside our log format. Call before grpc is first imported."""
    (os.environ if env is None else env).setdefault("GRPC_VERBOSITY", "ERROR")


def setup_logging(level: str, fmt: LogFormat, *, stream: object = None) -> logging.Handler:
    """Configure the root logger and quiet `QUIET_LOGGERS`; returns the handler (it replaces the one an earlier
    call added, and leaves other handlers, such as a test harness's, alone)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    quiet = logging.DEBUG if level == "DEBUG" else logging.WARNING
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    return handler
