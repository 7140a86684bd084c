"""The in-memory row store against a dict model: dense rows, fresh ids per version, lookups by key and id."""

from __future__ import annotations

import numpy as np

from service.index.rows import RowStore


def check_consistent(rows: RowStore, model: dict[str, tuple[np.ndarray, dict[str, str]]]) -> None:
    assert rows.count == len(model) == len(rows.keys) == len(rows.attributes)
    assert sorted(rows.keys) == sorted(model)
    for row, key in enumerate(rows.keys):
        vector, attrs = model[key]
        assert rows.row_of_key[key] == row and rows.row_of_id[int(rows.ids[row])] == row
        assert rows.vectors[row].tobytes() == vector.tobytes() and rows.attributes[row] == attrs
    assert len(rows.row_of_id) == rows.count and len(set(rows.live_ids.tolist())) == rows.count


def test_random_writes_match_a_dict_model() -> None:
    rng = np.random.default_rng(0)
    rows = RowStore(3)
    model: dict[str, tuple[np.ndarray, dict[str, str]]] = {}
    seen_ids: set[int] = set()
    for step in range(200):
        if rng.random() < 0.6:
            keys = [f"k{int(i)}" for i in rng.choice(60, size=int(rng.integers(1, 8)), replace=False)]
            vectors = rng.normal(size=(len(keys), 3)).astype(np.float32)
            attrs = [{"step": str(step)} for _ in keys]
            version = rows.version
            new_ids = rows.upsert(keys, vectors, attrs)
            assert rows.version > version and not seen_ids & set(new_ids.tolist())  # never reused
            seen_ids |= set(new_ids.tolist())
            for key, vector, a in zip(keys, vectors, attrs, strict=True):
                model[key] = (vector, a)
        else:
            keys = [f"k{int(i)}" for i in rng.integers(0, 60, size=4)] + ["never"]
            existed = len({k for k in keys if k in model})
            assert rows.delete(list(dict.fromkeys(keys))) == existed
            for key in keys:
                model.pop(key, None)
        check_consistent(rows, model)
    assert rows.next_id == len(seen_ids)
    found = rows.rows_of_ids(np.array([[int(rows.ids[0]), -5], [10**9, int(rows.ids[rows.count - 1])]]))
    assert found.tolist() == [[0, -1], [-1, rows.count - 1]]


def test_capacity_grows_and_arrays_copy_over() -> None:
    rows = RowStore(2)
    vectors = np.arange(5000, dtype=np.float32).reshape(2500, 2)
    for start in range(0, 2500, 700):
        rows.upsert(
            [f"k{i}" for i in range(start, min(start + 700, 2500))],
            vectors[start : start + 700],
            [{}] * len(vectors[start : start + 700]),
        )
    assert rows.count == 2500 and rows.vectors.shape[0] >= 2500
    assert rows.live_vectors.tobytes() == vectors.tobytes() and rows.live_ids.tolist() == list(range(2500))


def test_from_arrays() -> None:
    rows = RowStore.from_arrays(
        vectors=np.eye(3, dtype=np.float32),
        ids=np.array([4, 9, 2]),
        keys=["a", "b", "c"],
        attributes=[{}, {"x": "1"}, {}],
        next_id=10,
    )
    assert rows.row_of_key == {"a": 0, "b": 1, "c": 2} and rows.row_of_id == {4: 0, 9: 1, 2: 2}
    assert rows.next_id == 10 and rows.attributes[1] == {"x": "1"}
    assert rows.upsert(["b"], np.ones((1, 3), np.float32), [{}]).tolist() == [10]
