import json

import pyarrow as pa
import pytest

from tasks.core.store import MANIFEST, IncompleteStageError, Store, chunked, stage_key


def table(values):
    return pa.table({"doc_id": [str(v) for v in values], "value": [float(v) for v in values]})


def test_stage_key_changes_with_every_ingredient():
    base = stage_key("queries", {"n": 3}, inputs=["c1"], models=["m1"])
    assert base == stage_key("queries", {"n": 3}, inputs=["c1"], models=["m1"])
    assert base == stage_key("queries", {"n": 3}.copy(), inputs=("c1",), models=("m1",))
    variants = {
        stage_key("labels", {"n": 3}, inputs=["c1"], models=["m1"]),
        stage_key("queries", {"n": 4}, inputs=["c1"], models=["m1"]),
        stage_key("queries", {"n": 3}, inputs=["c2"], models=["m1"]),
        stage_key("queries", {"n": 3}, inputs=["c1"], models=["m2"]),
    }
    assert base not in variants and len(variants) == 4
    assert stage_key("s", {"a": 1, "b": 2}) == stage_key("s", {"b": 2, "a": 1})


def test_write_commit_read_roundtrip(tmp_path):
    store = Store(tmp_path)
    writer = store.open("queries", "k1", config={"n": 2}, inputs=["corpus-key"], models=["fp"])
    for index, chunk in chunked(list(range(10)), 4):
        writer.write_part(index, table(chunk))
    ref = writer.commit(note="hello")
    assert store.is_complete("queries", "k1")
    assert store.read("queries", "k1").column("value").to_pylist() == [float(v) for v in range(10)]
    manifest = ref.manifest
    assert manifest["rows"] == 10 and manifest["parts"] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert (
        manifest["config"] == {"n": 2}
        and manifest["inputs"] == ["corpus-key"]
        and manifest["note"] == "hello"
    )
    assert manifest["schema"] == {"doc_id": "string", "value": "double"}
    assert manifest["timings"]["seconds"] >= 0
    assert store.keys("queries") == ["k1"]


def test_reader_refuses_missing_and_unfinished_stages(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(IncompleteStageError, match="does not exist"):
        store.read("labels", "nope")
    writer = store.open("labels", "k")
    writer.write_part(0, table([1, 2]))
    # crashed before commit: parts exist, manifest does not
    with pytest.raises(IncompleteStageError, match="started but not finished"):
        store.read("labels", "k")
    assert not store.is_complete("labels", "k")
    assert store.keys("labels") == []


def test_crash_resumes_at_last_complete_part_and_matches_uninterrupted_run(tmp_path):
    items = list(range(23))
    calls = []

    def run(store, crash_after=None):
        writer = store.open("stage", "key")
        for index, chunk in chunked(items, 5):
            if writer.has_part(index):
                continue
            if crash_after is not None and index == crash_after:
                raise RuntimeError("simulated crash")
            calls.append(index)
            writer.write_part(index, table([v * 2 for v in chunk]))
        return writer

    crashed = Store(tmp_path / "a")
    with pytest.raises(RuntimeError):
        run(crashed, crash_after=3)
    assert calls == [0, 1, 2]
    writer = run(crashed)
    assert writer.resumed_parts == 3
    assert calls == [0, 1, 2, 3, 4]  # only the unfinished parts were done again
    writer.commit()
    assert writer.path.joinpath(MANIFEST).is_file()
    clean = Store(tmp_path / "b")
    run(clean).commit()
    assert crashed.read("stage", "key").equals(clean.read("stage", "key"))
    assert json.loads((writer.path / MANIFEST).read_text())["timings"]["resumed_parts"] == 3


def test_commit_refuses_gaps_and_empty_stage_needs_schema(tmp_path):
    store = Store(tmp_path)
    writer = store.open("s", "gap")
    writer.write_part(0, table([1]))
    writer.write_part(2, table([3]))
    with pytest.raises(IncompleteStageError, match="not contiguous"):
        writer.commit()
    empty = store.open("s", "empty")
    with pytest.raises(IncompleteStageError, match="no parts"):
        empty.commit()
    empty.commit(empty_schema=table([]).schema)
    assert store.read("s", "empty").num_rows == 0
    assert store.read("s", "empty").schema.names == ["doc_id", "value"]


def test_complete_stage_is_not_reopened_and_part_writes_are_atomic(tmp_path, monkeypatch):
    store = Store(tmp_path)
    store.write_table("s", "k", table([1]))
    with pytest.raises(FileExistsError):
        store.open("s", "k")

    import pyarrow.parquet as pq

    writer = store.open("s", "k2")

    def broken_write(tbl, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken_write)
    with pytest.raises(OSError):
        writer.write_part(0, table([1, 2]))
    # neither the part nor a temporary file is left behind
    assert not writer.has_part(0)
    assert list(writer.path.iterdir()) == []


def test_side_files_are_only_served_from_complete_stages(tmp_path):
    store = Store(tmp_path)
    writer = store.open("index", "k")
    writer.write_file("vectors.bin", lambda p: p.write_bytes(b"1234"))
    with pytest.raises(IncompleteStageError):
        store.file("index", "k", "vectors.bin")
    writer.commit(empty_schema=table([]).schema)
    assert store.file("index", "k", "vectors.bin").read_bytes() == b"1234"
    with pytest.raises(IncompleteStageError, match="no file"):
        store.file("index", "k", "other.bin")
