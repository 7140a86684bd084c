"""The checked-in stubs in service/wire/_proto are what protoc makes of protos/ (python -m service.wire.protos)."""

from __future__ import annotations

from pathlib import Path

import pytest

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

    service = embedder_pb2.DESCRIPTOR.services_by_name["Embedder"]
    assert service.full_name == "embedserve.v1.Embedder"
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
    assert hasattr(embedder_pb2_grpc, "EmbedderStub")
