"""The gRPC server: `embedserve.v1.EmbedderService`, standard health, reflection (v1 and v1alpha), auth, metrics,
graceful shutdown.

    server, port = await create_server(cfg)      # binds (port 0 picks a free one), opens the index in cfg.data_dir;
    await server.start()                         # the engine is built on start()
    ...
    await server.stop(grace=cfg.server.grace_seconds)

Other services join the same server through `create_server(cfg, extra_servicers=[hook])`: each hook is called as
`hook(grpc_server, embed_server)` before the server starts and registers its servicer; it reaches the vector index
as `embed_server.index`, the metrics as `embed_server.metrics` and the drain accounting as `embed_server.gate`.

`run_server(cfg)` does all of it in the foreground until SIGTERM or SIGINT and returns the exit code.

The servicers are `service.api.embedder` and `service.api.clusterer`, reflection `service.api.reflection`; the
interceptors (request ids, metrics, auth) `service.api.interceptors`; errors become status codes in
`service.api.errors`. The server never touches a tensor.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.api.embedder import SERVICE_NAME, STREAM_WINDOW, EmbedderServicer
from service.api.errors import CallGate
from service.api.interceptors import AdmissionInterceptor, AuthInterceptor, ObserveInterceptor
from service.api.reflection import SERVICE_NAMES as REFLECTION_SERVICES
from service.api.reflection import enable_reflection
from service.config import Config
from service.devices import cuda_device_memory_probe, cuda_memory_probe, nvml_utilization_probe
from service.embedding.batcher import BatchEngine, Batcher
from service.errors import ConfigError, EmbedServeError
from service.index.store import IndexStore
from service.metrics import Metrics, MetricsEndpoint
from service.types import ModelInfo
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

__all__ = [
    "SERVICE_NAME",
    "STREAM_WINDOW",
    "EmbedServer",
    "PortInUseError",
    "ServicerHook",
    "ServingEngine",
    "create_server",
    "run_server",
    "serve",
]

logger = logging.getLogger(__name__)

_KNOWN_SERVICES = frozenset({SERVICE_NAME, health.SERVICE_NAME, *REFLECTION_SERVICES})

EXIT_CANNOT_START = 2
"""`run_server`'s exit code when the server cannot start: a port in use, a data directory in use, a bad setting."""


class PortInUseError(ConfigError):
    """A port the server should listen on is taken; the message names it and the flag that changes it."""

    @classmethod
    def at(cls, address: str, flag: str) -> PortInUseError:
        """The error for `address`, whose port `flag` sets."""
        return cls(f"cannot listen on {address}: the port is in use; choose another with {flag} (0 = any free)")


class ServingEngine(BatchEngine, Protocol):
    """What the server needs of an engine: the batcher's two stages and `info`."""

    @property
    def info(self) -> ModelInfo: ...


# -- the server --------------------------------------------------------------------------------------------------


