"""Every Prometheus metric of embedserve, declared once, and the HTTP `/metrics` endpoint.

Each server owns a `Metrics` with its own `CollectorRegistry`, so several servers (or tests) in one process
never collide on registration. Label values come from fixed sets only: method names of the known services,
status code names, image outcome tags and stage names; never a key, a path or free text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, WSGIRequestHandler
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

IMAGE_OUTCOMES = frozenset(
    {
        "ok",
        "invalid_image",
        "unsupported_image",
        "image_too_large",
        "unreadable",
        "image_error",
        "cancelled",
        "deadline_exceeded",
        "rejected",
        "failed",
    }
)
"""Values of `embedserve_images_total{outcome}`: success, the `ImageError.reason` tags, and why an image was dropped."""

STAGES = ("decode", "infer", "index")
"""Values of `embedserve_stage_duration_seconds{stage}`; `decode` covers decoding and preprocessing together."""

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


REQUEST_CODES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "UNAUTHENTICATED",
    "INTERNAL",
    "UNAVAILABLE",
)
"""Status codes the server answers with; `embedserve_requests_total{method,code}` starts at 0 for each of them and
every known method, so that `rate()` and `increase()` see the first error of a kind."""

Probe = Callable[[], bool]


def image_outcome(reason: str) -> str:
    """The outcome label for an `ImageError.reason` (unknown tags collapse to `image_error`)."""
    return reason if reason in IMAGE_OUTCOMES else "image_error"


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """A running `/metrics` HTTP server."""

    host: str
    port: int
    _httpd: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class Metrics:
    """The metrics of one server, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter(
            "embedserve_requests", "RPCs handled, by method and status code.", ["method", "code"], registry=r
        )
        self.request_duration = Histogram(
            "embedserve_request_duration_seconds",
            "Time from receiving an RPC to its status, by method.",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter(
            "embedserve_images",
            "Images by outcome (ok, an image error tag, or why it was dropped).",
            ["outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "embedserve_batch_size",
            "Images per forward pass of the dynamic batcher.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "embedserve_queue_depth", "Images admitted to the batcher and not yet in a forward pass.", registry=r
        )
        self.queue_wait = Histogram(
            "embedserve_queue_wait_seconds",
            "Time from an image's arrival in the batcher to the start of its forward pass.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_duration = Histogram(
            "embedserve_stage_duration_seconds",
            "Time per batch in each pipeline stage (decode includes preprocessing).",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.gpu_memory = Gauge(
            "embedserve_gpu_memory_bytes",
            "GPU memory held by the model's device (allocated by tensors, reserved by the caching allocator).",
            ["kind"],
            registry=r,
        )
        self.index_search_duration = Histogram(
            "embedserve_index_search_duration_seconds",
            "Time of one index search call (a batch of queries), excluding embedding image queries.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.wal_fsync_duration = Histogram(
            "embedserve_wal_fsync_duration_seconds",
            "Time of one fsync of a collection's write-ahead log.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.wal_records_per_fsync = Histogram(
            "embedserve_wal_records_per_fsync",
            "Log records (one per store request) made durable by one fsync: above 1 when group commit coalesces.",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.cluster_duration = Histogram(
            "embedserve_cluster_duration_seconds",
            "Time of one clustering run, by algorithm and backend.",
            ["algorithm", "backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.build_info = Gauge(
            "embedserve_build_info",
            "Always 1; the labels say what this server runs (set once the engine is built).",
            ["version", "model", "runtime", "precision", "device"],
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "embedserve_requests_in_flight", "RPCs being handled right now (streams count until they end).", registry=r
        )
        self.serving = Gauge(
            "embedserve_serving",
            "1 while the server answers SERVING to health checks, 0 while starting, draining or failed.",
            registry=r,
        )
        self.gpu_utilization: Gauge | None = None
        """`embedserve_gpu_utilization_ratio`, registered by `track_gpu_utilization` (absent without NVML)."""
        self._index_tracked = False
        self._wal_tracked = False
        for outcome in IMAGE_OUTCOMES:
            self.images.labels(outcome=outcome)
        for stage in STAGES:
            self.stage_duration.labels(stage=stage)

    def init_requests(self, methods: Iterable[str], codes: Iterable[str] = REQUEST_CODES) -> None:
        """Create `embedserve_requests_total{method,code}` at 0 for every method x code (and `other`)."""
        codes = tuple(codes)
        for method in (*methods, "other"):
            self.request_duration.labels(method=method)
            for code in codes:
                self.requests.labels(method=method, code=code)

    def set_build_info(self, *, version: str, model: str, runtime: str, precision: str, device: str) -> None:
        """Set `embedserve_build_info` (one series: a server runs one model)."""
        self.build_info.clear()
        self.build_info.labels(version=version, model=model, runtime=runtime, precision=precision, device=device).set(1)

    def track_gpu_utilization(self, probe: Callable[[], float]) -> None:
        """Report `probe()` (0..1) as `embedserve_gpu_utilization_ratio` at every scrape. Call once."""
        if self.gpu_utilization is None:
            self.gpu_utilization = Gauge(
                "embedserve_gpu_utilization_ratio",
                "Fraction of the last NVML sample period in which the model's GPU was busy.",
                registry=self.registry,
            )
        self.gpu_utilization.set_function(probe)

    def track_wal(self, stats: Callable[[], Mapping[str, tuple[int, float | None]]]) -> None:
        """Report `embedserve_wal_bytes{collection}` and `embedserve_snapshot_age_seconds{collection}` from
        `stats() -> {collection: (log bytes since the last snapshot, snapshot time.time() or None)}`. Call once."""
        if not self._wal_tracked:
            self.registry.register(_Durability(stats))
            self._wal_tracked = True

    def track_gpu_memory(self, probe: Callable[[], tuple[int, int]]) -> None:
        """Report `probe() -> (allocated, reserved)` bytes at every scrape (call only when the model is on a GPU)."""
        self.gpu_memory.labels(kind="allocated").set_function(lambda: float(probe()[0]))
        self.gpu_memory.labels(kind="reserved").set_function(lambda: float(probe()[1]))

    def track_gpu_device_memory(self, probe: Callable[[], tuple[int, int]]) -> None:
        """Report `probe() -> (free, total)` bytes of the whole device (every process, as the driver sees it) as
        `kind="device_free"` / `kind="device_total"`: torch's allocator alone cannot show what others hold."""
        self.gpu_memory.labels(kind="device_free").set_function(lambda: float(probe()[0]))
        self.gpu_memory.labels(kind="device_total").set_function(lambda: float(probe()[1]))

    def track_index(self, counts: Callable[[], Mapping[str, int]]) -> None:
        """Report `embedserve_index_vectors{collection}` from `counts()` at every scrape (collection names are
        validated to [A-Za-z0-9_-]{1,64}, a bounded set chosen by the operator). Call once."""
        if not self._index_tracked:
            self.registry.register(_IndexVectors(counts))
            self._index_tracked = True

    def observe_fsync(self, seconds: float, records: int) -> None:
        """One write-ahead-log fsync that made `records` records durable (called from index threads)."""
        self.wal_fsync_duration.observe(seconds)
        self.wal_records_per_fsync.observe(records)

    def observe_cluster(self, algorithm: str, backend: str, seconds: float) -> None:
        """One clustering run (algorithm and backend names come from fixed registries)."""
        self.cluster_duration.labels(algorithm=algorithm, backend=backend).observe(seconds)

    def count_images(self, outcome: str, n: int = 1) -> None:
        if n:
            self.images.labels(outcome=outcome).inc(n)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def serve(self, host: str, port: int, *, live: Probe | None = None, ready: Probe | None = None) -> MetricsEndpoint:
        """Start `/metrics`, `/healthz` (200 while `live()`) and `/readyz` (200 while `ready()`, else 503) on
        host:port (0 picks a free port) in a daemon thread. Raises OSError when the port cannot be bound."""
        app = _http_app(make_wsgi_app(self.registry), live or (lambda: True), ready or (lambda: True))
        httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
        thread = threading.Thread(target=httpd.serve_forever, name="embedserve-metrics", daemon=True)
        thread.start()
        bound = int(httpd.server_address[1])
        return MetricsEndpoint(host=host, port=bound, _httpd=httpd, _thread=thread)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr for every scrape and probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _http_app(metrics_app: Callable[..., Any], live: Probe, ready: Probe) -> Callable[..., Any]:
    """The WSGI app of the metrics port: the probes at their paths, the Prometheus exposition everywhere else."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = (live if path == "/healthz" else ready)()
            body = b"ok\n" if ok else b"not ready\n" if path == "/readyz" else b"not live\n"
            status = "200 OK" if ok else "503 Service Unavailable"
            start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
            return [body]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    return app


class _Durability(Collector):
    """`embedserve_wal_bytes{collection}` and `embedserve_snapshot_age_seconds{collection}`, read at scrape time."""

    def __init__(self, stats: Callable[[], Mapping[str, tuple[int, float | None]]]) -> None:
        self.stats = stats

    def describe(self) -> list[GaugeMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[GaugeMetricFamily]:
        wal, age = self._families()
        now = time.time()
        for name, (log_bytes, snapshot_at) in sorted(self.stats().items()):
            wal.add_metric([name], float(log_bytes))
            if snapshot_at is not None:
                age.add_metric([name], max(0.0, now - snapshot_at))
        yield wal
        yield age

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (
            GaugeMetricFamily(
                "embedserve_wal_bytes", "Write-ahead log bytes not yet covered by a snapshot.", labels=["collection"]
            ),
            GaugeMetricFamily(
                "embedserve_snapshot_age_seconds",
                "Seconds since the collection's last snapshot (absent before its first).",
                labels=["collection"],
            ),
        )


class _IndexVectors(Collector):
    """`embedserve_index_vectors{collection}`, read from the index at scrape time (dropped collections vanish)."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        self.counts = counts

    def describe(self) -> list[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        for name, count in sorted(self.counts().items()):
            family.add_metric([name], float(count))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("embedserve_index_vectors", "Items stored per collection.", labels=["collection"])
