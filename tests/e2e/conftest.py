"""Real servers over loopback (port 0), sharing one CPU engine per test session to save warm-up time.

Each server runs on its own event loop in a background thread, so tests use the ordinary blocking client.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from service.api.server import EmbedServer, ServicerHook, ServingEngine, create_server
from service.config import Config, load_config
from service.embedding.engine import Engine, PreparedBatch
from service.errors import ImageError
from service.types import EmbedOutcome, ModelInfo

OCT_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "oct-sample"

T = TypeVar("T")

# Small everything: this runs on a 2-core CPU where one image takes ~50-150 ms through the model.
BASE_OVERRIDES: dict[str, Any] = {
    "server.port": 0,
    # The float32 torch path, like tests/conftest.py's environment: these tests compare vectors to 1e-5.
    "backbone.runtime": "torch",
    "backbone.cpu_precision": "float32",
    "server.metrics_port": -1,
    "server.grace_seconds": 5.0,
    "engine.batch_size": 8,
    "engine.prefetch_batches": 1,
    "decode.workers": 2,
    "batcher.max_batch_size": 8,
    "batcher.max_queue_delay_ms": 20.0,
    "batcher.max_queue_size": 64,
}


def make_config(**overrides: Any) -> Config:
    """The test config with `overrides` given as `section__field=value` (e.g. `server__auth_token="t"`)."""
    merged = dict(BASE_OVERRIDES)
    merged.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(env={}, overrides=merged)


def oct_files() -> list[Path]:
    return sorted(OCT_SAMPLE.rglob("*.jpeg"))


@pytest.fixture(scope="session")
def oct_images() -> list[tuple[str, bytes]]:
    """(key, bytes) of the 32 real OCT scans, keys relative to the sample directory."""
    return [(p.relative_to(OCT_SAMPLE).as_posix(), p.read_bytes()) for p in oct_files()]


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    eng = Engine.from_config(make_config())
    yield eng
    eng.close()


@pytest.fixture(scope="session")
def reference(engine: Engine, oct_images: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    """The offline engine's vectors for the OCT sample, by key."""
    outcomes = engine.embed([data for _, data in oct_images])
    assert all(o.ok for o in outcomes)
    return {key: o.vector for (key, _), o in zip(oct_images, outcomes, strict=True)}  # type: ignore[misc]


class SpyEngine:
    """Delegates to a real engine, records how many images each forward pass ran, and can slow passes down."""

    def __init__(self, inner: Engine, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        """Extra seconds per forward pass, so that timing-dependent tests do not depend on the machine's speed."""
        self.run_sizes: list[int] = []
        self._lock = threading.Lock()

    @property
    def info(self) -> ModelInfo:
        return self.inner.info

    def prepare(self, datas: Sequence[bytes | ImageError]) -> PreparedBatch:
        return self.inner.prepare(datas)

    def run(self, prepared: PreparedBatch) -> list[EmbedOutcome]:
        with self._lock:
            self.run_sizes.append(prepared.size)
        time.sleep(self.delay)
        return self.inner.run(prepared)


class RunningServer:
    """A started `EmbedServer` on a private event loop thread."""

    def __init__(
        self,
        cfg: Config,
        engine: ServingEngine,
        *,
        extra_servicers: Sequence[ServicerHook] = (),
        extra_service_names: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self.thread.start()
        self.server: EmbedServer
        self.server, self.port = self.call(
            create_server(cfg, engine=engine, extra_servicers=extra_servicers, extra_service_names=extra_service_names)
        )
        self.call(self.server.start())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.server.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def stop(self) -> None:
        try:
            self.call(self.server.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


@pytest.fixture
def start_server(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RunningServer]]:
    """`start_server(engine=None, **overrides)` starts a server (default: the shared engine); stopped after the test.

    Each server gets a fresh data directory (its index) unless `data_dir=` is given.
    """
    started: list[RunningServer] = []

    def start(engine_: ServingEngine | None = None, **overrides: Any) -> RunningServer:
        overrides.setdefault("data_dir", str(tmp_path_factory.mktemp("data")))
        server = RunningServer(make_config(**overrides), engine_ if engine_ is not None else engine)
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.stop()


@pytest.fixture
def spy_engine(engine: Engine) -> SpyEngine:
    return SpyEngine(engine)
