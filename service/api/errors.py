"""The one error edge of the gRPC API: the code table, `abort`, request ids, and the RPC decorators.

Only our own errors, whose messages are written for the caller, reach a client as text. Anything else is an
internal error: the client gets INTERNAL with the request id, the log gets the traceback under the same id.

Servicer methods are wrapped, never written with a try block of their own:

    class MyServicer(pb_grpc.MyServicer):
        def __init__(self, gate: CallGate) -> None:
            self.gate = gate                      # counts calls in flight; refuses new ones during a drain

        @unary_rpc
        async def Get(self, request, context): ...

        @stream_rpc
        async def List(self, request, context):
            yield ...
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from service.analysis.cluster import BackendUnavailableError, ClusterInterruptedError
from service.errors import (
    BatchFailedError,
    CollectionExistsError,
    CollectionNotFoundError,
    ConfigError,
    DataDirLockedError,
    DeadlineExpiredError,
    DurabilityError,
    EmbedServeError,
    EngineUnavailableError,
    ImageError,
    InvalidIndexRequestError,
    InvalidRequestError,
    KeyNotFoundError,
    NoIndexError,
    NotAvailableYetError,
    OverloadedError,
)
from service.wire.convert import image_error_from_status, image_status  # re-exported; they live in wire

__all__ = [
    "CODES",
    "AuthenticationError",
    "CallGate",
    "InvalidRequestError",
    "NotAvailableYetError",
    "abort",
    "image_error_from_status",
    "image_status",
    "request_id",
    "rpc_status",
    "stream_rpc",
    "unary_rpc",
]

logger = logging.getLogger(__name__)

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("embedserve_request_id", default="")
"""The id of the call being handled (from `x-request-id` metadata, else generated); set by `ObserveInterceptor`."""


class RequestIdFilter(logging.Filter):
    """Gives every log record a `request_id` attribute: the id of the call it was logged under ("" outside one).

    Installed on the server's log handler, so that `--log-format json` names the request of each line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


class AuthenticationError(EmbedServeError):
    """The call lacks the bearer token the server wants (UNAUTHENTICATED)."""


CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ClusterInterruptedError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (EngineUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (NoIndexError, grpc.StatusCode.UNAVAILABLE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotAvailableYetError, grpc.StatusCode.FAILED_PRECONDITION),
    (BackendUnavailableError, grpc.StatusCode.FAILED_PRECONDITION),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (ImageError, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (CollectionNotFoundError, grpc.StatusCode.NOT_FOUND),
    (KeyNotFoundError, grpc.StatusCode.NOT_FOUND),
    (CollectionExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidIndexRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (DurabilityError, grpc.StatusCode.UNAVAILABLE),
    (DataDirLockedError, grpc.StatusCode.UNAVAILABLE),
    (LookupError, grpc.StatusCode.NOT_FOUND),
)
"""Status code of each of our errors, first match wins. Only `EmbedServeError`s are looked up (so the last row
means: one of our errors that is also a failed lookup, e.g. a vector store's unknown collection); any other
exception, and `BatchFailedError`, is INTERNAL."""


def rpc_status(error: BaseException, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for an error raised while handling a call."""
    if isinstance(error, EmbedServeError) and not isinstance(error, BatchFailedError):
        for cls, code in CODES:
            if isinstance(error, cls):
                return code, str(error)
    suffix = f" (request id {request_id})" if request_id else ""
    return grpc.StatusCode.INTERNAL, f"internal server error; the server log has the details{suffix}"


async def abort(context: grpc.aio.ServicerContext, error: BaseException) -> NoReturn:
    """End the call with the status for `error`; every INTERNAL is logged, with its traceback and request id.

    A cancellation, or an abort already under way, passes through unchanged.
    """
    if isinstance(error, asyncio.CancelledError | grpc.aio.AbortError):
        raise error
    # Every INTERNAL names a request id, in the reply and in the log, even on a server without ObserveInterceptor.
    rid = request_id.get() or uuid.uuid4().hex[:16]
    code, message = rpc_status(error, rid)
    if code == grpc.StatusCode.INTERNAL:
        logger.error("request %s failed with an internal error", rid, exc_info=error)
    await context.abort(code, message)
    raise AssertionError("context.abort returned")  # unreachable: abort raises


# -- drain accounting and the RPC decorators -----------------------------------------------------------------------


class CallGate:
    """Counts the calls in flight; once `drain` began, refuses new ones with UNAVAILABLE (not a transport CANCELLED)."""

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._drain_started = asyncio.Event()

    async def wait_draining(self) -> None:
        """Return once `drain` has begun (open streams stop reading new requests then)."""
        await self._drain_started.wait()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Count one call for the duration of the block (EngineUnavailableError once draining)."""
        if self.draining:
            raise EngineUnavailableError("the server is shutting down; retry on another replica")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def drain(self, grace: float) -> bool:
        """Refuse new calls and wait up to `grace` seconds for the in-flight ones; True when all finished."""
        self.draining = True
        self._drain_started.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
        except TimeoutError:
            return False
        return True


class GatedServicer(Protocol):
    """A servicer whose RPC methods `unary_rpc` / `stream_rpc` wrap: it has the gate they count calls on."""

    gate: CallGate


S = TypeVar("S", bound=GatedServicer)
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def unary_rpc(
    method: Callable[[S, Req, grpc.aio.ServicerContext], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext], Coroutine[Any, Any, Resp]]:
    """Wrap a unary-response RPC method: count it on `self.gate`, and turn any error into a status via `abort`."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext) -> Resp:
        try:
            with self.gate.call():
                return await method(self, request, context)
        except Exception as e:
            await abort(context, e)

    return wrapper


def stream_rpc(
    method: Callable[[S, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext], AsyncIterator[Resp]]:
    """Wrap a streaming-response RPC method (an async generator) the way `unary_rpc` wraps a unary one.

    The call counts as in flight until its last response is sent; an error after some responses ends the stream
    with the error's status.
    """

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext) -> AsyncIterator[Resp]:
        try:
            with self.gate.call():
                async for response in method(self, request, context):
                    yield response
        except Exception as e:
            await abort(context, e)

    return wrapper
