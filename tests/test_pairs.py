import json
import shutil

import numpy as np
import pytest
from PIL import Image

from tasks.catalog.pairs import (
    DEFAULT_CAPTION_TEMPLATE,
    build_pairs,
    check_catalog_columns,
    load_pairs,
    pairs_stage,
    render_caption,
    split_pairs,
    template_fields,
)
from tasks.core.corpus import DataError
from tasks.core.heldout import heldout_mask
from tasks.core.products import read_catalog


def small_catalog(tmp_path, fashion_sample, n=8):
    """The first n products of the shipped sample, with their images, in a folder of our own."""
    lines = (fashion_sample / "styles.csv").read_text().splitlines()
    (tmp_path / "images").mkdir(parents=True, exist_ok=True)
    for line in lines[1 : n + 1]:
        image = line.rsplit(",", 1)[1]
        shutil.copyfile(fashion_sample / "images" / image, tmp_path / "images" / image)
    path = tmp_path / "styles.csv"
    path.write_text("\n".join(lines[: n + 1]) + "\n")
    return (
        path,
        [line.split(",", 1)[0] for line in lines[1 : n + 1]],
        [line.rsplit(",", 1)[1] for line in lines[1 : n + 1]],
    )


def test_caption_template_fills_fields_and_drops_empty_ones():
    values = {
        "productDisplayName": "Turtle Check Men Navy Blue Shirt",
        "articleType": "Shirts",
        "baseColour": "Navy Blue",
        "gender": "Men",
        "usage": "Casual",
    }
    assert (
        render_caption(DEFAULT_CAPTION_TEMPLATE, values)
        == "Turtle Check Men Navy Blue Shirt. Shirts, Navy Blue, Men, Casual"
    )
    assert (
        render_caption(DEFAULT_CAPTION_TEMPLATE, {**values, "usage": "", "baseColour": ""})
        == "Turtle Check Men Navy Blue Shirt. Shirts, Men"
    )
    assert (
        render_caption(DEFAULT_CAPTION_TEMPLATE, {**values, "productDisplayName": ""})
        == "Shirts, Navy Blue, Men, Casual"
    )
    assert template_fields("{gender} {baseColour} {articleType}") == ["gender", "baseColour", "articleType"]
    with pytest.raises(ValueError, match="names no field"):
        template_fields("no fields here")
    with pytest.raises(ValueError, match="plain field names"):
        template_fields("{gender!r}")


def test_pairs_from_the_sample_convert_grayscale_and_keep_every_product(fashion_sample):
    pairs = build_pairs(read_catalog(fashion_sample / "styles.csv"), show_progress=False)
    assert len(pairs) == 400 and pairs.pixels.shape == (400, 80, 60, 3) and pairs.pixels.dtype == np.uint8
    assert not pairs.bad
    grayscale = [s for s in pairs.converted if "converted to RGB" in s.reason]
    assert len(grayscale) == 5  # the sample's five grayscale photos, now RGB
    row = pairs.table.iloc[0]
    assert row["caption"] == "Manchester United Men Solid Black Track Pants. Track Pants, Black, Men, Casual"
    assert row["line"] == 2
    for item in grayscale:
        i = pairs.ids.index(item.doc_id)
        image = pairs.pixels[i].astype(int)
        assert np.array_equal(image[..., 0], image[..., 1])  # gray stays gray, in three channels


