"""The checked-in stubs in service/wire/_proto are what protoc makes of protos/ (python -m service.wire.protos)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf.descriptor import FileDescriptor

from service.wire.protos import STUB_ROOT, generate, stub_files

pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) generates the stubs")


def test_checked_in_stubs_match_the_protos(tmp_path: Path) -> None:
    generate(tmp_path)
    fresh = stub_files(tmp_path)
    checked_in = stub_files(STUB_ROOT)
    assert sorted(fresh) == sorted(checked_in), "stub files differ; run `python -m service.wire.protos`"
    drifted = [str(path) for path, data in fresh.items() if checked_in[path] != data]
    assert not drifted, f"stubs drifted from protos/: {drifted}; run `python -m service.wire.protos` and commit"


def test_stubs_import_and_describe_the_service() -> None:
    from service.wire._proto.embedserve.v1 import embedder_pb2, embedder_pb2_grpc

    service = embedder_pb2.DESCRIPTOR.services_by_name["EmbedderService"]
    assert service.full_name == "embedserve.v1.EmbedderService"
    assert {m.name for m in service.methods} == {
        "Embed",
        "EmbedStream",
        "GetModelInfo",
        "Neighbors",
        "DeleteItems",
        "ListItems",
        "GetCollectionInfo",
        "ListCollections",
        "CreateCollection",
        "DropCollection",
    }
    assert embedder_pb2.DESCRIPTOR.name == "embedserve/v1/embedder.proto"
    assert hasattr(embedder_pb2_grpc, "EmbedderServiceStub")


def _files() -> list[FileDescriptor]:
    from service.wire._proto.embedserve.v1 import cluster_pb2, embedder_pb2

    return [embedder_pb2.DESCRIPTOR, cluster_pb2.DESCRIPTOR]


def test_every_rpc_has_its_own_request_and_response() -> None:
    """What buf's STANDARD lint asks of services (checked here from the descriptors, also where buf is missing)."""
    services = [s for f in _files() for s in f.services_by_name.values()]
    assert {s.full_name for s in services} == {"embedserve.v1.EmbedderService", "embedserve.v1.ClustererService"}
    used: list[str] = []
    for service in services:
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
            used += [method.input_type.full_name, method.output_type.full_name]
    assert len(used) == len(set(used)), "a message is the request or response of two RPCs"


def test_enum_values_are_prefixed_and_zero_is_unspecified() -> None:
    enums = [e for f in _files() for e in f.enum_types_by_name.values()]
    assert {e.name for e in enums} == {"VectorDtype", "ClusterAlgorithm", "ProbeClassifier"}
    for enum in enums:
        prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
        assert enum.values_by_number[0].name == f"{prefix}UNSPECIFIED"
        assert all(v.name.startswith(prefix) for v in enum.values), enum.name
