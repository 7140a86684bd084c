"""Server reflection over `grpc.reflection.v1` and `grpc.reflection.v1alpha`, both answering the same way.

    enable_reflection(service_names, grpc_server)    # registers both; the names are what `list_services` reports

grpcio-reflection (1.85) ships only v1alpha (grpc/grpc#38576), while current clients (grpcurl, Postman, grpc-java)
ask v1 first. The two protocols differ only in their package: `grpc/reflection/v1/reflection.proto` declares the
messages of v1alpha, field for field, under `grpc.reflection.v1`. So the v1 file descriptor is derived from v1alpha's
(package and type names rewritten, the deprecation option dropped) and added to protobuf's default pool, where
reflection can describe it like any other service, and the v1 method is served by v1alpha's servicer: its messages
serialize to the bytes a v1 client reads.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

__all__ = [
    "SERVICE_NAMES",
    "V1ALPHA_SERVICE_NAME",
    "V1_DESCRIPTOR",
    "V1_SERVICE_NAME",
    "enable_reflection",
    "v1_file_descriptor",
]

V1ALPHA_SERVICE_NAME: str = v1alpha.SERVICE_NAME
"""`grpc.reflection.v1alpha.ServerReflection`."""

V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
"""`grpc.reflection.v1.ServerReflection`."""

SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)
"""Both reflection services, newest first."""

_METHOD = "ServerReflectionInfo"


def v1_file_descriptor(pool: descriptor_pool.DescriptorPool | None = None) -> descriptor.FileDescriptor:
    """The `grpc/reflection/v1/reflection.proto` descriptor in `pool` (the default one), added on the first call."""
    pool = pool if pool is not None else descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    v1alpha_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix, new_prefix = f".{proto.package}.", f".{V1_PACKAGE}."
    proto.name, proto.package = V1_FILE, V1_PACKAGE
    proto.ClearField("options")  # v1alpha's java/go package names and its `deprecated = true`

    def rename(type_name: str) -> str:
        return new_prefix + type_name.removeprefix(old_prefix) if type_name.startswith(old_prefix) else type_name

    messages = list(proto.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type, method.output_type = rename(method.input_type), rename(method.output_type)
    pool.Add(proto)
    return pool.FindFileByName(V1_FILE)


V1_DESCRIPTOR = v1_file_descriptor()
"""The v1 file descriptor, in the default pool from this module's import on (as a generated `_pb2` module's is)."""


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection on `server` under v1 and v1alpha; `service_names` should include `SERVICE_NAMES`."""
    servicer = v1alpha.aio.ReflectionServicer(sorted(set(service_names)))
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    for name in SERVICE_NAMES:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, {_METHOD: handler}),))
