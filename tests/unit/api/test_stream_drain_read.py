"""EmbedStream's reader when a drain begins while it waits for the client's next request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from service.api.embedder import EmbedderServicer
from service.api.errors import CallGate
from service.errors import EngineUnavailableError


async def _silent_client(sent: asyncio.Event) -> AsyncIterator[object]:
    """A client that keeps its stream open and sends nothing more."""
    sent.set()
    await asyncio.Event().wait()
    yield object()  # never reached


def test_a_drain_while_waiting_for_the_next_request_ends_the_read_as_unavailable() -> None:
    async def scenario() -> None:
        gate = CallGate()
        waiting = asyncio.Event()
        servicer = SimpleNamespace(gate=gate)
        read = asyncio.create_task(EmbedderServicer._next_request(servicer, _silent_client(waiting)))  # type: ignore[arg-type]
        await waiting.wait()
        await gate.drain(0.01)  # begins the drain; nothing is in flight
        # Before the fix the cancelled read was not done yet and `read.result()` raised InvalidStateError,
        # which the stream answered as INTERNAL instead of UNAVAILABLE.
        with pytest.raises(EngineUnavailableError, match="shutting down"):
            await asyncio.wait_for(read, timeout=5)

    asyncio.run(scenario())


def test_the_next_request_is_returned_and_the_end_of_the_stream_is_none() -> None:
    async def client() -> AsyncIterator[str]:
        yield "first"

    async def scenario() -> None:
        servicer = SimpleNamespace(gate=CallGate())
        messages = client()
        assert await EmbedderServicer._next_request(servicer, messages) == "first"  # type: ignore[arg-type]
        assert await EmbedderServicer._next_request(servicer, messages) is None  # type: ignore[arg-type]

    asyncio.run(scenario())
