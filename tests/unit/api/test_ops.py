"""What ops watch: health per service, /healthz and /readyz, the metrics (pre-created series, build info, in-flight,
serving, WAL and snapshot age), deadline accounting, drain consistency, port-in-use and auth messages.

A fake engine (a fixed vector per image, an adjustable delay) stands in for the model so that these run in seconds.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
from service.api.clusterer import add_clusterer
from service.api.interceptors import MISSING_TOKEN, WRONG_TOKEN
from service.api.server import SERVICE_NAME, EmbedServer, PortInUseError, create_server
from service.client import EmbedClient, RemoteError
from service.config import Config, load_config
from service.embedding.engine import PreparedBatch
from service.errors import ImageError
from service.metrics import REQUEST_CODES
from service.types import EmbedOutcome, ModelInfo

T = TypeVar("T")

INFO = ModelInfo(
    backbone="fake",
    embedding_dim=4,
    input_size=8,
    precision="float32",
    device="cpu",
    decode_backend="none",
    resize="squash",
    pad="zero",
    version="9.9.9",
)


class FakeEngine:
    """Every image embeds to e0 after `delay` seconds per forward pass; counts the images it ran."""

    info = INFO

    def __init__(self) -> None:
        self.delay = 0.0
        self.ran = 0
        self.running = threading.Event()
        """Set once a forward pass has started: a test that needs the model busy waits for it, not for a sleep."""

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        return PreparedBatch(size=len(datas), batch=None, ok_positions=list(range(len(datas))), errors={})

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        self.running.set()
        time.sleep(self.delay)
        self.ran += prepared.size
        return [EmbedOutcome(vector=np.array([1, 0, 0, 0], np.float32)) for _ in range(prepared.size)]


def make_cfg(data_dir: Path, **overrides: Any) -> Config:
    merged: dict[str, Any] = {
        "server.port": 0,
        "server.metrics_port": 0,
        "server.grace_seconds": 5.0,
        "batcher.max_queue_delay_ms": 1.0,
        "data_dir": str(data_dir),
    }
    merged.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=merged)


class Served:
    """A started server (with the Clusterer) on its own event-loop thread."""

    def __init__(self, cfg: Config, engine: FakeEngine) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: EmbedServer
        self.server, self.port = self.call(
            create_server(cfg, engine=engine, extra_servicers=[add_clusterer], extra_service_names=[CLUSTER_SERVICE])
        )
        self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.server.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def families(self) -> dict[str, Any]:
        return {f.name: f for f in text_string_to_metric_families(self.http("/metrics")[1])}

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        return self.server.metrics.registry.get_sample_value(name, labels or {})

    def close(self) -> None:
        try:
            self.call(self.server.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(engine: FakeEngine | None = None, **overrides: Any) -> Served:
        s = Served(make_cfg(tmp_path / f"data{len(started)}", **overrides), engine or FakeEngine())
        started.append(s)
        return s

    yield start
    for s in reversed(started):
        s.close()


def health(target: str, service: str) -> str:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
        return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_health_per_service_and_http_probes(serve) -> None:
    s = serve()
    for service in ("", SERVICE_NAME, CLUSTER_SERVICE):
        assert health(s.target, service) == "SERVING", service
    assert s.http("/healthz") == (200, "ok\n")
    assert s.http("/readyz") == (200, "ok\n")
    assert s.sample("embedserve_serving") == 1.0
    # A server that is draining is still live but no longer ready, on HTTP and in gRPC health alike.
    s.server.gate.draining = True
    s.call(s.server._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
    assert s.http("/readyz")[0] == 503 and s.http("/healthz")[0] == 200
    assert health(s.target, CLUSTER_SERVICE) == "NOT_SERVING"
    assert s.sample("embedserve_serving") == 0.0
    s.server.gate.draining = False


def test_metrics_series_exist_from_the_start(serve) -> None:
    s = serve()
    families = s.families()
    codes = {(x.labels["method"], x.labels["code"]) for x in families["embedserve_requests"].samples}
    for method in ("Embed", "EmbedStream", "Neighbors", "GetModelInfo", "Cluster", "Check", "other"):
        for code in REQUEST_CODES:
            assert (method, code) in codes, (method, code)
    assert all(x.value == 0 for x in families["embedserve_requests"].samples if x.name.endswith("_total"))
    outcomes = {x.labels["outcome"] for x in families["embedserve_images"].samples}
    assert {"ok", "cancelled", "deadline_exceeded", "rejected", "invalid_image"} <= outcomes
    (build,) = families["embedserve_build_info"].samples
    assert build.value == 1 and build.labels == {
        "version": "9.9.9",
        "model": "fake",
        "runtime": "torch",
        "precision": "float32",
        "device": "cpu",
    }
    assert "embedserve_gpu_utilization_ratio" not in families  # no NVML on a CPU server
    assert families["embedserve_requests_in_flight"].samples[0].value == 0


def test_in_flight_gauge_counts_a_running_call(serve) -> None:
    engine = FakeEngine()
    engine.delay = 1.0
    s = serve(engine)
    with EmbedClient(s.target) as client:
        client.model_info()
        result: list[Any] = []
        worker = threading.Thread(target=lambda: result.append(client.embed([("a", b"x")])))
        worker.start()
        deadline = time.monotonic() + 5
        while s.sample("embedserve_requests_in_flight") != 1.0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.sample("embedserve_requests_in_flight") == 1.0
        worker.join(10)
    assert result and result[0][0].ok
    assert s.sample("embedserve_requests_in_flight") == 0.0


def test_wal_bytes_and_snapshot_age_per_collection(serve) -> None:
    s = serve()
    with EmbedClient(s.target) as client:
        client.create_collection("c1", dim=4)
        client.embed([("k1", b"x"), ("k2", b"y")], store=True, collection="c1")
    families = s.families()
    wal = {x.labels["collection"]: x.value for x in families["embedserve_wal_bytes"].samples}
    directory = Path(s.server.cfg.data_dir) / "collections" / "c1"

    def log_bytes() -> int:
        return sum(p.stat().st_size for p in directory.glob("wal-*.log"))

    before = log_bytes()
    assert wal["c1"] == before > 0, (wal, before)
    ages = {x.labels["collection"] for x in families["embedserve_snapshot_age_seconds"].samples}
    assert "c1" not in ages  # no snapshot written yet
    s.server.index.snapshot("c1")
    families = s.families()
    wal = {x.labels["collection"]: x.value for x in families["embedserve_wal_bytes"].samples}
    ages = {x.labels["collection"]: x.value for x in families["embedserve_snapshot_age_seconds"].samples}
    assert wal["c1"] == log_bytes() < before and 0 <= ages["c1"] < 60


def test_dropped_by_deadline_counts_as_deadline_exceeded(serve) -> None:
    engine = FakeEngine()
    s = serve(engine)
    with EmbedClient(s.target) as client:
        client.model_info()
        engine.delay = 0.6
        busy = threading.Thread(target=lambda: client.embed([("busy", b"x")]))
        busy.start()
        assert engine.running.wait(30)  # the model is busy now: the next request waits in the queue past its deadline
        with pytest.raises(RemoteError) as info:
            client.embed([("a", b"x"), ("b", b"y"), ("c", b"z")], timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        busy.join(10)
        time.sleep(0.3)  # the collector has looked at the dropped items by now
    assert s.sample("embedserve_images_total", {"outcome": "deadline_exceeded"}) == 3
    assert s.sample("embedserve_images_total", {"outcome": "cancelled"}) == 0
    assert s.sample("embedserve_requests_total", {"method": "Embed", "code": "DEADLINE_EXCEEDED"}) == 1
    assert s.sample("embedserve_requests_total", {"method": "Embed", "code": "CANCELLED"}) == 0
    assert engine.ran == 1


def test_a_call_that_expired_before_its_handler_started_is_counted(serve) -> None:
    s = serve()
    with EmbedClient(s.target) as client:
        client.model_info()
        s.loop.call_soon_threadsafe(time.sleep, 0.6)  # the server's loop is stuck past the call's deadline
        time.sleep(0.05)
        with pytest.raises(RemoteError) as info:
            client.model_info(timeout=0.2)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.8)
    assert s.sample("embedserve_requests_total", {"method": "GetModelInfo", "code": "DEADLINE_EXCEEDED"}) == 1
    assert s.sample("embedserve_requests_total", {"method": "GetModelInfo", "code": "OK"}) == 1
    assert s.sample("embedserve_requests_in_flight") == 0


def test_get_model_info_is_unavailable_during_a_drain_like_the_rest(serve) -> None:
    engine = FakeEngine()
    s = serve(engine)
    with EmbedClient(s.target) as client:
        client.model_info()
        engine.delay = 1.5
        busy = threading.Thread(target=lambda: client.embed([("a", b"x")]))
        busy.start()
        assert engine.running.wait(30)
        stopping = asyncio.run_coroutine_threadsafe(s.server.stop(5.0), s.loop)
        time.sleep(0.2)
        codes = {}
        for name, call in (("model_info", client.model_info), ("embed", lambda: client.embed([("b", b"y")]))):
            with pytest.raises(RemoteError) as info:
                call()
            codes[name] = info.value.code
        busy.join(10)
        stopping.result(10)
    assert codes == {"model_info": grpc.StatusCode.UNAVAILABLE, "embed": grpc.StatusCode.UNAVAILABLE}
    s.server.stop = _already_stopped  # type: ignore[method-assign]


async def _already_stopped(grace: float | None = None) -> None:
    return None


def test_missing_and_wrong_tokens_say_which(serve) -> None:
    s = serve(server__auth_token="s3cret")
    with EmbedClient(s.target) as anonymous, pytest.raises(RemoteError) as missing:
        anonymous.model_info()
    with EmbedClient(s.target, token="nope") as wrong, pytest.raises(RemoteError) as bad:
        wrong.model_info()
    assert missing.value.code == bad.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert missing.value.details == MISSING_TOKEN and "no token" in MISSING_TOKEN
    assert bad.value.details == WRONG_TOKEN and "wrong token" in WRONG_TOKEN


def test_ports_in_use_name_the_port_and_the_flag(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def grpc_port() -> None:
            await create_server(make_cfg(tmp_path / "a", server__port=port), engine=FakeEngine())

        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*--port"):
            asyncio.run(grpc_port())

        async def metrics_port() -> None:
            server, _ = await create_server(make_cfg(tmp_path / "b", server__metrics_port=port), engine=FakeEngine())
            try:
                await server.start()
            finally:
                await server.stop(0)

        with pytest.raises(PortInUseError, match=rf"127\.0\.0\.1:{port}.*--metrics-port"):
            asyncio.run(metrics_port())


def test_start_up_says_where_it_listens_and_what_it_serves(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.api.server")
    s = Served(make_cfg(tmp_path / "data"), FakeEngine())
    try:
        metrics_url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
        messages = [r.getMessage() for r in caplog.records if r.name == "service.api.server"]
        listening = [m for m in messages if m.startswith("listening on ")]
        assert listening == [f"listening on 127.0.0.1:{s.port} (metrics {metrics_url}); loading fake on auto, "
                             "NOT_SERVING until it is warm"]  # fmt: skip
        serving = [m for m in messages if m.startswith("SERVING on ")]
        assert serving == [f"SERVING on 127.0.0.1:{s.port} (metrics {metrics_url}): fake, 4-d, torch float32 on cpu, "
                           "decode none"]  # fmt: skip
    finally:
        s.close()


class EndedContext:
    """A servicer context after the call ended: gRPC no longer reports a time remaining or a code."""

    def time_remaining(self) -> float | None:
        return None

    def code(self) -> grpc.StatusCode | None:
        return None


def test_a_call_cancelled_at_its_deadline_is_recorded_as_deadline_exceeded() -> None:
    from service.api.interceptors import _final_code

    past, future = time.monotonic() - 0.01, time.monotonic() + 60
    ctx: Any = EndedContext()
    assert _final_code(asyncio.CancelledError(), ctx, past) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code(RuntimeError("abort on a dead call"), ctx, past) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _final_code(asyncio.CancelledError(), ctx, future) == grpc.StatusCode.CANCELLED
    assert _final_code(asyncio.CancelledError(), ctx, None) == grpc.StatusCode.CANCELLED
    assert _final_code(None, ctx, past) == grpc.StatusCode.OK


def test_gpu_utilisation_comes_from_nvml_where_present(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from service.devices import nvml_utilization_probe
    from service.metrics import Metrics

    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert nvml_utilization_probe("cuda:0") is None

    calls: list[int] = []
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: calls.append(i) or f"gpu{i}"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=37, memory=5)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = nvml_utilization_probe("cuda:1")
    assert probe is not None and calls == [1]
    metrics = Metrics()
    metrics.track_gpu_utilization(probe)
    assert metrics.registry.get_sample_value("embedserve_gpu_utilization_ratio") == pytest.approx(0.37)

    def broken() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = broken  # type: ignore[attr-defined]
    assert nvml_utilization_probe("cuda:0") is None