def test_bad_images_are_reported_with_line_and_left_out(tmp_path, fashion_sample):
    path, ids, images = small_catalog(tmp_path, fashion_sample, n=8)
    folder = tmp_path / "images"
    (folder / images[1]).write_bytes(b"this is not a jpeg")  # corrupt
    whole = (fashion_sample / "images" / images[2]).read_bytes()
    (folder / images[2]).write_bytes(whole[: len(whole) // 3])  # truncated
    (folder / images[3]).unlink()  # missing
    Image.new("RGB", (4, 4), (255, 0, 0)).save(folder / images[4], format="JPEG")  # too small to be a photo
    Image.open(fashion_sample / "images" / images[5]).convert("L").save(folder / images[5])  # grayscale: kept
    Image.open(fashion_sample / "images" / images[6]).convert("RGBA").save(
        folder / (images[6] + ".png"), format="PNG"
    )
    (folder / images[6]).unlink()
    path.write_text(path.read_text().replace(images[6], images[6] + ".png"))  # a transparent PNG: kept

    pairs = build_pairs(read_catalog(path, missing_image="skip"), show_progress=False)
    reasons = {s.doc_id: (s.line, s.reason, s.file) for s in pairs.bad}
    assert set(reasons) == {ids[1], ids[2], ids[3], ids[4]}
    assert reasons[ids[1]][0] == 3 and "corrupt" in reasons[ids[1]][1]
    assert reasons[ids[2]][0] == 4 and "unreadable image" in reasons[ids[2]][1]
    assert reasons[ids[3]][0] == 5 and "not found" in reasons[ids[3]][1]
    assert reasons[ids[4]][0] == 6 and "4x4 px" in reasons[ids[4]][1]
    assert all(file == str(path) for _, _, file in reasons.values())
    assert pairs.ids == [ids[0], ids[5], ids[6], ids[7]]
    already_gray = {ids[i] for i in (0, 7) if Image.open(fashion_sample / "images" / images[i]).mode != "RGB"}
    assert {s.doc_id for s in pairs.converted} == {ids[5], ids[6]} | already_gray
    assert pairs.pixels.shape == (4, 80, 60, 3)


def test_images_of_other_sizes_are_fitted_on_white(tmp_path, fashion_sample):
    path, ids, images = small_catalog(tmp_path, fashion_sample, n=2)
    Image.new("RGB", (120, 40), (0, 0, 200)).save(tmp_path / "images" / images[0])  # wide, blue
    pairs = build_pairs(read_catalog(path), image_size=(80, 60), show_progress=False)
    image = pairs.pixels[0].astype(int)
    assert image.shape == (80, 60, 3)
    assert (
        (image[0, 30] == 255).all() and image[40, 30, 2] > 150 and image[40, 30, 0] < 60
    )  # white band, blue middle


def test_caption_template_naming_an_unknown_field_is_a_data_error(tmp_path, fashion_sample):
    path, _, _ = small_catalog(tmp_path, fashion_sample, n=2)
    with pytest.raises(DataError, match=r"names field\(s\) \['colour'\] that are not columns"):
        build_pairs(read_catalog(path), caption_template="{colour} {articleType}", show_progress=False)
    with pytest.raises(DataError, match=r"line 2: no column\(s\) \['colour'\]"):
        check_catalog_columns(path, "{colour} {articleType}")
    check_catalog_columns(path, DEFAULT_CAPTION_TEMPLATE)  # the shipped layout passes
    # extra caption templates and attribute queries are checked too, not only the caption template
    with pytest.raises(DataError, match=r"no column\(s\) \['season_name'\].*'\{season_name\} \{gender\}'"):
        check_catalog_columns(
            path, DEFAULT_CAPTION_TEMPLATE, other_templates=["{gender}", "{season_name} {gender}"]
        )
    check_catalog_columns(
        path, DEFAULT_CAPTION_TEMPLATE, other_templates=["{gender} {baseColour} {articleType}"]
    )


def test_holdout_split_is_by_id_stable_and_disjoint(fashion_sample):
    ids = [str(i) for i in range(5000)]
    mask = heldout_mask(ids, 0.2)
    assert 0.17 < mask.mean() < 0.23
    # a product's side does not depend on the others: a shuffled, grown catalog keeps every old decision
    grown = ids[::-1] + [str(i) for i in range(5000, 6000)]
    again = dict(zip(grown, heldout_mask(grown, 0.2), strict=True))
    assert all(again[i] == m for i, m in zip(ids, mask, strict=True))
    assert not np.array_equal(mask, heldout_mask(ids, 0.2, salt="other"))
    pairs = build_pairs(read_catalog(fashion_sample / "styles.csv"), show_progress=False)
    train, held = split_pairs(pairs, 0.2)
    assert len(train) + len(held) == 400 and not set(train.ids) & set(held.ids)
    assert len(held.pixels) == len(held)


def test_pairs_stage_is_stored_and_reused(tmp_path, fashion_sample):
    path, _, images = small_catalog(tmp_path / "cat", fashion_sample, n=6)
    (tmp_path / "cat" / "images" / images[2]).write_bytes(b"junk")
    first = pairs_stage(path, tmp_path / "ws", show_progress=False)
    assert first.rows == 5 and len(first.bad) == 1 and first.bad[0]["line"] == 4
    again = pairs_stage(path, tmp_path / "ws", show_progress=False)
    assert again.key == first.key and again.path == first.path
    loaded = load_pairs(first)
    assert len(loaded) == 5 and loaded.pixels.shape == (5, 80, 60, 3) and loaded.bad[0].line == 4
    manifest = json.loads((first.path / "_COMPLETE").read_text())
    assert manifest["rows"] == 5
    other = pairs_stage(
        path, tmp_path / "ws", caption_template="{articleType}, {baseColour}", show_progress=False
    )
    assert other.key != first.key and load_pairs(other).captions[0].count(",") == 1
