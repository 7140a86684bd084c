"""Server reflection answers the same under `grpc.reflection.v1` and `grpc.reflection.v1alpha`: both list every
service of a real server and describe the embedserve services, and the v1 protocol is v1alpha's under the v1 package.

The v1alpha client is grpcio-reflection's generated stub. grpcio-reflection ships no v1 stubs, so the v1 client calls
`/grpc.reflection.v1.ServerReflection/ServerReflectionInfo` with v1alpha's generated messages: the two protocols are
the same on the wire, which is the claim under test, and the v1 descriptor the server describes is checked against
v1alpha's field by field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_pb2_grpc

from service.api.clusterer import SERVICE_NAME as CLUSTER_SERVICE
from service.api.reflection import V1_FILE, v1_file_descriptor
from service.api.server import SERVICE_NAME
from tests.unit.api.test_ops import FakeEngine, Served, make_cfg

V1_METHOD = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
V1 = "grpc.reflection.v1.ServerReflection"
V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"

Ask = Callable[[v1alpha_pb2.ServerReflectionRequest], v1alpha_pb2.ServerReflectionResponse]


@pytest.fixture
def target(tmp_path: Path) -> Iterator[str]:
    """A real server (`create_server` with the Clusterer, a fake engine) on loopback."""
    served = Served(make_cfg(tmp_path / "data"), FakeEngine())
    try:
        yield served.target
    finally:
        served.close()


@pytest.fixture(params=["v1", "v1alpha"])
def ask(request: pytest.FixtureRequest, target: str) -> Iterator[Ask]:
    """One reflection request over the version under test, its one response back."""
    with grpc.insecure_channel(target) as channel:
        if request.param == "v1alpha":
            info = v1alpha_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        else:
            info = channel.stream_stream(
                V1_METHOD,
                request_serializer=v1alpha_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=v1alpha_pb2.ServerReflectionResponse.FromString,
            )

        def one(message: v1alpha_pb2.ServerReflectionRequest) -> v1alpha_pb2.ServerReflectionResponse:
            (response,) = list(info(iter([message]), timeout=10))
            return response

        yield one


def _file(ask: Ask, symbol: str) -> descriptor_pb2.FileDescriptorProto:
    response = ask(v1alpha_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    (first, *_) = response.file_descriptor_response.file_descriptor_proto
    return descriptor_pb2.FileDescriptorProto.FromString(first)


def test_both_versions_list_every_service(ask: Ask) -> None:
    response = ask(v1alpha_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert names == {SERVICE_NAME, CLUSTER_SERVICE, "grpc.health.v1.Health", V1, V1ALPHA}
    assert (SERVICE_NAME, CLUSTER_SERVICE) == ("embedserve.v1.EmbedderService", "embedserve.v1.ClustererService")


def test_both_versions_describe_the_embedder(ask: Ask) -> None:
    proto = _file(ask, SERVICE_NAME)
    assert proto.name == "embedserve/v1/embedder.proto" and proto.package == "embedserve.v1"
    (service,) = proto.service
    methods = {m.name: (m.input_type, m.output_type) for m in service.method}
    assert service.name == "EmbedderService"
    assert methods["EmbedStream"] == (".embedserve.v1.EmbedStreamRequest", ".embedserve.v1.EmbedStreamResponse")
    assert methods["GetModelInfo"] == (".embedserve.v1.GetModelInfoRequest", ".embedserve.v1.GetModelInfoResponse")


def test_both_versions_report_an_unknown_symbol(ask: Ask) -> None:
    response = ask(v1alpha_pb2.ServerReflectionRequest(file_containing_symbol="embedserve.v1.Embedder"))
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _shape(proto: descriptor_pb2.FileDescriptorProto) -> tuple[object, ...]:
    """Messages (name, fields) and methods with the package taken out of every type name."""
    package = f".{proto.package}."

    def local(name: str) -> str:
        return name.removeprefix(package)

    messages = sorted(
        (m.name, sorted((f.name, f.number, f.type, f.label, local(f.type_name), f.oneof_index) for f in m.field))
        for m in proto.message_type
    )
    methods = sorted(
        (s.name, m.name, local(m.input_type), local(m.output_type), m.client_streaming, m.server_streaming)
        for s in proto.service
        for m in s.method
    )
    return (messages, methods)


def test_the_v1_protocol_is_v1alpha_under_the_v1_package(ask: Ask) -> None:
    v1 = _file(ask, V1)
    assert (v1.name, v1.package) == (V1_FILE, "grpc.reflection.v1")
    assert not v1.options.deprecated  # v1alpha is deprecated, v1 is not
    reference = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(reference)
    assert reference.package == "grpc.reflection.v1alpha" and reference.options.deprecated
    assert _shape(v1) == _shape(reference)
    assert len(v1.message_type) == len(reference.message_type) > 5


def test_the_v1_descriptor_is_added_once_per_pool() -> None:
    pool = descriptor_pool.DescriptorPool()
    first = v1_file_descriptor(pool)
    assert v1_file_descriptor(pool) is first
    assert pool.FindServiceByName(V1).methods_by_name["ServerReflectionInfo"].output_type.full_name == (
        "grpc.reflection.v1.ServerReflectionResponse"
    )
    assert descriptor_pool.Default().FindServiceByName(V1).full_name == V1
