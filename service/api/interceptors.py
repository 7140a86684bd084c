"""Server interceptors: request ids, per-call metrics and logs (`ObserveInterceptor`), bearer-token auth.

The request id of a call is kept in `service.api.errors.request_id` for the error edge to log and report.
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import inspect
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from service.api.errors import request_id
from service.metrics import Metrics

logger = logging.getLogger(__name__)

MISSING_TOKEN = "no token: this server needs `authorization: Bearer <token>` metadata (embedserve: --token)"
"""UNAUTHENTICATED detail of a call that sent no `authorization` metadata."""
WRONG_TOKEN = "wrong token: the `authorization` metadata does not carry this server's token"
"""UNAUTHENTICATED detail of a call whose token (or scheme) is not the server's; the token is never echoed."""

OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
"""Callable without the token, so that load balancers and orchestrators can probe health."""


def method_label(full_method: str, known_services: Collection[str]) -> str:
    """The `method` label of a call: the short name for our services, `other` for anything else."""
    service, _, method = full_method.lstrip("/").partition("/")
    return method if service in known_services and method.isidentifier() else "other"


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> grpc.RpcMethodHandler:
    """A handler like `handler` (same streaming kind and codecs) that runs `behavior`."""
    kind = (handler.request_streaming, handler.response_streaming)
    factory = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return factory(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _behavior(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


def _final_code(
    error: BaseException | None, context: grpc.aio.ServicerContext, deadline: float | None = None
) -> grpc.StatusCode:
    """The status a call ended with. A call that ends CANCELLED or UNKNOWN after its deadline (`time.monotonic()`)
    passed was ended by the deadline, whichever of gRPC's timer and our own check noticed first."""
    code = _raw_code(error, context)
    expired = deadline is not None and time.monotonic() >= deadline
    if expired and code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return code


def _raw_code(error: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if error is None:
        return context.code() or grpc.StatusCode.OK
    if isinstance(error, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(error, asyncio.CancelledError):
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class ObserveInterceptor(grpc.aio.ServerInterceptor):
    """Request id, one debug log line per call (warning for server-side failures), request metrics."""

    def __init__(self, metrics: Metrics, known_services: Collection[str]) -> None:
        self.metrics = metrics
        self.known_services = known_services
        """Services whose method names are metric labels (others count as `other`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        method = method_label(details.method, self.known_services)
        incoming = dict(details.invocation_metadata or ()).get("x-request-id", "")
        behavior = _behavior(handler)
        observer = _CallObserver(self.metrics, method, incoming)
        # gRPC drops a unary-request call whose deadline passed (or that was cancelled) before its request arrived
        # without ever calling the handler; count it when the handler is released unused.
        weakref.finalize(observer, _count_unstarted, self.metrics, method, observer.begun)

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                observer.begin(context)
                error: BaseException | None = None
                try:
                    first = True
                    async for response in behavior(request, context):
                        if first:
                            await observer.send_request_id(context)
                            first = False
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    observer.end(context, error)

            return _rebuild(handler, streaming)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            observer.begin(context)
            error: BaseException | None = None
            try:
                response = await behavior(request, context)
                await observer.send_request_id(context)
                return response
            except BaseException as e:
                error = e
                raise
            finally:
                observer.end(context, error)

        return _rebuild(handler, unary)


def _count_unstarted(metrics: Metrics, method: str, begun: list[bool]) -> None:
    if not begun[0]:
        metrics.requests.labels(method=method, code=grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
        logger.debug("rpc %s ended before its handler started (deadline passed or cancelled)", method)


class _CallObserver:
    """The bookkeeping of one call for `ObserveInterceptor`."""

    __slots__ = ("__weakref__", "begun", "deadline", "incoming", "method", "metrics", "rid", "start", "token")

    def __init__(self, metrics: Metrics, method: str, incoming: str) -> None:
        self.metrics = metrics
        self.method = method
        self.incoming = incoming
        self.begun = [False]
        """Set once the handler runs (a list, so that the finalizer that counts unstarted calls can read it)."""
        self.rid = ""
        self.start = 0.0
        self.deadline: float | None = None
        self.token: contextvars.Token[str] | None = None

    def begin(self, context: grpc.aio.ServicerContext) -> None:
        self.begun[0] = True
        self.start = time.monotonic()
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.start + remaining
        # A caller's id is kept only when it is short and printable; it goes into logs, never into labels.
        ok = 0 < len(self.incoming) <= 64 and self.incoming.isprintable()
        self.rid = self.incoming if ok else uuid.uuid4().hex[:16]
        self.token = request_id.set(self.rid)
        context.set_trailing_metadata((("x-request-id", self.rid),))
        self.metrics.requests_in_flight.inc()

    async def send_request_id(self, context: grpc.aio.ServicerContext) -> None:
        """Send the request id as initial metadata, just before the first response.

        Not earlier: a call refused before any response (busy, draining) must end trailers-only, which is what lets
        a client's gRPC retry policy retry it; headers already sent commit the call. Every call also carries the id
        in its trailing metadata (`begin`)."""
        await context.send_initial_metadata((("x-request-id", self.rid),))

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        self.metrics.requests_in_flight.dec()
        elapsed = time.monotonic() - self.start
        code = _final_code(error, context, self.deadline)
        self.metrics.requests.labels(method=self.method, code=code.name).inc()
        self.metrics.request_duration.labels(method=self.method).observe(elapsed)
        server_side = code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE)
        level = logging.WARNING if server_side else logging.DEBUG
        logger.log(level, "rpc %s %s %.1f ms request_id=%s", self.method, code.name, elapsed * 1000, self.rid)
        if self.token is not None:
            request_id.reset(self.token)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` with UNAUTHENTICATED (health checks stay open)."""

    def __init__(self, token: str) -> None:
        self._expected = token.encode()

    def accepts(self, authorization: object) -> bool:
        """Whether an `authorization` value carries the token; the scheme is case-insensitive (RFC 6750, 7235)."""
        if not isinstance(authorization, str):
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), self._expected)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if self.accepts(sent):
            return handler
        message = MISSING_TOKEN if not sent else WRONG_TOKEN

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _rebuild(handler, deny)


AdmissionCheck = Callable[[], str | None]
"""Returns why a new call must be refused now (e.g. "server busy: ..."), or None to admit it."""


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to `methods` with RESOURCE_EXHAUSTED while `check()` says so, without reading their requests.

    A refused unary call is answered by a handler that takes its request as a stream and never reads it, so the
    request is neither copied into Python nor parsed: under a flood of large Embed requests a refusal costs a few
    microseconds, not the parse of each 800 KB body. `check` is set once the server knows its batcher (until then
    everything is admitted and the servicer answers UNAVAILABLE while the model loads).
    """

    def __init__(self, methods: Collection[str], check: AdmissionCheck | None = None) -> None:
        self.methods = frozenset(methods)
        """Full method names (`/embedserve.v1.EmbedderService/Embed`) that are checked."""
        self.check = check

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self.check is None or details.method not in self.methods:
            return handler
        reason = self.check()
        if reason is None:
            return handler

        async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)

        factory = (
            grpc.stream_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            refuse, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