class EmbedServer:
    """A bound gRPC server with its health, metrics endpoint and (once started) engine and batcher."""

    def __init__(
        self,
        cfg: Config,
        *,
        grpc_server: grpc.aio.Server,
        port: int,
        servicer: EmbedderServicer,
        health_servicer: health.aio.HealthServicer,
        metrics: Metrics,
        engine: ServingEngine | None,
        index: IndexStore,
        owns_index: bool = True,
        service_names: Sequence[str] = (SERVICE_NAME,),
    ) -> None:
        self.cfg = cfg
        self.service_names = ("", *service_names)
        """The names health reports on: the whole server ("") and each of its services."""
        self._serving = False
        self._started = False
        self.grpc_server = grpc_server
        self.port = port
        self.servicer = servicer
        self.health = health_servicer
        self.metrics = metrics
        self.engine = engine
        self._owns_engine = engine is None
        self.index = index
        """The vector index (every collection under `cfg.data_dir`), open from `create_server` to `stop`."""
        self._owns_index = owns_index
        self.gate = servicer.gate
        """Counts the calls in flight on every servicer that shares it; `stop` drains it."""
        self.batcher: Batcher | None = None
        self.metrics_endpoint: MetricsEndpoint | None = None
        self._loading: asyncio.Task[None] | None = None
        self._failed = asyncio.Event()
        self.failure: BaseException | None = None
        """Why the server cannot serve any more (the engine did not build or its batch loop died)."""

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_endpoint.port if self.metrics_endpoint is not None else None

    @property
    def serving(self) -> bool:
        """Health says SERVING: the engine is warm, the server is not draining and nothing has failed."""
        return self._serving

    def _metrics_url(self) -> str:
        port = self.metrics_port
        return "off" if port is None else f"http://{_address(self.cfg.server.metrics_host, port)}/metrics"

    async def start(self) -> None:
        """Start the metrics endpoint (with /healthz and /readyz) and serving (NOT_SERVING until the engine is warm).

        Raises `PortInUseError` when the metrics port is taken (nothing is left running then)."""
        s = self.cfg.server
        if s.metrics_port >= 0:
            try:
                self.metrics_endpoint = self.metrics.serve(
                    s.metrics_host, s.metrics_port, live=lambda: self.failure is None, ready=lambda: self.serving
                )
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                raise PortInUseError.at(_address(s.metrics_host, s.metrics_port), "--metrics-port") from None
        await self.grpc_server.start()
        self._started = True
        model = self.engine.info.backbone if self.engine is not None else self.cfg.backbone.model
        logger.info(
            "listening on %s (metrics %s); loading %s on %s, NOT_SERVING until it is warm",
            _address(s.host, self.port),
            self._metrics_url(),
            model,
            self.cfg.backbone.device,
        )
        if self.engine is not None:
            await self._attach(self.engine)
        else:
            self._loading = asyncio.create_task(self._load_engine(), name="embedserve-load-engine")

    async def _load_engine(self) -> None:
        from service.embedding.engine import Engine

        try:
            engine = await asyncio.to_thread(Engine.from_config, self.cfg)
        except Exception as e:
            logger.error("the engine could not be built", exc_info=e)
            self._fail(e)
            return
        self.engine = engine
        await self._attach(engine)

    async def _attach(self, engine: ServingEngine) -> None:
        batcher = Batcher(
            engine,
            self.cfg.batcher,
            metrics=self.metrics,
            decode_workers=self.cfg.engine.prefetch_batches,
            prefetch_batches=self.cfg.engine.prefetch_batches,
            on_failure=self._fail,
        )
        await batcher.start()
        self.batcher = batcher
        info = engine.info
        self.servicer.attach(batcher, info)
        runtime = str(getattr(info, "runtime", "") or "torch")
        self.metrics.set_build_info(
            version=info.version, model=info.backbone, runtime=runtime, precision=info.precision, device=info.device
        )
        if info.device.startswith("cuda"):
            probe = getattr(engine, "memory_bytes", None) or cuda_memory_probe(info.device)
            self.metrics.track_gpu_memory(probe)
            self.metrics.track_gpu_device_memory(cuda_device_memory_probe(info.device))
            utilization = nvml_utilization_probe(info.device)
            if utilization is not None:
                self.metrics.track_gpu_utilization(utilization)
        if self.failure is not None or self.gate.draining:
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "SERVING on %s (metrics %s): %s, %d-d, %s %s on %s, decode %s",
            _address(self.cfg.server.host, self.port),
            self._metrics_url(),
            info.backbone,
            info.embedding_dim,
            runtime,
            info.precision,
            info.device,
            info.decode_backend,
        )

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        self._serving = status == health_pb2.HealthCheckResponse.SERVING
        self.metrics.serving.set(1 if self._serving else 0)
        for name in self.service_names:
            await self.health.set(name, status)

    def admission_refusal(self) -> str | None:
        """Why a new Embed call is refused before its request is read (the batcher's queue is full), or None."""
        batcher, limit = self.batcher, self.cfg.batcher.max_queue_size
        if batcher is not None and batcher.queued >= limit:
            return f"server busy: {batcher.queued} images queued (limit {limit}); retry with backoff"
        return None

    def _fail(self, error: BaseException) -> None:
        self.failure = error
        self._failed.set()
        asyncio.get_running_loop().create_task(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))

    async def wait_failed(self) -> BaseException:
        """Return once the server can no longer serve, with the reason."""
        await self._failed.wait()
        if self.failure is None:  # the event is only set by _fail
            raise RuntimeError("failure event set without a failure")
        return self.failure

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones finish within `grace` seconds, then release everything."""
        self._serving = False
        self.metrics.serving.set(0)
        await self.health.enter_graceful_shutdown()
        grace = self.cfg.server.grace_seconds if grace is None else grace
        started = time.monotonic()
        if not await self.gate.drain(grace) and self._started:
            logger.warning("grace period of %.0f s over; cancelling the calls still in flight", grace)
        await self.grpc_server.stop(max(0.0, grace - (time.monotonic() - started)))
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        if self.batcher is not None:
            await self.batcher.close()
        if self.metrics_endpoint is not None:
            self.metrics_endpoint.close()
        close = getattr(self.engine, "close", None)
        if self._owns_engine and close is not None:
            await asyncio.to_thread(close)
        self.servicer.close()
        if self._owns_index:
            await asyncio.to_thread(self.index.close)
        if self._started:
            logger.info("embedserve stopped")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


ServicerHook = Callable[[grpc.aio.Server, "EmbedServer"], object]
"""Registers an extra servicer: called as `hook(grpc_server, embed_server)` before the server starts."""


async def create_server(
    cfg: Config,
    engine: ServingEngine | None = None,
    *,
    index: IndexStore | None = None,
    extra_servicers: Sequence[ServicerHook] = (),
    extra_service_names: Sequence[str] = (),
) -> tuple[EmbedServer, int]:
    """Build and bind the server (port 0 picks a free port); returns it, not started, and the bound port.

    With `engine=None` the engine is built from `cfg` on `start()`, off the event loop, while health says
    NOT_SERVING; a given engine is used as is and is not closed by `stop()`. The index is opened here from
    `cfg.data_dir` (snapshot + log replay, off the event loop) unless one is given (then `stop()` leaves it open).
    `extra_servicers` hooks register more services on the same server (see the module docstring); name their full
    service names in `extra_service_names` for reflection, health and per-method metrics.
    """
    s = cfg.server
    address = _address(s.host, s.port)
    _check_port_free(s.host, s.port, address)
    metrics = Metrics()
    known_services = set(_KNOWN_SERVICES) | set(extra_service_names)
    metrics.init_requests(_method_names(known_services))
    interceptors: list[grpc.aio.ServerInterceptor] = [ObserveInterceptor(metrics, known_services)]
    if s.auth_token:
        interceptors.append(AuthInterceptor(s.auth_token))
    elif s.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an auth token: anyone who can reach it can use it", s.host)
    admission = AdmissionInterceptor([f"/{SERVICE_NAME}/Embed"])
    interceptors.append(admission)
    grpc_server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=s.max_concurrent_rpcs or None,
        options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ],
    )
    owns_index = index is None
    if index is None:
        index = await asyncio.to_thread(IndexStore.open, cfg, on_fsync=metrics.observe_fsync)
    metrics.track_index(index.counts)
    metrics.track_wal(index.log_stats)
    servicer = EmbedderServicer(cfg, index, metrics, gate=CallGate())
    pb_grpc.add_EmbedderServiceServicer_to_server(servicer, grpc_server)
    health_servicer = health.aio.HealthServicer()
    service_names = (SERVICE_NAME, *extra_service_names)
    for name in ("", *service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    enable_reflection(known_services, grpc_server)

    try:
        if s.tls_cert:
            key, cert = Path(s.tls_key).read_bytes(), Path(s.tls_cert).read_bytes()
            port = grpc_server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
        else:
            port = grpc_server.add_insecure_port(address)
    except RuntimeError:  # grpc's "Failed to bind": the port was taken between the check and here
        port = 0
    if not port:
        if owns_index:
            await asyncio.to_thread(index.close)
        raise PortInUseError.at(address, "--port")
    server = EmbedServer(
        cfg,
        grpc_server=grpc_server,
        port=int(port),
        servicer=servicer,
        health_servicer=health_servicer,
        metrics=metrics,
        engine=engine,
        index=index,
        owns_index=owns_index,
        service_names=service_names,
    )
    admission.check = server.admission_refusal
    for hook in extra_servicers:
        hook(grpc_server, server)
    return server, int(port)


async def serve(
    cfg: Config, *, extra_servicers: Sequence[ServicerHook] = (), extra_service_names: Sequence[str] = ()
) -> int:
    """Serve until SIGTERM/SIGINT (exit code 0 after a graceful stop) or until the engine fails (1)."""
    server, _ = await create_server(cfg, extra_servicers=extra_servicers, extra_service_names=extra_service_names)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)  # leave nothing running on the loop asyncio.run is about to close
        raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopping = asyncio.create_task(stop.wait())
    failing = asyncio.create_task(server.wait_failed())
    await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
    code = 1 if failing.done() else 0
    if code == 0:
        logger.info("stopping: finishing in-flight calls (grace %.0f s)", cfg.server.grace_seconds)
    for task in (stopping, failing):
        task.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    await server.stop(cfg.server.grace_seconds)
    return code


def run_server(
    cfg: Config, *, extra_servicers: Sequence[ServicerHook] = (), extra_service_names: Sequence[str] = ()
) -> int:
    """Build the engine, serve until SIGTERM or SIGINT, stop gracefully; the process exit code.

    0 after a graceful stop, 1 when the engine could not be built or failed, `EXIT_CANNOT_START` (2) when a port is
    in use, the index could not be opened (e.g. its data directory is in use) or a setting is wrong: one log line
    says which, without a traceback. A second signal during the grace period ends the process at once (the
    handlers are removed on the first). `extra_servicers`: see `create_server`.
    """
    try:
        return asyncio.run(serve(cfg, extra_servicers=extra_servicers, extra_service_names=extra_service_names))
    except (OSError, EmbedServeError) as e:
        logger.error("%s", e)
        return EXIT_CANNOT_START


def _method_names(services: Sequence[str] | set[str]) -> list[str]:
    """The method names of the services found in protobuf's default pool (the metric's `method` label values)."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    names: set[str] = set()
    for service in services:
        try:
            names.update(m.name for m in pool.FindServiceByName(service).methods)
        except KeyError:  # a service registered without a descriptor in the default pool
            continue
    return sorted(names)


def _check_port_free(host: str, port: int, address: str) -> None:
    """Raise `PortInUseError` when `host:port` is taken (grpc would only log a C-level line and fail later)."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError:
        return  # grpc reports an unresolvable host itself
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc does: TIME_WAIT is not "in use"
        try:
            probe.bind(sockaddr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError.at(address, "--port") from None
