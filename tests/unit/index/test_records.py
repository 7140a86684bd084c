"""Log record payloads, with no data directory: round trips, the documented byte layout, corrupt input refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from service.index import records

KEYS = ["plain.jpeg", "Ωμέγα/画像.jpeg", "emoji-🙂", 'quote"and\\backslash', "a" * 4096]


def reference_upsert(keys: list[str], vectors: np.ndarray, attributes: list[dict[str, str]]) -> bytes:
    """The upsert layout of the module docstring, written independently (what data directories already hold)."""
    meta = json.dumps({"keys": keys, "attributes": attributes}, separators=(",", ":")).encode()
    return b"U" + struct.pack("<I", len(meta)) + meta + vectors.astype("<f4").tobytes()


@pytest.mark.parametrize("dim", [1, 3, 1280])
def test_upsert_round_trip(dim: int) -> None:
    rng = np.random.default_rng(dim)
    vectors = rng.normal(size=(len(KEYS), dim)).astype(np.float32)
    attributes = [{"label": "CNV", "ключ": "значение"}, {}, {"": ""}, {"a": "1", "b": "2"}, {}]
    payload = records.encode_upsert(KEYS, vectors, attributes)
    assert payload == reference_upsert(KEYS, vectors, attributes)
    decoded = records.decode(payload, dim)
    assert isinstance(decoded, records.UpsertRecord)
    assert decoded.keys == KEYS and decoded.attributes == attributes
    assert decoded.vectors.dtype == np.float32 and decoded.vectors.tobytes() == vectors.tobytes()


def test_upsert_of_no_items_and_empty_attributes() -> None:
    payload = records.encode_upsert([], np.zeros((0, 4), np.float32), [])
    decoded = records.decode(payload, 4)
    assert isinstance(decoded, records.UpsertRecord) and decoded.keys == [] and decoded.vectors.shape == (0, 4)
    one = records.decode(records.encode_upsert(["k"], np.ones((1, 2), np.float32), [{}]), 2)
    assert isinstance(one, records.UpsertRecord) and one.attributes == [{}]


def test_delete_round_trip() -> None:
    payload = records.encode_delete(KEYS)
    assert payload == b"D" + json.dumps(KEYS, separators=(",", ":")).encode()
    assert records.decode(payload, 7) == records.DeleteRecord(keys=KEYS)
    assert records.decode(records.encode_delete([]), 7) == records.DeleteRecord(keys=[])


def test_encode_refuses_what_it_cannot_write() -> None:
    with pytest.raises(ValueError, match="float32"):
        records.encode_upsert(["a"], np.zeros((1, 2), np.float64), [{}])
    with pytest.raises(ValueError, match="2-d"):
        records.encode_upsert(["a"], np.zeros(2, np.float32), [{}])
    with pytest.raises(ValueError, match="do not match"):
        records.encode_upsert(["a", "b"], np.zeros((2, 2), np.float32), [{}])


def _upsert_with_meta(meta: bytes, vector_bytes: bytes = b"") -> bytes:
    return b"U" + struct.pack("<I", len(meta)) + meta + vector_bytes


GOOD = records.encode_upsert(["a", "b"], np.ones((2, 3), np.float32), [{}, {"x": "y"}])
CORRUPT = {
    "empty": (b"", "unknown log record type b''"),
    "unknown type": (b"X[]", "unknown log record type b'X'"),
    "short header": (b"U\x01\x00", "shorter than its header"),
    "meta past the end": (b"U" + struct.pack("<I", 1000) + b"{}", "announces 1000 bytes of keys, 2 present"),
    "meta not json": (_upsert_with_meta(b"{keys"), "not JSON"),
    "meta not utf-8": (_upsert_with_meta(b'{"keys":["\xff"]}'), "not JSON"),
    "meta a list": (_upsert_with_meta(b"[]"), "expected {'keys'"),
    "keys not strings": (_upsert_with_meta(b'{"keys":[1],"attributes":[{}]}', b"\0" * 12), "expected {'keys'"),
    "attribute values not strings": (
        _upsert_with_meta(b'{"keys":["a"],"attributes":[{"n":1}]}', b"\0" * 12),
        "expected {'keys'",
    ),
    "attributes missing": (_upsert_with_meta(b'{"keys":["a"]}', b"\0" * 12), "expected {'keys'"),
    "attribute count": (
        _upsert_with_meta(b'{"keys":["a"],"attributes":[{},{}]}', b"\0" * 12),
        "1 keys, 2 attribute maps",
    ),
    "vectors cut short": (GOOD[:-1], "23 vector bytes (expected 24 for 3-d vectors)"),
    "vectors too long": (GOOD + b"\0" * 4, "28 vector bytes (expected 24"),
    "delete not json": (b'D["a"', "delete record: the key list is not JSON"),
    "delete not a list": (b'D{"a":1}', "not a list of strings"),
    "delete of numbers": (b"D[1,2]", "not a list of strings"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_corrupt_payloads_are_refused(name: str) -> None:
    payload, message = CORRUPT[name]
    with pytest.raises(records.CorruptRecordError) as error:
        records.decode(payload, 3)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_a_record_read_with_the_wrong_dimension_is_refused() -> None:
    with pytest.raises(records.CorruptRecordError, match="expected 16 for 2-d"):
        records.decode(GOOD, 2)  # 2 keys x 3-d = 24 bytes, not 2 x 2-d
