"""The published retry policy: busy and unavailable servers are retried with backoff, other errors are not."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.client import EmbedClient, RemoteError
from service.client.channel import RETRY_POLICY, backoff_delays, channel_options, service_config
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb

EMBEDDER = next(iter(pb.DESCRIPTOR.services_by_name.values())).full_name
CLUSTERER = next(iter(cpb.DESCRIPTOR.services_by_name.values())).full_name


class Flaky:
    """GetModelInfo that fails the first `failures` calls with `code`, recording when each attempt came."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
        self.failures = 0
        self.attempts: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.GetModelInfoResponse:
        with self.lock:
            self.attempts.append(time.monotonic())
            failing = len(self.attempts) <= self.failures
        if failing:
            context.abort(self.code, "try again")
        return pb.GetModelInfoResponse(model_info=pb.ModelInfo(backbone="fake", embedding_dim=4))


@pytest.fixture
def flaky() -> Iterator[tuple[str, Flaky, health.HealthServicer]]:
    behaviour = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=pb.GetModelInfoRequest.FromString,
        response_serializer=pb.GetModelInfoResponse.SerializeToString,
    )
    service = EMBEDDER
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service, {"GetModelInfo": handler})])
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", behaviour, health_servicer
    server.stop(0)


def test_the_service_config_names_every_service_and_the_retryable_codes() -> None:
    config = service_config()
    names = {entry["service"] for entry in config["methodConfig"][0]["name"]}
    assert names == {EMBEDDER, CLUSTERER}
    assert set(RETRY_POLICY["retryableStatusCodes"]) == {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
    options = dict(channel_options(8 << 20))
    assert json.loads(options["grpc.service_config"]) == config and options["grpc.per_rpc_retry_buffer_size"] == 8 << 20
    assert dict(channel_options(8 << 20, retries=False))["grpc.enable_retries"] == 0


@pytest.mark.parametrize("code", [grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE])
def test_busy_or_unavailable_calls_are_retried_with_backoff(flaky, code: grpc.StatusCode) -> None:  # type: ignore[no-untyped-def]
    target, behaviour, _ = flaky
    behaviour.code, behaviour.failures = code, 3
    with EmbedClient(target) as client:
        assert client.model_info().backbone == "fake"
    assert len(behaviour.attempts) == 4
    gaps = [b - a for a, b in zip(behaviour.attempts, behaviour.attempts[1:], strict=False)]
    assert all(gap < 2.5 for gap in gaps)  # each delay is drawn below the (capped) backoff


def test_retries_give_up_after_the_policy_s_attempts_and_other_codes_are_not_retried(flaky) -> None:  # type: ignore[no-untyped-def]
    target, behaviour, _ = flaky
    behaviour.failures = 100
    with EmbedClient(target) as client, pytest.raises(RemoteError) as refused:
        client.model_info()
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(behaviour.attempts) == RETRY_POLICY["maxAttempts"]
    behaviour.attempts.clear()
    behaviour.code = grpc.StatusCode.INVALID_ARGUMENT
    with EmbedClient(target) as client, pytest.raises(RemoteError):
        client.model_info()
    assert len(behaviour.attempts) == 1
    behaviour.attempts.clear()
    behaviour.code = grpc.StatusCode.RESOURCE_EXHAUSTED
    with EmbedClient(target, retries=False) as client, pytest.raises(RemoteError):
        client.model_info()
    assert len(behaviour.attempts) == 1


def test_wait_until_serving_waits_once_announced_and_gives_up_in_time(flaky) -> None:  # type: ignore[no-untyped-def]
    target, _, health_servicer = flaky
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    notices: list[str] = []
    threading.Timer(0.8, health_servicer.set, ("", health_pb2.HealthCheckResponse.SERVING)).start()
    with EmbedClient(target) as client:
        started = time.monotonic()
        client.wait_until_serving(10, on_wait=notices.append)
        assert 0.7 < time.monotonic() - started < 5
        assert notices == ["NOT_SERVING"]  # once, however many polls
        health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        started = time.monotonic()
        with pytest.raises(RemoteError) as timed_out:
            client.wait_until_serving(1.0)
        assert timed_out.value.code == grpc.StatusCode.UNAVAILABLE and "within 1 s" in timed_out.value.details
        assert time.monotonic() - started < 3


def test_wait_until_serving_finds_a_server_that_starts_late() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = server.add_insecure_port("127.0.0.1:0")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    notices: list[str] = []
    # The port is bound, nothing answers for 2.5 s: longer than the first poll (1 s, wait_for_ready) waits.
    threading.Timer(2.5, server.start).start()
    try:
        with EmbedClient(f"127.0.0.1:{port}") as client:
            client.wait_until_serving(15, on_wait=notices.append)
        assert len(notices) == 1
    finally:
        server.stop(0)


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    delays = backoff_delays(initial=0.2, maximum=5.0)
    drawn = [next(delays) for _ in range(12)]
    bounds = [min(5.0, 0.2 * 2**i) for i in range(12)]
    assert all(b / 2 <= d < b for d, b in zip(drawn, bounds, strict=True))
    assert len(set(drawn)) == len(drawn)
