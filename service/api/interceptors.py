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
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from service.api.errors import request_id
from service.metrics import Metrics

logger = logging.getLogger(__name__)

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


def _final_code(error: BaseException | None, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
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

        if handler.response_streaming and inspect.isasyncgenfunction(behavior):

            async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await observer.begin(context)
                error: BaseException | None = None
                try:
                    async for response in behavior(request, context):
                        yield response
                except BaseException as e:
                    error = e
                    raise
                finally:
                    observer.end(context, error)

            return _rebuild(handler, streaming)

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await observer.begin(context)
            error: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as e:
                error = e
                raise
            finally:
                observer.end(context, error)

        return _rebuild(handler, unary)


class _CallObserver:
    """The bookkeeping of one call for `ObserveInterceptor`."""

    __slots__ = ("incoming", "method", "metrics", "rid", "start", "token")

    def __init__(self, metrics: Metrics, method: str, incoming: str) -> None:
        self.metrics = metrics
        self.method = method
        self.incoming = incoming
        self.rid = ""
        self.start = 0.0
        self.token: contextvars.Token[str] | None = None

    async def begin(self, context: grpc.aio.ServicerContext) -> None:
        self.start = time.monotonic()
        # A caller's id is kept only when it is short and printable; it goes into logs, never into labels.
        ok = 0 < len(self.incoming) <= 64 and self.incoming.isprintable()
        self.rid = self.incoming if ok else uuid.uuid4().hex[:16]
        self.token = request_id.set(self.rid)
        await context.send_initial_metadata((("x-request-id", self.rid),))

    def end(self, context: grpc.aio.ServicerContext, error: BaseException | None) -> None:
        elapsed = time.monotonic() - self.start
        code = _final_code(error, context)
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
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in OPEN_METHODS:
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if isinstance(sent, str) and hmac.compare_digest(sent.encode(), self._expected):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "this server needs `authorization: Bearer <token>` metadata"
            )

        return _rebuild(handler, deny)
