"""Incremental catalog refresh: no change does nothing, deltas only, removals leave the index, the lock."""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks.core.heldout import heldout_mask
from tasks.core.registry import Registry
from tasks.core.store import Store
from tasks.text.refresh import RefreshLockedError, diff_snapshot, refresh_lock

# the catalogs below name the shipped sample's images by absolute path, outside the catalog's folder:
# a refresh reads them only from the image root it is given
IMAGES = Path(__file__).resolve().parents[1] / "data" / "fashion-sample" / "images"


def _write_catalog(rows, path):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture()
def catalog(tmp_path, fashion_sample):
    """120 products of the shipped fashion sample, images referenced by absolute path (in IMAGES)."""
    with (fashion_sample / "styles.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:120]
    for row in rows:
        row["image"] = str(fashion_sample / "images" / row["image"])
    return rows


@pytest.fixture()
def local_catalog(tmp_path, catalog):
    """The same products with their images copied next to the catalog and named by relative path:
    read with no image root (a base-model version's card records none, so a search of it has none)."""
    (tmp_path / "images").mkdir()
    rows = [dict(r) for r in catalog]
    for row in rows:
        image = Path(row["image"])
        shutil.copyfile(image, tmp_path / "images" / image.name)
        row["image"] = image.name
    return rows


def _refresh(catalog_path, workspace, model, *extra, image_root=IMAGES):
    return main(
        [
            "refresh",
            "--catalog",
            str(catalog_path),
            "--workspace",
            str(workspace),
            "--base-model",
            str(model),
            "--train-max-steps",
            "2",
            "--train-batch-size",
            "4",
            "--max-seq-length",
            "32",
            "--heldout-fraction",
            "0.2",
            "--qgen-consistency-top-k",
            "30",
            *(["--image-root", str(image_root)] if image_root else []),
            *extra,
        ]
    )


def _last_report(workspace):
    return json.loads(sorted((workspace / "reports").glob("catalog-refresh-*.json"))[-1].read_text())


def test_diff_and_heldout_are_by_content_and_fixed():
    docs = pd.DataFrame({"doc_id": ["a", "b", "c"], "content_hash": ["1", "2", "3"]})
    diff = diff_snapshot({"a": "1", "b": "x", "z": "9"}, docs)
    assert diff == {"new": ["c"], "changed": ["b"], "removed": ["z"], "unchanged": ["a"]}
    ids = list(map(str, range(1000)))
    chosen = [d for d, held in zip(ids, heldout_mask(ids, 0.1), strict=True) if held]
    assert 60 < len(chosen) < 140 and chosen == [
        d for d, held in zip(ids, heldout_mask(ids, 0.1), strict=True) if held
    ]


@pytest.mark.slow
def test_refresh_runs_incrementally(prefect_harness, tmp_path, local_catalog, tiny_bi_encoder, capsys):
    catalog, workspace = local_catalog, tmp_path / "ws"
    path = _write_catalog(catalog, tmp_path / "styles.csv")
    assert _refresh(path, workspace, tiny_bi_encoder, image_root=None) == 0
    first = _last_report(workspace)
    assert first["changes"]["new"] == 120 and first["trained"]
    registry = Registry(workspace)
    serving = registry.current("catalog-text")
    assert serving is not None
    store = Store(workspace)
    query_stages = set(store.keys("queries"))

    # no change: no model work, nothing new in the store
    capsys.readouterr()
    assert _refresh(path, workspace, tiny_bi_encoder, image_root=None) == 0
    assert "no change since the last refresh" in capsys.readouterr().out
    assert set(store.keys("queries")) == query_stages and registry.current("catalog-text") == serving
    assert len(list((workspace / "reports").glob("catalog-refresh-*.json"))) == 1

    # 3 new, 2 changed, 2 removed products
    edited = [dict(row) for row in catalog[2:]]
    edited[0]["productDisplayName"] += " limited edition"
    edited[1]["baseColour"] = "Magenta"
    for n in range(3):
        extra = dict(catalog[10 + n])
        extra["id"] = f"9000{n}"
        extra["productDisplayName"] = f"Brand new aurora parka {n}"
        edited.append(extra)
    path = _write_catalog(edited, tmp_path / "styles.csv")
    time.sleep(1.1)  # report names carry the second
    assert _refresh(path, workspace, tiny_bi_encoder, image_root=None) == 0
    third = _last_report(workspace)
    assert third["changes"] == {"new": 3, "changed": 2, "removed": 2, "unchanged": 116}
    assert third["recomputed_unchanged"] == 0 and third["queries_generated_for"] == 5
    # the serving model's index embeddings are reused: only new and changed products are encoded
    assert third["unchanged_first_encoded"] == 0 and third["encoded"] == 5
    new_stage = (set(store.keys("queries")) - query_stages).pop()
    generated_for = set(store.read_pandas("queries", new_stage)["doc_id"])
    assert generated_for <= {"90000", "90001", "90002", edited[0]["id"], edited[1]["id"]}

    # the serving index follows the catalog: removed products gone, new ones searchable
    serving = registry.current("catalog-text")
    indexed = set(
        pq.read_table(registry.path("catalog-text", serving) / "index" / "docs.parquet")
        .column("doc_id")
        .to_pylist()
    )
    assert catalog[0]["id"] not in indexed and catalog[1]["id"] not in indexed
    assert {"90000", "90001", "90002"} <= indexed and len(indexed) == 121
    capsys.readouterr()
    assert (
        main(
            [
                "search",
                "Brand new aurora parka 1",
                "--model-name",
                "catalog-text",
                "--workspace",
                str(workspace),
                "--json",
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert "90001" in [h["doc_id"] for h in hits]


def test_a_second_refresh_waits_for_the_lock_then_fails_cleanly(tmp_path):
    folder = tmp_path / "refresh"
    held = threading.Event()
    release = threading.Event()

    def holder():
        with refresh_lock(folder, timeout=5):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    start = time.monotonic()
    with pytest.raises(RefreshLockedError, match="another refresh"):
        with refresh_lock(folder, timeout=1):
            pass
    assert time.monotonic() - start >= 1  # it waited
    threading.Timer(0.5, release.set).start()
    with refresh_lock(folder, timeout=10):  # and gets it once the first run ends
        pass
    thread.join()


def test_refresh_refuses_bad_catalog_rows(tmp_path, catalog, capsys):
    rows = [dict(r) for r in catalog[:3]]
    rows[2]["id"] = rows[0]["id"]
    path = _write_catalog(rows, tmp_path / "dup.csv")
    assert main(["refresh", "--catalog", str(path), "--workspace", str(tmp_path / "ws")]) == 2
    out = capsys.readouterr().err
    assert "dup.csv" in out and "duplicate product id" in out


@pytest.mark.slow
def test_a_crash_before_promotion_leaves_the_previous_model_serving(
    prefect_harness, tmp_path, catalog, tiny_bi_encoder, monkeypatch
):
    workspace = tmp_path / "ws"
    path = _write_catalog(catalog[:60], tmp_path / "styles.csv")
    assert _refresh(path, workspace, tiny_bi_encoder) == 0
    registry = Registry(workspace)
    serving = registry.current("catalog-text")
    state_file = workspace / "refresh" / "catalog-text" / "state.json"
    state = state_file.read_text()

    _write_catalog(catalog[:70], path)  # 10 new products

    def crash(*args, **kwargs):
        raise RuntimeError("power cut between training and promotion")

    monkeypatch.setattr(Registry, "promote_if_better", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        _refresh(path, workspace, tiny_bi_encoder)
    assert registry.current("catalog-text") == serving  # the previous version still serves
    assert state_file.read_text() == state  # the snapshot was not advanced
    store = Store(workspace)
    stages_after_crash = {stage: set(store.keys(stage)) for stage in ("queries", "negatives", "labels")}

    monkeypatch.undo()
    assert _refresh(path, workspace, tiny_bi_encoder) == 0
    report = _last_report(workspace)
    assert report["changes"]["new"] == 10
    # the rerun redid the same delta from the store: no new query, negative or label stage
    assert {stage: set(store.keys(stage)) for stage in stages_after_crash} == stages_after_crash
    assert json.loads(state_file.read_text())["runs"] == 2


@pytest.mark.slow
def test_a_refresh_adapts_only_the_query_side_and_keeps_the_catalog_embeddings(
    prefect_harness, tmp_path, catalog, tiny_bi_encoder
):
    from tasks.core.embeddings import text_hash
    from tasks.serving.search import Searcher

    workspace = tmp_path / "ws"
    path = _write_catalog(catalog[:60], tmp_path / "styles.csv")
    assert _refresh(path, workspace, tiny_bi_encoder) == 0
    registry = Registry(workspace)
    adapted = [
        v for v in registry.versions("catalog-text") if registry.card("catalog-text", v).get("labels_key")
    ]
    assert adapted, "the full run registers its trained model"
    registry.promote("catalog-text", adapted[-1], reason="test: serve the adapted model")
    full_model = registry.path("catalog-text", adapted[-1])
    caches = set((workspace / "cache" / "embeddings").iterdir())

    rows = [dict(r) for r in catalog[:70]]  # 10 new products, 1 changed
    rows[5]["productDisplayName"] += " limited edition"
    _write_catalog(rows, path)
    assert _refresh(path, workspace, tiny_bi_encoder, "--full-retrain-share", "0.5") == 0  # 11 of 70 changed
    report = _last_report(workspace)
    assert report["trained"] and report["train"]["towers"] == "query"
    card = registry.card("catalog-text", report["version"])
    assert card["towers"] == "query" and card["document_model"] == str(full_model)
    # the new model encoded held-out queries only: no catalog text went through it
    new_caches = set((workspace / "cache" / "embeddings").iterdir()) - caches
    assert len(new_caches) == 1
    encoded = {
        h
        for part in new_caches.pop().glob("part-*.parquet")
        for h in pq.read_table(part).column("text_hash").to_pylist()
    }
    from tasks.core.products import read_products

    catalog_hashes = {text_hash(t) for t in read_products(path, image_root=IMAGES).texts()}
    assert encoded and not encoded & catalog_hashes

    # served, it searches the document encoder's embeddings with its own query encoder
    registry.promote("catalog-text", report["version"], reason="test: serve the query-side model")
    searcher = Searcher(workspace, "catalog-text")
    assert searcher.document_model is not searcher.model
    products = read_products(path, image_root=IMAGES)
    text = products.texts()[products.ids.index(searcher.docs[0]["doc_id"])]
    stored = searcher.index.reconstruct(0)
    assert stored @ searcher.encode_documents([text])[0] > 0.999
    assert not abs(stored @ searcher.encode([text])[0] - 1) < 1e-6  # queries go through the adapted side
    assert rows[65]["id"] in [h.doc_id for h in searcher.search(rows[65]["productDisplayName"], k=5)]

    # once the catalog has drifted past the share, a refresh trains both towers again
    rows += [
        dict(r, id=f"8000{n}", productDisplayName=f"Spring linen shirt {n}")
        for n, r in enumerate(catalog[80:90])
    ]
    _write_catalog(rows, path)
    time.sleep(1.1)
    assert _refresh(path, workspace, tiny_bi_encoder, "--full-retrain-share", "0.25") == 0  # 21 of 80 since
    assert _last_report(workspace)["train"]["towers"] == "both"
