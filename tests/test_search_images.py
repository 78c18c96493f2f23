"""adapt search --images: text queries against product images with a registered catalog encoder."""

from __future__ import annotations

import csv
import json

import numpy as np

from flows.cli import main
from tasks.core.products import read_catalog
from tasks.core.registry import Registry
from tasks.serving.search import ImageSearcher


def test_image_search_over_the_catalog(tmp_path, fashion_sample, tiny_bi_encoder, capsys):
    from tasks.catalog.encoders import new_lit_encoder

    with (fashion_sample / "styles.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:60]
    images = fashion_sample / "images"  # outside the catalog's folder: named as the image root
    for row in rows:
        row["image"] = str(images / row["image"])
    catalog = tmp_path / "styles.csv"
    with catalog.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    workspace = tmp_path / "ws"
    assert main(["search", "red shirt", "--images", "--workspace", str(workspace)]) == 2
    assert "run `adapt clip" in capsys.readouterr().err

    encoder = new_lit_encoder(str(tiny_bi_encoder), seed=1)
    saved = encoder.save(tmp_path / "encoder")
    registry = Registry(workspace)
    card = {"data": str(catalog), "base_model": "tiny", "config": {"image_root": str(images)}}
    version = registry.register("catalog-clip", saved, card)
    registry.promote("catalog-clip", version)

    assert (
        main(
            [
                "search",
                "men black track pants",
                "--images",
                "--top-k",
                "5",
                "--json",
                "--workspace",
                str(workspace),
            ]
        )
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    products = read_catalog(catalog, image_root=images)
    assert len(hits) == 5 and {h["doc_id"] for h in hits} <= set(products.ids)
    # the ranking is the encoder's own: text vector against every image vector
    scores = (
        encoder.encode_images(products.docs["image"].tolist())
        @ encoder.encode_text(["men black track pants"])[0]
    )
    expected = [products.ids[i] for i in np.argsort(-scores)[:5]]
    assert [h["doc_id"] for h in hits] == expected
    assert all(h["snippet"].endswith(".jpg") for h in hits)  # the image path

    # a changed catalog (fewer products) rebuilds the index on the next search
    with catalog.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:20])
    searcher = ImageSearcher(workspace)
    assert searcher.index.ntotal == 20
    assert {h.doc_id for h in searcher.search("a shirt", k=30)} == {r["id"] for r in rows[:20]}
