"""Channels to an embedserve server: message limits, TLS, bearer-token metadata, and `RemoteError` for failed calls.

Every client of this package opens its channel here and maps a failed call (`grpc.RpcError`) to `RemoteError`
here, so the sync, async and cluster clients cannot disagree about either.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.errors import EmbedServeError

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
"""Largest message sent or received (a batch of images, a page of vectors)."""

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


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """gRPC channel options that allow messages up to `max_message_bytes` both ways."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
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
) -> grpc.Channel:
    """A blocking channel to `target`: TLS when asked (or given a root certificate), large messages allowed."""
    options = channel_options(max_message_bytes)
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
) -> grpc.aio.Channel:
    """The asyncio twin of `open_channel`."""
    options = channel_options(max_message_bytes)
    creds = credentials(tls, root_certificates)
    if creds is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, creds, options=options)


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
