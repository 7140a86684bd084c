"""The payloads of a collection's log records: pure functions between records and bytes, no file I/O.

An upsert record is

    b"U"   1 byte
    length u32 little-endian   bytes of the JSON below
    JSON   {"keys": [...], "attributes": [{...}, ...]} (compact separators, ASCII)
    vectors len(keys) * dim float32, native (little-endian) order, row-major

and a delete record is `b"D"` followed by the JSON list of keys. The log (`service.index.wal`) frames and
checksums each payload; decoding one that passed the checksum and still does not parse raises `CorruptRecordError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

OP_UPSERT = b"U"
OP_DELETE = b"D"
_U32 = struct.Struct("<I")


class CorruptRecordError(ValueError):
    """A log payload that is not a well-formed upsert or delete record."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UpsertRecord:
    """Insert or replace `keys` with `vectors` (float32, one row per key) and `attributes`."""

    keys: list[str]
    vectors: np.ndarray
    attributes: list[dict[str, str]]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeleteRecord:
    """Delete the items with `keys` (unknown keys are ignored when applied)."""

    keys: list[str]


Record = UpsertRecord | DeleteRecord


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode_upsert(keys: Sequence[str], vectors: np.ndarray, attributes: Sequence[Mapping[str, str]]) -> bytes:
    """The payload of an upsert record. `vectors` must be float32 of shape (len(keys), dim)."""
    if vectors.dtype != np.float32 or vectors.ndim != 2:
        raise ValueError(f"an upsert record holds 2-d float32 vectors, not {vectors.dtype} of shape {vectors.shape}")
    if not len(keys) == len(vectors) == len(attributes):
        raise ValueError(f"{len(keys)} keys, {len(vectors)} vectors and {len(attributes)} attribute maps do not match")
    meta = _json({"keys": list(keys), "attributes": [dict(a) for a in attributes]})
    return b"".join((OP_UPSERT, _U32.pack(len(meta)), meta, np.ascontiguousarray(vectors).tobytes()))


def encode_delete(keys: Sequence[str]) -> bytes:
    """The payload of a delete record."""
    return OP_DELETE + _json(list(keys))


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _is_attribute_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(item, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in item.items())
        for item in value
    )


def decode(payload: bytes, dim: int) -> Record:
    """Parse one payload of a collection holding `dim`-d vectors. The vectors of an upsert are a read-only view
    into `payload`. Raises `CorruptRecordError` for anything that is not a well-formed record."""
    op = payload[:1]
    if op == OP_UPSERT:
        return _decode_upsert(payload, dim)
    if op == OP_DELETE:
        try:
            keys = json.loads(payload[1:])
        except ValueError as e:
            raise CorruptRecordError(f"delete record: the key list is not JSON ({e})") from e
        if not _is_str_list(keys):
            raise CorruptRecordError("delete record: the keys are not a list of strings")
        return DeleteRecord(keys=keys)
    raise CorruptRecordError(f"unknown log record type {op!r}")


def _decode_upsert(payload: bytes, dim: int) -> UpsertRecord:
    start = 1 + _U32.size
    if len(payload) < start:
        raise CorruptRecordError(f"upsert record of {len(payload)} bytes is shorter than its header")
    (meta_len,) = _U32.unpack_from(payload, 1)
    if start + meta_len > len(payload):
        raise CorruptRecordError(f"upsert record announces {meta_len} bytes of keys, {len(payload) - start} present")
    try:
        meta = json.loads(payload[start : start + meta_len])
    except ValueError as e:
        raise CorruptRecordError(f"upsert record: the keys and attributes are not JSON ({e})") from e
    if (
        not isinstance(meta, dict)
        or not _is_str_list(meta.get("keys"))
        or not _is_attribute_list(meta.get("attributes"))
    ):
        raise CorruptRecordError("upsert record: expected {'keys': [str], 'attributes': [{str: str}]}")
    keys, attributes = meta["keys"], meta["attributes"]
    vector_bytes = len(payload) - start - meta_len
    expected = len(keys) * dim * 4
    if len(attributes) != len(keys) or vector_bytes != expected:
        raise CorruptRecordError(
            f"upsert record: {len(keys)} keys, {len(attributes)} attribute maps and {vector_bytes} vector bytes "
            f"(expected {expected} for {dim}-d vectors)"
        )
    vectors = np.frombuffer(payload, dtype=np.float32, offset=start + meta_len).reshape(len(keys), dim)
    return UpsertRecord(keys=keys, vectors=vectors, attributes=attributes)
