"""Overload: Embed is refused before its request is read while the queue is full; the client's retry policy."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import pytest

from service.api.embedder import SERVICE_NAME
from service.client import EmbedClient, EmbedResult, RemoteError
from tests.e2e.conftest import SpyEngine

EMBED = f"/{SERVICE_NAME}/Embed"
GARBAGE = b"\xff\xff\xff\xff not a protobuf message"
"""Bytes no EmbedRequest parses from: a server that parses them answers INTERNAL, not RESOURCE_EXHAUSTED."""


def _raw_embed(target: str, payload: bytes) -> grpc.StatusCode:
    with grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)]) as channel:
        call = channel.unary_unary(EMBED, request_serializer=None, response_deserializer=None)
        try:
            call(payload, timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def _outcome(future: Future[list[EmbedResult]]) -> str:
    try:
        return "OK" if all(r.ok for r in future.result(timeout=120)) else "FAILED"
    except RemoteError as e:
        return e.code.name


def _fill_queue(server, gated: GatedEngine, images, pool: ThreadPoolExecutor):  # type: ignore[no-untyped-def]
    """Submit enough slow calls (retried while refused) that the queue holds its 4 images; returns their futures.

    The pipeline also holds a running batch and a prepared one, hence 6 calls of 2 images for a queue of 4; those
    that find no room even after their retries end RESOURCE_EXHAUSTED. A batch leaves the count once it is decoded,
    so the queue is full for good only once a forward pass waits at the gate: nothing is taken from it after that."""
    filler = EmbedClient(server.target)
    futures = [pool.submit(filler.embed, images[2 * i : 2 * i + 2], timeout=120) for i in range(6)]
    batcher = server.server.batcher
    deadline = time.monotonic() + 60
    while not (gated.waiting.is_set() and batcher.queued >= 4) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gated.waiting.is_set(), "no forward pass reached the gate"
    assert batcher.queued >= 4, f"the queue never filled ({batcher.queued} queued)"
    return futures


class GatedEngine(SpyEngine):
    """Forward passes wait until `gate` is set: the queue stays full for as long as the test needs."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        super().__init__(inner)
        self.gate = threading.Event()
        self.waiting = threading.Event()
        """Set once a forward pass waits at the closed gate."""

    def run(self, prepared):  # type: ignore[no-untyped-def]
        if not self.gate.is_set():
            self.waiting.set()
        self.gate.wait(timeout=120)
        return super().run(prepared)


def test_a_full_queue_refuses_embed_before_reading_the_request(start_server, engine, oct_images) -> None:
    gated = GatedEngine(engine)
    server = start_server(
        engine_=gated, batcher__max_batch_size=2, batcher__max_queue_size=4, batcher__max_queue_delay_ms=1.0
    )
    gated.gate.set()
    # With room in the queue the garbage is parsed, and fails as garbage: the control for the check below.
    assert _raw_embed(server.target, GARBAGE) not in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED)
    with EmbedClient(server.target, retries=False) as client, ThreadPoolExecutor(max_workers=6) as pool:
        client.model_info()
        gated.gate.clear()  # from now on no forward pass ends, so the queue, once full, stays full
        try:
            futures = _fill_queue(server, gated, oct_images, pool)
            assert _raw_embed(server.target, GARBAGE) == grpc.StatusCode.RESOURCE_EXHAUSTED  # never parsed
            with pytest.raises(RemoteError) as refused:
                client.embed(oct_images[:1])
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "server busy" in refused.value.details
        finally:
            gated.gate.set()
        outcomes = [_outcome(f) for f in futures]
        assert "OK" in outcomes and set(outcomes) <= {"OK", "RESOURCE_EXHAUSTED"}, outcomes
    assert client_code_count(server, "RESOURCE_EXHAUSTED") >= 2


def client_code_count(server, code: str) -> float:  # type: ignore[no-untyped-def]
    return server.sample("embedserve_requests_total", {"method": "Embed", "code": code})


def test_max_concurrent_rpcs_refuses_calls_beyond_the_limit(start_server, spy_engine, oct_images) -> None:
    spy_engine.delay = 1.5
    server = start_server(engine_=spy_engine, server__max_concurrent_rpcs=1)
    with EmbedClient(server.target, retries=False) as client, ThreadPoolExecutor(max_workers=1) as pool:
        client.model_info()
        busy = pool.submit(client.embed, oct_images[:1], timeout=60)
        deadline = time.monotonic() + 30
        while not spy_engine.run_sizes and time.monotonic() < deadline:  # the call is in its (slow) forward pass
            time.sleep(0.01)
        with pytest.raises(RemoteError) as refused:
            client.model_info()
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert busy.result(timeout=60)[0].ok
        assert client.model_info().embedding_dim > 0  # below the limit again
