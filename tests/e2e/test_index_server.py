"""The index through a real server: Embed(store), Neighbors by key, vector and image, collections, CLI, metrics."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pyarrow.parquet as pq
import pytest

from service.cli.main import main
from service.client import EmbedClient, NeighborQuery, RemoteError
from service.jobs.embed_dir import schema_for

COLLECTION = "oct"


def label_of(key: str) -> str:
    return key.split("/", maxsplit=1)[0]


def store_sample(client: EmbedClient, oct_images: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    returned: dict[str, np.ndarray] = {}
    for start in range(0, len(oct_images), 8):
        batch = [
            (key, data, {"label": label_of(key), "path": f"/data/{key}"}) for key, data in oct_images[start : start + 8]
        ]
        for result in client.embed(batch, store=True, collection=COLLECTION):
            assert result.ok and result.vector is not None
            returned[result.key] = result.vector
    return returned


def test_store_then_neighbors_by_key_vector_and_image(start_server, oct_images, reference) -> None:
    server = start_server()
    with EmbedClient(server.target) as client:
        returned = store_sample(client, oct_images)
        info = client.collection_info(COLLECTION)
        assert (info.count, info.dim, info.metric, info.index_type, info.trained) == (32, 1280, "cosine", "flat", True)
        assert info.bytes_on_disk > 32 * 1280 * 4
        assert [c.name for c in client.list_collections()] == [COLLECTION]

        # Stored bit for bit as returned (and as the offline engine computes them).
        items = client.fetch_items(collection=COLLECTION)
        assert items.keys == sorted(returned)
        for key, vector, attributes in zip(items.keys, items.vectors, items.attributes, strict=True):
            assert vector.tobytes() == returned[key].tobytes()
            assert attributes == {"label": label_of(key), "path": f"/data/{key}"}
            np.testing.assert_allclose(vector, reference[key], atol=1e-5)

        # Leave-one-out kNN over the real scans: each scan's neighbours, itself excluded, vote for its class.
        keys = sorted(returned)
        results = client.neighbors([NeighborQuery(key=k) for k in keys], k=5, collection=COLLECTION, exclude_self=True)
        correct_1nn = correct_vote = 0
        for key, result in zip(keys, results, strict=True):
            assert result.ok and len(result.neighbors) == 5 and key not in [n.key for n in result.neighbors]
            scores = [n.score for n in result.neighbors]
            assert scores == sorted(scores, reverse=True)
            labels = [n.attributes["label"] for n in result.neighbors]
            correct_1nn += labels[0] == label_of(key)
            correct_vote += Counter(labels).most_common(1)[0][0] == label_of(key)
        accuracy_1nn, accuracy_5nn = correct_1nn / len(keys), correct_vote / len(keys)
        print(f"leave-one-out kNN on {len(keys)} OCT scans: 1-NN {accuracy_1nn:.3f}, 5-NN vote {accuracy_5nn:.3f}")
        assert accuracy_1nn > 0.25 + 0.15 and accuracy_5nn > 0.25 + 0.15  # chance is 0.25 (4 balanced classes)

        # By vector and by image: the scan itself comes first with cosine ~1; a filter keeps one class.
        key, data = oct_images[3]
        by_vector, by_image, missing = client.neighbors(
            [NeighborQuery(vector=returned[key]), NeighborQuery(image=data), NeighborQuery(key="no/such.jpeg")],
            k=3,
            collection=COLLECTION,
        )
        assert by_vector.neighbors[0].key == key and by_vector.neighbors[0].score == pytest.approx(1.0, abs=1e-5)
        assert by_image.neighbors[0].key == key and by_image.neighbors[0].score == pytest.approx(1.0, abs=1e-4)
        assert missing.error is not None and missing.error.reason == "key_not_found" and missing.error.code == 5
        dme = client.neighbors([NeighborQuery(key=key)], k=10, collection=COLLECTION, filter="label == DME")[0]
        assert len(dme.neighbors) == 8 and {n.attributes["label"] for n in dme.neighbors} == {"DME"}
        bad_image = client.neighbors([NeighborQuery(image=b"not an image")], collection=COLLECTION)[0]
        assert bad_image.error is not None and bad_image.error.reason == "invalid_image"

        # Deletes are durable and searches stop returning the items.
        assert client.delete_items([key, "never-stored"], collection=COLLECTION) == 1
        assert client.collection_info(COLLECTION).count == 31
        hits = client.neighbors([NeighborQuery(vector=returned[key])], k=31, collection=COLLECTION)[0]
        assert key not in {n.key for n in hits.neighbors} and len(hits.neighbors) == 31

        assert server.sample("embedserve_index_vectors", {"collection": COLLECTION}) == 31
        assert server.sample("embedserve_wal_fsync_duration_seconds_count") >= 5
        assert server.sample("embedserve_index_search_duration_seconds_count") == 4
        assert server.sample("embedserve_stage_duration_seconds_count", {"stage": "index"}) == 4


def test_collection_management_and_errors(start_server) -> None:
    server = start_server()
    with EmbedClient(server.target) as client:
        created = client.create_collection("small", dim=4, metric="l2")
        assert (created.dim, created.metric, created.count) == (4, "l2", 0)
        assert client.create_collection("model").dim == 1280  # dim 0: the model's
        cases = [
            (lambda: client.create_collection("small", dim=4), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: client.create_collection("bad name", dim=4), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: client.collection_info("nope"), grpc.StatusCode.NOT_FOUND),
            (lambda: client.neighbors([NeighborQuery(key="x")], collection="nope"), grpc.StatusCode.NOT_FOUND),
            (
                lambda: client.neighbors([NeighborQuery(vector=np.zeros(3, np.float32))], collection="small"),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (
                lambda: client.neighbors([NeighborQuery(key="x")], collection="small", filter="label =="),
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (lambda: client.fetch_items(collection="small", keys=["x"]), grpc.StatusCode.NOT_FOUND),
        ]
        for call, code in cases:
            with pytest.raises(RemoteError) as error:
                call()
            assert error.value.code == code, error.value
        empty = client.neighbors([NeighborQuery(vector=np.ones(4, np.float32))], collection="small")[0]
        assert empty.ok and empty.neighbors == []
        client.drop_collection("small")
        assert [c.name for c in client.list_collections()] == ["model"]
        with pytest.raises(RemoteError) as error:
            client.drop_collection("small")
        assert error.value.code == grpc.StatusCode.NOT_FOUND


def test_cli_neighbors_and_export(start_server, oct_images, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server = start_server()
    with EmbedClient(server.target) as client:
        returned = store_sample(client, oct_images)
    key = oct_images[0][0]
    assert main(["neighbors", "--server", server.target, "--key", key, "-k", "4", "--collection", COLLECTION]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["rank", "score", "key", "label", "attributes"] and len(table) == 5
    assert key not in capsys.readouterr().out
    image = tmp_path / "query.jpeg"
    image.write_bytes(oct_images[0][1])
    assert (
        main(["neighbors", "--server", server.target, "--image", str(image), "-k", "1", "--collection", COLLECTION])
        == 0
    )
    assert capsys.readouterr().out.splitlines()[1].split()[2] == key

    out = tmp_path / "oct.parquet"
    assert main(["export", "--server", server.target, "--collection", COLLECTION, "--out", str(out)]) == 0
    table = pq.read_table(out)
    with EmbedClient(server.target) as client:
        expected = schema_for(client.model_info())
        # Parquet renames the list's element field; everything else is the embed job's schema.
        assert table.schema.metadata == expected.metadata and table.schema.names == expected.names
        assert table.cast(expected).schema.equals(expected)
    assert table.column("key").to_pylist() == sorted(returned)
    assert table.column("label").to_pylist() == [label_of(k) for k in sorted(returned)]
    assert table.column("path").to_pylist() == [f"/data/{k}" for k in sorted(returned)]
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    assert vectors.tobytes() == np.stack([returned[k] for k in sorted(returned)]).tobytes()
