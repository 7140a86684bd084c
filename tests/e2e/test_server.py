"""The gRPC server end to end over loopback: vectors, batching, errors, limits, deadlines, auth, metrics."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from service.api.server import SERVICE_NAME
from service.client import EmbedClient, RemoteEmbedder, RemoteError
from service.errors import InvalidImageError, UnreadableImageError
from service.wire._proto.embedserve.v1 import embedder_pb2 as pb
from service.wire._proto.embedserve.v1 import embedder_pb2_grpc as pb_grpc

ATOL = 1e-4


def assert_close(got: np.ndarray | None, want: np.ndarray, atol: float = ATOL) -> None:
    assert got is not None
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


def test_health_serving_and_reflection_lists_every_service(start_server) -> None:
    server = start_server()
    with grpc.insecure_channel(server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    reflection = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert {SERVICE_NAME, "grpc.health.v1.Health", *reflection} <= services


def test_reflection_client_can_call_embed_without_the_proto(start_server, oct_images, reference) -> None:
    server = start_server()
    key, data = oct_images[0]
    with grpc.insecure_channel(server.target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(SERVICE_NAME).FindMethodByName("Embed")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = request_cls()
        image = request.images.add()
        image.key, image.data = key, data
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/Embed",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        response = call(request, timeout=30)
    assert_close(np.frombuffer(response.results[0].vector, "<f4"), reference[key])


def test_embed_matches_the_offline_engine(start_server, oct_images, reference) -> None:
    server = start_server()
    batch = oct_images[::4]  # 8 scans, one of each class in turn
    with EmbedClient(server.target) as client:
        info = client.model_info()
        results = client.embed(batch)
        half = client.embed(batch[:2], dtype="float16")
        no_vectors = client.embed(batch[:1], return_vectors=False)
    assert info.backbone == "efficientnet_lite0" and info.embedding_dim == 1280 and info.device == "cpu"
    assert [r.key for r in results] == [k for k, _ in batch]
    for r in results:
        assert r.ok
        assert_close(r.vector, reference[r.key])
    for r in half:
        assert_close(r.vector, reference[r.key], atol=2e-3)
    assert no_vectors[0].ok and no_vectors[0].vector is None


@dataclass
class MissingFile:
    key: str

    def load(self) -> bytes:
        raise UnreadableImageError(f"cannot read {self.key}: no such file")


@dataclass
class BytesItem:
    key: str
    data: bytes

    def load(self) -> bytes:
        return self.data


def test_remote_embedder_streams_the_sample_like_the_offline_engine(start_server, oct_images, reference) -> None:
    server = start_server()
    items: list[BytesItem | MissingFile] = [BytesItem(k, d) for k, d in oct_images]
    items.insert(5, MissingFile("gone.jpeg"))
    items.insert(11, BytesItem("broken.jpeg", b"\xff\xd8\xff garbage"))
    with RemoteEmbedder(server.target, batch_size=5, max_in_flight=2) as remote:
        assert remote.info.embedding_dim == 1280
        out = list(remote.embed_iter(items))
    assert [e.item.key for e in out] == [i.key for i in items]
    by_key = {e.item.key: e.outcome for e in out}
    assert isinstance(by_key["gone.jpeg"].error, UnreadableImageError)
    assert isinstance(by_key["broken.jpeg"].error, InvalidImageError)
    for key, vector in reference.items():
        assert by_key[key].ok
        assert_close(by_key[key].vector, vector)


def test_concurrent_clients_are_batched_and_get_their_own_vectors(start_server, oct_images, reference) -> None:
    server = start_server(server__metrics_port=0, batcher__max_queue_delay_ms=100.0)
    with EmbedClient(server.target) as client, ThreadPoolExecutor(max_workers=32) as pool:
        futures = {key: pool.submit(client.embed, [(key, data)]) for key, data in oct_images}
        results = {key: f.result(timeout=120) for key, f in futures.items()}
    for key, (result,) in results.items():
        assert result.key == key
        assert_close(result.vector, reference[key])

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    batches = samples[("embedserve_batch_size_count", ())]
    assert samples[("embedserve_batch_size_sum", ())] == 32
    assert batches < 32, "every image ran alone: no dynamic batching"
    assert samples[("embedserve_requests_total", (("code", "OK"), ("method", "Embed")))] == 32
    assert samples[("embedserve_images_total", (("outcome", "ok"),))] == 32


def test_corrupt_image_fails_alone(start_server, oct_images, reference) -> None:
    server = start_server()
    (k1, d1), (k2, d2) = oct_images[0], oct_images[9]
    images = [(k1, d1), ("corrupt", b"\xff\xd8\xff\xe0 not really a jpeg"), (k2, d2), ("empty", b"")]
    with EmbedClient(server.target) as client:
        results = client.embed(images)
    assert [r.key for r in results] == [k for k, _ in images]
    assert_close(results[0].vector, reference[k1])
    assert_close(results[2].vector, reference[k2])
    for bad in (results[1], results[3]):
        assert not bad.ok and bad.vector is None
        assert isinstance(bad.error, InvalidImageError) and bad.error.reason == "invalid_image"
    with grpc.insecure_channel(server.target) as channel:
        request = pb.EmbedRequest(images=[pb.Image(key="x", data=b"nope")])
        raw = pb_grpc.EmbedderServiceStub(channel).Embed(request, timeout=10)
    assert raw.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "Traceback" not in raw.results[0].error.message


def test_tiny_queue_refuses_a_burst_and_stays_healthy(start_server, spy_engine, oct_images) -> None:
    spy_engine.delay = 0.2
    server = start_server(
        engine_=spy_engine, batcher__max_batch_size=2, batcher__max_queue_size=2, batcher__max_queue_delay_ms=5.0
    )
    burst = oct_images[:16]

    def one(client: EmbedClient, item: tuple[str, bytes]) -> str:
        try:
            client.embed([item], timeout=60)
        except RemoteError as e:
            return e.code.name
        return "OK"

    refused = 0
    with EmbedClient(server.target, retries=False) as client:  # every refusal reaches the test
        for _ in range(2):  # two bursts: nothing accumulates between them
            with ThreadPoolExecutor(max_workers=len(burst)) as pool:
                codes = list(pool.map(lambda item: one(client, item), burst))
            assert "RESOURCE_EXHAUSTED" in codes and "OK" in codes
            assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}
            refused += codes.count("RESOURCE_EXHAUSTED")
        assert client.health() == "SERVING"
        assert client.embed(oct_images[:1])[0].ok
    batcher = server.server.batcher
    assert batcher is not None
    assert batcher.peak_queued <= 2 and batcher.queued == 0
    # A call refused before its request is read (the queue was full) counts as a refused call, not as images.
    refused_calls = server.sample("embedserve_requests_total", {"method": "Embed", "code": "RESOURCE_EXHAUSTED"})
    assert refused_calls == refused
    assert server.sample("embedserve_images_total", {"outcome": "rejected"}) <= refused


def test_expired_deadline_is_reported_and_its_images_never_run(start_server, spy_engine, oct_images) -> None:
    spy_engine.delay = 0.8
    server = start_server(engine_=spy_engine, batcher__max_queue_delay_ms=5.0)
    with EmbedClient(server.target) as client:
        client.model_info()  # connect first
        with ThreadPoolExecutor(max_workers=1) as pool:
            busy = pool.submit(client.embed, oct_images[:6])  # keeps the model busy for more than 0.8 s
            deadline = time.monotonic() + 30
            while not spy_engine.run_sizes and time.monotonic() < deadline:  # its forward pass has started
                time.sleep(0.01)
            with pytest.raises(RemoteError) as info:
                client.embed(oct_images[6:8], timeout=0.25)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert all(r.ok for r in busy.result(timeout=60))
        time.sleep(1.0)  # the batch holding the expired images has had every chance to run by now
        assert sum(spy_engine.run_sizes) == 6, spy_engine.run_sizes
        assert client.embed(oct_images[6:7])[0].ok


def test_request_limits_and_store(start_server, oct_images) -> None:
    server = start_server(server__max_images_per_request=2)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderServiceStub(channel)
        cases = [
            (
                pb.EmbedRequest(images=[pb.Image(key=str(i), data=b"x") for i in range(3)]),
                "INVALID_ARGUMENT",
                "at most 2",
            ),
            (pb.EmbedRequest(store=True, collection="no spaces"), "INVALID_ARGUMENT", "collection name"),
            (pb.EmbedRequest(store=True, images=[pb.Image(data=b"x")]), "INVALID_ARGUMENT", "non-empty key"),
            (pb.EmbedRequest(vector_dtype=7), "INVALID_ARGUMENT", "vector_dtype"),  # type: ignore[arg-type]
        ]
        for request, code, text in cases:
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(request, timeout=10)
            assert info.value.code().name == code and text in info.value.details()
        assert stub.Embed(pb.EmbedRequest(), timeout=10).results == []


def test_oversized_message_is_refused(start_server) -> None:
    server = start_server(server__max_message_bytes=1024 * 1024)
    with EmbedClient(server.target) as client, pytest.raises(RemoteError) as info:
        client.embed([("big", b"\0" * (2 * 1024 * 1024))])
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_token_auth(start_server) -> None:
    server = start_server(server__auth_token="s3cret")
    with EmbedClient(server.target) as anonymous:
        with pytest.raises(RemoteError) as info:
            anonymous.model_info()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(RemoteError) as info:
            anonymous.embed([("k", b"x")])
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert anonymous.health() == "SERVING"  # probes need no token
    with EmbedClient(server.target, token="wrong") as wrong, pytest.raises(RemoteError) as info:
        wrong.model_info()
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with EmbedClient(server.target, token="s3cret") as client:
        assert client.model_info().embedding_dim == 1280
    assert server.sample("embedserve_requests_total", {"method": "GetModelInfo", "code": "UNAUTHENTICATED"}) == 2


def test_metrics_endpoint_has_the_documented_families_and_request_ids(start_server, oct_images) -> None:
    server = start_server(server__metrics_port=0)
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.EmbedderServiceStub(channel)
        _, call = stub.Embed.with_call(
            pb.EmbedRequest(images=[pb.Image(key="a", data=oct_images[0][1])]),
            metadata=(("x-request-id", "req-42"),),
            timeout=30,
        )
        assert ("x-request-id", "req-42") in call.initial_metadata()
        stub.Embed(pb.EmbedRequest(images=[pb.Image(key="b", data=b"bad")]), timeout=30)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "embedserve_requests",
        "embedserve_request_duration_seconds",
        "embedserve_images",
        "embedserve_batch_size",
        "embedserve_queue_depth",
        "embedserve_queue_wait_seconds",
        "embedserve_stage_duration_seconds",
        "process_resident_memory_bytes",
    ):
        assert name in families, name
    outcomes = {
        s.labels["outcome"]: s.value for s in families["embedserve_images"].samples if s.name.endswith("_total")
    }
    assert outcomes["ok"] == 1 and outcomes["invalid_image"] == 1
    stages = {s.labels["stage"] for s in families["embedserve_stage_duration_seconds"].samples}
    assert {"decode", "infer"} <= stages
    assert families["embedserve_queue_depth"].samples[0].value == 0


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    try:
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"openssl cannot make a test certificate: {e}")
    return cert, key


def test_tls(start_server, tls_files) -> None:
    cert, key = tls_files
    server = start_server(server__tls_cert=str(cert), server__tls_key=str(key))
    target = f"localhost:{server.port}"
    with EmbedClient(target, root_certificates=cert.read_bytes()) as client:
        assert client.model_info().embedding_dim == 1280
    with EmbedClient(target, timeout=5) as plaintext, pytest.raises(RemoteError):
        plaintext.model_info()


def test_servers_in_one_process_do_not_collide(start_server) -> None:
    first, second = start_server(server__metrics_port=0), start_server(server__metrics_port=0)
    assert first.port != second.port
    assert first.server.metrics.registry is not second.server.metrics.registry
    assert first.server.metrics_port != second.server.metrics_port


class BrokenEngine:
    """An engine whose forward pass fails, as a lost device would."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.info = inner.info

    def prepare(self, datas):  # type: ignore[no-untyped-def]
        return self.inner.prepare(datas)

    def run(self, prepared):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: device lost (internal detail)")


def test_dead_engine_fails_calls_and_flips_health(start_server, engine, oct_images) -> None:
    server = start_server(engine_=BrokenEngine(engine))
    with EmbedClient(server.target) as client:
        with pytest.raises(RemoteError) as info:
            client.embed(oct_images[:1])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "device lost" not in info.value.details  # internal text stays in the server log
        deadline = time.monotonic() + 5
        while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(RemoteError) as info:
            client.embed(oct_images[:1])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert server.server.failure is not None
