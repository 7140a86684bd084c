"""Channels to an embedserve server: message limits, TLS, bearer-token metadata, and `RemoteError` for failed calls.

Every client of this package opens its channel here and maps a failed call (`grpc.RpcError`) to `RemoteError`
here, so the sync, async and cluster clients cannot disagree about either.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypedDict, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.errors import EmbedServeError
from service.wire._proto.embedserve.v1 import cluster_pb2, embedder_pb2

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message sent or received (a batch of images, a page of vectors)."""

RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["RESOURCE_EXHAUSTED", "UNAVAILABLE"],
}
"""The published retry policy (gRPC service config, gRFC A6): a busy (RESOURCE_EXHAUSTED) or draining / restarting
(UNAVAILABLE) server is retried up to 4 more times, after a random delay in [0, b) with b = 0.1 s, 0.2 s, 0.4 s, ...
capped at 2 s. gRPC draws the delay uniformly, which is the jitter that keeps refused clients from coming back in
step. Every embedserve write is idempotent by key, so a retried store stores once."""


def service_config() -> dict[str, Any]:
    """The gRPC service config every channel of this package uses: `RETRY_POLICY` on every embedserve method."""
    services = [
        service.full_name
        for module in (embedder_pb2, cluster_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
    ]
    return {"methodConfig": [{"name": [{"service": name} for name in services], "retryPolicy": RETRY_POLICY}]}


Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")


class RemoteError(EmbedServeError):
    """A call to the server failed as a whole; `code` is its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


def remote_error(e: grpc.RpcError) -> RemoteError:
    """The `RemoteError` of a failed call (UNKNOWN when the error carries no status)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return RemoteError(code, details or "")


def auth_metadata(token: str | None) -> Metadata:
    """The `authorization: Bearer` metadata for `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel_options(max_message_bytes: int, *, retries: bool = True) -> list[tuple[str, Any]]:
    """gRPC channel options: messages up to `max_message_bytes` both ways, `RETRY_POLICY` (unless `retries=False`),
    and a reconnect backoff short enough to find a restarted server within seconds."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # gRPC's default reconnect backoff grows to 120 s.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 5000),
    ]
    if not retries:
        return [*options, ("grpc.enable_retries", 0)]
    return [
        *options,
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(service_config())),
        # gRPC retries only what it still holds: let it hold a whole request (the default is 256 KiB).
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.retry_buffer_size", max_message_bytes),
    ]


def credentials(tls: bool, root_certificates: bytes | None) -> grpc.ChannelCredentials | None:
    """TLS credentials when asked for (or given a root certificate PEM); None for a plaintext channel."""
    if tls or root_certificates is not None:
        return grpc.ssl_channel_credentials(root_certificates=root_certificates)
    return None


def open_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retries: bool = True,
) -> grpc.Channel:
    """A blocking channel to `target`: TLS when asked (or given a root certificate), large messages allowed, and
    busy or restarting servers retried per `RETRY_POLICY` (`retries=False`: every refusal reaches the caller)."""
    options = channel_options(max_message_bytes, retries=retries)
    creds = credentials(tls, root_certificates)
    if creds is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, creds, options=options)


def open_aio_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    retries: bool = True,
) -> grpc.aio.Channel:
    """The asyncio twin of `open_channel`."""
    options = channel_options(max_message_bytes, retries=retries)
    creds = credentials(tls, root_certificates)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


class ChannelArgs(TypedDict, total=False):
    """The keyword arguments every client of this package takes (`EmbedClient(target, **ChannelArgs)`)."""

    token: str | None
    """Bearer token sent as `authorization` metadata (None: no auth)."""
    tls: bool
    """Connect with TLS (implied by `root_certificates`)."""
    root_certificates: bytes | None
    """PEM roots to trust instead of the system's."""
    timeout: float | None
    """Default deadline of each call, in seconds (None: no deadline)."""
    max_message_bytes: int
    """Largest message sent or received."""
    retries: bool
    """Retry busy / unavailable refusals per `RETRY_POLICY` (False: every refusal reaches the caller)."""


class Connection(NamedTuple):
    """What a client holds: its channel, the auth metadata of every call, and the default deadline."""

    channel: Any
    metadata: Metadata
    timeout: float | None


def connect(
    target: str, args: ChannelArgs, *, timeout: float | None, max_message_bytes: int, aio: bool = False
) -> Connection:
    """Open a blocking (or, with `aio=True`, an asyncio) channel to `target` from a client's keyword arguments;
    `timeout` and `max_message_bytes` are that client's defaults."""
    open_ = open_aio_channel if aio else open_channel
    channel = open_(
        target,
        tls=args.get("tls", False),
        root_certificates=args.get("root_certificates"),
        max_message_bytes=args.get("max_message_bytes", max_message_bytes),
        retries=args.get("retries", True),
    )
    return Connection(channel, auth_metadata(args.get("token")), args.get("timeout", timeout))


WaitNotice = Callable[[str], None]
"""Called once when a wait for SERVING begins, with why it waits (e.g. "connection refused", "NOT_SERVING")."""


def backoff_delays(initial: float = 0.2, maximum: float = 5.0, multiplier: float = 2.0) -> Any:
    """Endless exponential backoff with jitter: each delay is drawn from [b/2, b), b doubling up to `maximum`."""
    bound = initial
    while True:
        yield random.uniform(bound / 2, bound)
        bound = min(maximum, bound * multiplier)


def wait_for_serving(
    channel: grpc.Channel,
    *,
    timeout: float,
    service: str = "",
    metadata: Metadata = (),
    on_wait: WaitNotice | None = None,
) -> None:
    """Block until the server's health says SERVING for `service`, for at most `timeout` seconds.

    A server that is not up yet, still loading its model, or restarting is polled with backoff and jitter;
    `on_wait(reason)` is called once, when the first poll does not find it SERVING. Raises `RemoteError`
    (UNAVAILABLE) when the time is up, or at once for an answer that waiting cannot change (e.g. UNIMPLEMENTED:
    not an embedserve server).
    """
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    delays = backoff_delays()
    announced = False
    while True:
        remaining = deadline - time.monotonic()
        try:
            response = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=max(0.05, min(remaining, 5.0 if announced else 1.0)),
                metadata=metadata,
                wait_for_ready=True,
            )
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
            reason = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        except grpc.RpcError as e:
            error = remote_error(e)
            if error.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise error from e
            no_answer = error.code == grpc.StatusCode.DEADLINE_EXCEEDED
            reason = "no answer: not started yet, or the address is wrong" if no_answer else error.details
        if not announced and on_wait is not None:
            on_wait(reason)
        announced = True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RemoteError(
                grpc.StatusCode.UNAVAILABLE, f"the server was not SERVING within {timeout:g} s ({reason})"
            )
        time.sleep(min(remaining, next(delays)))


def call_unary(method: Callable[..., T], request: Any, *, timeout: float | None, metadata: Metadata) -> T:
    """`method(request)` on a blocking stub; a failed call raises `RemoteError`."""
    try:
        return method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise remote_error(e) from e


async def call_unary_async(
    method: Callable[..., Awaitable[T]], request: Any, *, timeout: float | None, metadata: Metadata
) -> T:
    """`await method(request)` on an asyncio stub; a failed call raises `RemoteError`."""
    try:
        return await method(request, timeout=timeout, metadata=metadata)
    except grpc.RpcError as e:
        raise remote_error(e) from e
