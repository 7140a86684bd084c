"""Blocking client of `embedserve.v1.Clusterer` (Cluster, Probe, Filter) over the generated stubs."""

from __future__ import annotations

from typing import Any

import grpc

from service.client.sync import RemoteError, auth_metadata, open_channel
from service.wire._proto.embedserve.v1 import cluster_pb2 as cpb
from service.wire._proto.embedserve.v1 import cluster_pb2_grpc as cpb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Responses carry one entry per item (and a projection with details): allow large ones."""


class ClusterClient:
    """`ClusterClient("host:port", token=...)`; each call raises RemoteError with the server's status."""

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = 600.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.channel = open_channel(
            target, tls=tls, root_certificates=root_certificates, max_message_bytes=max_message_bytes
        )
        self.stub = cpb_grpc.ClustererStub(self.channel)
        self.metadata = auth_metadata(token)
        self.timeout = timeout

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
            details = e.details() if hasattr(e, "details") else str(e)
            raise RemoteError(code, details or "") from e

    def cluster(self, request: cpb.ClusterRequest, *, timeout: float | None = None) -> cpb.ClusterResponse:
        response: cpb.ClusterResponse = self._call(self.stub.Cluster, request, timeout)
        return response

    def probe(self, request: cpb.ProbeRequest, *, timeout: float | None = None) -> cpb.ProbeResponse:
        response: cpb.ProbeResponse = self._call(self.stub.Probe, request, timeout)
        return response

    def filter(self, request: cpb.FilterRequest, *, timeout: float | None = None) -> cpb.FilterResponse:
        response: cpb.FilterResponse = self._call(self.stub.Filter, request, timeout)
        return response

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> ClusterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
