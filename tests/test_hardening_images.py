"""A catalog's image paths stay inside the catalog's folder or the image root the user names."""

from __future__ import annotations

import csv
import shutil

import pytest

from tasks.catalog.pairs import pairs_stage
from tasks.core.corpus import DataError
from tasks.core.products import read_catalog, read_products


def _catalog(tmp_path, fashion_sample):
    """styles.csv in tmp_path/cat: good rows at lines 2 and 6, and three that point outside the folder:
    a ../ escape (line 3), an absolute path (line 4), a symbolic link inside images/ (line 5)."""
    with (fashion_sample / "styles.csv").open() as handle:
        rows = list(csv.DictReader(handle))[:5]
    folder, outside = tmp_path / "cat", tmp_path / "outside"
    (folder / "images").mkdir(parents=True)
    outside.mkdir()
    for row in rows:
        shutil.copyfile(fashion_sample / "images" / row["image"], outside / row["image"])
    shutil.copyfile(fashion_sample / "images" / rows[0]["image"], folder / "images" / rows[0]["image"])
    shutil.copyfile(fashion_sample / "images" / rows[4]["image"], folder / "images" / rows[4]["image"])
    escape = "../" * (len(folder.resolve().parts) + 2) + "etc/passwd"  # a readable file, not an image
    rows[1]["image"] = escape
    rows[2]["image"] = str(outside / rows[2]["image"])
    (folder / "images" / "linked.jpg").symlink_to(outside / rows[3]["image"])
    rows[3]["image"] = "linked.jpg"
    rows[4]["image"] = str(folder / "images" / rows[4]["image"])  # absolute, but inside: fine
    path = folder / "styles.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path, [r["id"] for r in rows], outside, escape


def test_images_outside_the_catalog_folder_are_refused_with_their_lines(tmp_path, fashion_sample):
    path, ids, outside, escape = _catalog(tmp_path, fashion_sample)
    catalog = read_catalog(path, missing_image="skip")
    assert catalog.ids == [ids[0], ids[4]]
    refused = {s.line: s for s in catalog.skipped}
    assert sorted(refused) == [3, 4, 5]
    assert [refused[n].doc_id for n in (3, 4, 5)] == [ids[1], ids[2], ids[3]]
    for skipped in refused.values():
        assert "leaves the catalog's folder" in skipped.reason and skipped.file == str(path)
    assert escape in refused[3].reason and "/etc/passwd" in refused[3].reason
    assert f"(it is {outside.resolve()}/" in refused[5].reason  # the link's target is what was checked
    # every accepted image lies in the catalog's folder, links resolved
    assert all(image.startswith(str(path.parent.resolve())) for image in catalog.docs["image"])

    with pytest.raises(DataError, match=r"styles\.csv, line 3: image path '(\.\./)+etc/passwd' leaves"):
        read_catalog(path)


def test_the_image_root_the_user_names_is_allowed_too(tmp_path, fashion_sample):
    path, ids, outside, _ = _catalog(tmp_path, fashion_sample)
    catalog = read_catalog(path, image_root=outside, missing_image="skip")
    # names are looked up in the image root now: line 2's and line 4's images are there, line 6's
    # absolute path is in the catalog's folder; ../etc/passwd is refused still, linked.jpg is not there
    assert catalog.ids == [ids[0], ids[2], ids[4]]
    reasons = {s.line: s.reason for s in catalog.skipped}
    assert sorted(reasons) == [3, 5] and "leaves" in reasons[3] and "not found" in reasons[5]
    products = read_products(path, image_root=outside)
    assert products.ids == [ids[0], ids[2], ids[4]]
    assert read_products(path).ids == [ids[0], ids[4]]


def test_pairs_count_the_refused_images_as_left_out(tmp_path, fashion_sample):
    path, ids, _, _ = _catalog(tmp_path, fashion_sample)
    ref = pairs_stage(path, tmp_path / "ws", show_progress=False)
    assert ref.rows == 2
    left_out = {b["line"]: b for b in ref.bad}
    assert sorted(left_out) == [3, 4, 5] and all("leaves" in b["reason"] for b in left_out.values())
