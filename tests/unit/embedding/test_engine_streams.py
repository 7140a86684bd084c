"""The engine's GPU plumbing, checked on the CPU: per-thread CUDA streams and the events between them, and the
warm-up of the preprocess kernel.

The streams are exercised through `ThreadStreams` with a stand-in for `torch.cuda` that logs what each thread
queued on which stream; the tensors stay on the CPU, so the vectors must equal the plain CPU path's. On a GPU the
same engine runs with real streams in `bench.gpu_check` (section `engine_decode`: pipelined vs one by one).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import service.embedding.engine as engine_module
from service.devices import ThreadStreams
from service.embedding.engine import Engine
from tests.conftest import cpu_config


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda = cuda
        self.name = name

    def wait_stream(self, other: FakeStream) -> None:
        self.cuda.log.append(("wait", self.name, other.name))


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda
        self.stream = ""

    def record(self, stream: FakeStream) -> None:
        self.stream = stream.name
        self.cuda.log.append(("record", stream.name, threading.current_thread().name))

    def synchronize(self) -> None:
        self.cuda.log.append(("sync", self.stream, threading.current_thread().name))


class FakeCuda:
    """What `ThreadStreams` uses of `torch.cuda`, with a per-thread current stream like torch's."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, str]] = []
        self.default = FakeStream(self, "default")
        self._local = threading.local()
        self._made = 0
        self._lock = threading.Lock()

    def Stream(self, device: torch.device) -> FakeStream:  # torch.cuda's names
        assert device.type == "cuda"
        with self._lock:
            self._made += 1
            return FakeStream(self, f"s{self._made}")

    def Event(self) -> FakeEvent:
        return FakeEvent(self)

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous = self.current()
        self._local.current = stream
        try:
            yield
        finally:
            self._local.current = previous

    def current(self) -> FakeStream:
        current: FakeStream = getattr(self._local, "current", self.default)
        return current

    def default_stream(self, device: torch.device) -> FakeStream:
        return self.default


@pytest.fixture
def fake_gpu(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    """The session engine with GPU streams faked, logging the stream its preprocess and forward pass run on."""
    cuda = FakeCuda()
    monkeypatch.setattr(engine, "_streams", ThreadStreams(torch.device("cuda", 0), cuda=cuda))
    real_preprocess, real_forward = engine_module.preprocess_batch, engine.backbone.forward

    def preprocess(*args: Any, **kwargs: Any) -> torch.Tensor:
        cuda.log.append(("preprocess", cuda.current().name, threading.current_thread().name))
        return real_preprocess(*args, **kwargs)

    def forward(batch: torch.Tensor) -> torch.Tensor:
        cuda.log.append(("forward", cuda.current().name, threading.current_thread().name))
        return real_forward(batch)

    monkeypatch.setattr(engine_module, "preprocess_batch", preprocess)
    monkeypatch.setattr(engine.backbone, "forward", forward)
    return cuda


def test_each_thread_queues_on_its_own_stream_and_hands_over_complete_batches(
    engine: Engine, fake_gpu: FakeCuda, oct_files: list[Path], oct_embeddings: np.ndarray
) -> None:
    datas = [f.read_bytes() for f in oct_files]
    halves = {"prep-a": datas[:16], "prep-b": datas[16:]}
    prepared: dict[str, Any] = {}

    def prepare(name: str) -> None:
        prepared[name] = engine.prepare(halves[name])
        fake_gpu.log.append(("returned", "", name))

    threads = [threading.Thread(target=prepare, args=(name,), name=name) for name in halves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(prepared) == set(halves)
    outcomes = engine.run(prepared["prep-a"]) + engine.run(prepared["prep-b"])
    log = fake_gpu.log

    on = {thread: stream for op, stream, thread in log if op in ("preprocess", "forward")}
    assert len(set(on.values())) == 3 and "default" not in on.values(), log  # three threads, three own streams
    for name in halves:
        mine = [entry for entry in log if entry[2] == name]
        stream = on[name]
        # The thread waits for its own stream's event before prepare returns: the batch is complete by then.
        assert mine == [("preprocess", stream, name), ("record", stream, name), ("sync", stream, name),
                        ("returned", "", name)], mine  # fmt: skip
    forward = on[threading.current_thread().name]
    runs = [entry for entry in log if entry[2] == threading.current_thread().name or entry[0] == "wait"]
    # Each run first orders its stream after the default stream (where a caller may have sliced the batch).
    assert runs == [("wait", forward, "default"), ("forward", forward, threading.current_thread().name)] * 2, runs
    assert engine._streams.created == 3

    got = np.stack([o.vector for o in outcomes if o.vector is not None])
    np.testing.assert_allclose(got, oct_embeddings, atol=1e-5)  # the plumbing changes no number


def test_a_failed_preprocess_still_waits_for_its_stream(
    engine: Engine, fake_gpu: FakeCuda, monkeypatch: pytest.MonkeyPatch, oct_files: list[Path]
) -> None:
    def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise MemoryError("fake allocator refusal")

    monkeypatch.setattr(engine_module, "preprocess_batch", out_of_memory)
    with pytest.raises(MemoryError):
        engine.prepare([oct_files[0].read_bytes()])
    # The decoded images are freed only after the work queued on them is done, even when the kernel failed.
    assert [op for op, _, _ in fake_gpu.log] == ["record", "sync"]


def test_thread_streams_on_the_cpu_touch_no_cuda() -> None:
    class NoCuda:
        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"torch.cuda.{name} used on a CPU device")

    streams = ThreadStreams(torch.device("cpu"), cuda=NoCuda())
    assert not streams.enabled
    with streams.use() as stream:
        assert stream is None
    streams.finish(stream)
    streams.adopt(torch.zeros(2), stream)
    assert streams.stream() is None and streams.created == 0


def test_a_thread_keeps_its_stream() -> None:
    cuda = FakeCuda()
    streams = ThreadStreams(torch.device("cuda", 0), cuda=cuda)
    first = streams.stream()
    assert streams.stream() is first
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(streams.stream()))
    t.start()
    t.join()
    assert other[0] is not first and streams.created == 2
    with streams.use() as current:
        assert cuda.current() is current is first
    assert cuda.current() is cuda.default


def test_warmup_launches_the_preprocess_kernel_for_the_configured_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def warm(device: torch.device, size: tuple[int, int], **kwargs: Any) -> int:
        calls.append({"device": device, "size": size, **kwargs})
        return 3

    monkeypatch.setattr(engine_module, "warm_preprocess", warm)
    with Engine.from_config(cpu_config(decode__resize="letterbox", decode__pad="white")) as eng:
        spec = eng.backbone.spec
        assert calls == [
            {
                "device": torch.device("cpu"),
                "size": (spec.input_size, spec.input_size),
                "policy": "letterbox",
                "pad": "white",
                "mean": spec.mean,
                "std": spec.std,
            }
        ]
    calls.clear()
    Engine.from_config(cpu_config(backbone__warmup=False)).close()
    assert calls == []


def test_warmup_on_the_cpu_compiles_nothing(engine: Engine) -> None:
    assert engine.warm_preprocess() == 0  # the reference runs on CPU tensors: nothing to launch
