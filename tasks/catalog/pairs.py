"""Image/text pairs from a product catalog: captions from a template, images checked and decoded.

A catalog (CSV or Parquet, read by :func:`tasks.core.corpus.read_catalog`) becomes a pairs table
``doc_id, line, caption, image, content_hash, attributes`` plus one uint8 array of all its images,
``pixels.npy`` (N x height x width x 3, RGB), decoded once: the catalog's small product photos fit
in memory (15,000 images of 80x60 are ~200 MB) and reading them back every epoch would cost more
than the training step.

Every image is checked on read: missing, unreadable or too small images are reported (file,
catalog line, why) and the product is left out; grayscale, palette, CMYK or transparent images are
converted to RGB (on white). A bad image never stops the run.

The held-out split is by product id (:mod:`tasks.core.heldout`), so a product stays on the same side of the
split when the catalog grows, and no product is ever both trained on and evaluated on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.corpus import Corpus, DataError, Skipped, iter_records
from tasks.core.defaults import IMAGE_SIZE
from tasks.core.heldout import heldout_mask
from tasks.core.markdown import md
from tasks.core.parts import LOCAL, PartRunner, resumed_progress
from tasks.core.products import read_catalog

log = logging.getLogger(__name__)


DEFAULT_CAPTION_TEMPLATE = "{productDisplayName}. {articleType}, {baseColour}, {gender}, {usage}"


PAIRS_STAGE = "pairs"


PIXELS_FILE = "pixels.npy"


PAIR_COLUMNS = ["doc_id", "line", "caption", "image", "content_hash", "attributes"]


MIN_IMAGE_SIDE = 8  # smaller than this is not a product photo (a tracking pixel, a broken export)


@dataclass
class Pairs:
    """Image/text pairs of a catalog: one row per usable product, its decoded image in ``pixels``."""

    table: pd.DataFrame  # PAIR_COLUMNS
    pixels: np.ndarray  # uint8, (len(table), height, width, 3)
    source: str
    bad: list[Skipped] = field(default_factory=list)  # products left out, and why
    converted: list[Skipped] = field(default_factory=list)  # images converted to RGB (kept)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def ids(self) -> list[str]:
        return self.table["doc_id"].tolist()

    @property
    def captions(self) -> list[str]:
        return self.table["caption"].tolist()

    def attributes(self) -> list[dict[str, str]]:
        return [json.loads(a) for a in self.table["attributes"]]

    def subset(self, mask: Sequence[bool] | np.ndarray) -> Pairs:
        mask = np.asarray(mask, dtype=bool)
        return Pairs(
            self.table[mask].reset_index(drop=True), self.pixels[mask], self.source, self.bad, self.converted
        )

    @property
    def key(self) -> str:
        """Content key of the pairs (captions and image contents, in order)."""
        digest = hashlib.sha256()
        for doc_id, caption, content in zip(
            self.table["doc_id"], self.table["caption"], self.table["content_hash"], strict=True
        ):
            digest.update(f"{doc_id}\x1f{caption}\x1f{content}\n".encode())
        digest.update(str(self.pixels.shape).encode())
        return digest.hexdigest()[:20]


def template_fields(template: str) -> list[str]:
    """The field names a caption template uses, in order ("{a}, {b}" -> ["a", "b"])."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"caption template {template!r} is not a valid template: {exc}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"caption template {template!r}: use plain field names like {{articleType}}, "
                f"found {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
        names.append(name)
    if not names:
        raise ValueError(f"caption template {template!r} names no field; write fields as {{fieldName}}")
    return names


_EMPTY_SEPARATORS = re.compile(r"(?:\s*[,;|]\s*)+(?=[,;.|]|$)")


_LEADING = re.compile(r"^[\s,;.:|]+")


def render_caption(template: str, values: Mapping[str, str]) -> str:
    """The template filled with a product's values; separators left dangling by empty values removed.

    "{name}. {type}, {colour}, {usage}" with an empty usage gives "Shirt. Shirts, Blue", not
    "Shirt. Shirts, Blue, ".
    """
    text = template.format_map({k: (v or "").strip() for k, v in values.items()})
    text = " ".join(text.split())
    previous = None
    while previous != text:
        previous = text
        text = _EMPTY_SEPARATORS.sub("", text)
        text = text.replace(" .", ".").replace("..", ".").replace(". ,", ".").replace(".,", ".")
    return _LEADING.sub("", text).strip()


def open_rgb(source: Any) -> tuple[Any, str | None, bool]:
    """(RGB PIL image, why-bad, converted) from a path, a file object or a PIL image.

    Decodes fully (a truncated or corrupt file fails here, not later). Grayscale, palette, CMYK and
    transparent images are converted to RGB, transparency on white.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        try:
            image.load()
            converted = image.mode != "RGB"
            if image.mode in {"RGBA", "LA", "PA"} or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                rgb = Image.alpha_composite(background, rgba).convert("RGB")
            else:
                rgb = image.convert("RGB")
        finally:
            if image is not source:
                image.close()
    except FileNotFoundError:
        return None, "image file not found", False
    except UnidentifiedImageError:
        return None, "not an image file PIL can read (unknown or corrupt format)", False
    except (OSError, ValueError, SyntaxError) as exc:  # truncated data, bad headers
        return None, f"unreadable image ({exc})", False
    if min(rgb.size) < MIN_IMAGE_SIDE:
        return (
            None,
            f"image is {rgb.size[0]}x{rgb.size[1]} px; expected at least {MIN_IMAGE_SIDE} px a side",
            False,
        )
    return rgb, None, converted


def fit_to_box(image: Any, size: tuple[int, int]) -> np.ndarray:
    """An RGB PIL image scaled to fit (height, width) with its aspect kept, centred on white."""
    from PIL import Image

    height, width = size
    if image.size != (width, height):
        scale = min(width / image.size[0], height / image.size[1])
        fitted = image.resize(
            (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale))),
            Image.Resampling.BICUBIC,
        )
        canvas = Image.new("RGB", (width, height), (255, 255, 255))
        canvas.paste(fitted, ((width - fitted.size[0]) // 2, (height - fitted.size[1]) // 2))
        image = canvas
    return np.asarray(image, dtype=np.uint8)


def decode_image(source: Any, size: tuple[int, int]) -> tuple[np.ndarray | None, str | None, bool]:
    """(pixels, why-bad, converted): an RGB uint8 array of ``size`` = (height, width), or why not."""
    image, reason, converted = open_rgb(source)
    if image is None:
        return None, reason, False
    return fit_to_box(image, size), None, converted


def catalog_lines(path: str | Path, id_field: str = "id") -> dict[str, int]:
    """Product id -> line (CSV/TSV) or row (Parquet) of the catalog, for messages about a product."""
    lines: dict[str, int] = {}
    for line, record in iter_records(path):
        value = record.get(id_field)
        if value is not None:
            lines.setdefault(str(value).strip(), line)
    return lines


def build_pairs(
    catalog: Corpus,
    *,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    title_field: str | None = "productDisplayName",
    id_field: str = "id",
    image_size: tuple[int, int] = IMAGE_SIZE,
    show_progress: bool = True,
    decoded: Mapping[str, tuple[np.ndarray | None, str | None, bool]] | None = None,
) -> Pairs:
    """Pairs from a catalog corpus: a caption per product and its checked, decoded image.

    ``decoded`` (product id -> what :func:`decode_image` gives, e.g. from :func:`decode_images_stage`)
    saves decoding here; without it every image is decoded in this process."""
    from tqdm.auto import tqdm

    path = Path(catalog.source)
    try:
        names = template_fields(caption_template)
    except ValueError as exc:
        raise DataError(path, None, str(exc)) from None
    docs = catalog.docs
    known = set(json.loads(docs["attributes"].iloc[0])) | ({title_field} if title_field else set())
    unknown = [n for n in names if n not in known]
    if unknown:
        columns = sorted(known - {"title"})
        raise DataError(
            path,
            None,
            f"caption template {caption_template!r} names field(s) {unknown} that are "
            f"not columns of the catalog; columns are {columns}",
        )
    lines = catalog_lines(path, id_field) if path.is_file() else {}
    unit = "row" if path.suffix.lower() in {".parquet", ".pq"} else "line"
    pixels = np.empty((len(docs), *image_size, 3), dtype=np.uint8)
    keep = np.zeros(len(docs), dtype=bool)
    rows: list[dict[str, Any]] = []
    bad: list[Skipped] = list(catalog.skipped)
    converted: list[Skipped] = []
    iterator = docs.itertuples(index=False)
    for i, doc in enumerate(
        tqdm(iterator, total=len(docs), desc="checking images", disable=not show_progress, mininterval=2.0)
    ):
        line = lines.get(doc.doc_id, 0)
        image, reason, was_converted = (
            decoded[doc.doc_id] if decoded is not None else decode_image(doc.image, image_size)
        )
        if image is None:
            bad.append(Skipped(str(path), line, doc.doc_id, f"{doc.image}: {reason}"))
            continue
        if was_converted:
            converted.append(Skipped(str(path), line, doc.doc_id, f"{doc.image}: converted to RGB"))
        attributes = json.loads(doc.attributes)
        values = {k: v for k, v in attributes.items() if k != "title"}
        if title_field:
            values[title_field] = attributes.get("title", "")
        caption = render_caption(caption_template, values)
        if not caption:
            bad.append(
                Skipped(
                    str(path),
                    line,
                    doc.doc_id,
                    f"caption template {caption_template!r} gives an "
                    "empty caption (all its fields are empty)",
                )
            )
            continue
        pixels[i] = image
        keep[i] = True
        rows.append(
            {
                "doc_id": doc.doc_id,
                "line": line,
                "caption": caption,
                "image": doc.image,
                "content_hash": doc.content_hash,
                "attributes": json.dumps(values, ensure_ascii=False, sort_keys=True),
            }
        )
    left_out = bad[len(catalog.skipped) :]
    if left_out:
        shown = "; ".join(f"{s.doc_id} ({unit} {s.line}): {s.reason}" for s in left_out[:5])
        more = f" and {len(left_out) - 5} more" if len(left_out) > 5 else ""
        log.warning("%s: left out %d product(s) with a bad image: %s%s", path, len(left_out), shown, more)
    if converted:
        log.info(
            "%s: converted %d image(s) to RGB (grayscale, palette, CMYK or transparent)", path, len(converted)
        )
    if not rows:
        raise DataError(path, None, "no product with a usable image and caption")
    table = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return Pairs(table, np.ascontiguousarray(pixels[keep]), str(path), bad, converted)


def check_catalog_columns(
    path: str | Path,
    caption_template: str,
    *,
    id_field: str = "id",
    image_field: str = "image",
    title_field: str | None = "productDisplayName",
    other_templates: Sequence[str] = (),
) -> None:
    """Fail fast (DataError) when the catalog's first record lacks a column the run needs: the ids,
    the images, the title, or a field named by the caption template or one of ``other_templates``
    (extra caption templates, attribute queries)."""
    path = Path(path)
    templates = (caption_template, *other_templates)
    names: list[str] = []
    for template in templates:
        try:
            names += template_fields(template)
        except ValueError as exc:
            raise DataError(path, None, str(exc)) from None
    for line, record in iter_records(path):
        for template in templates:
            needed = [id_field, image_field, *template_fields(template)]
            missing = [n for n in dict.fromkeys(needed) if n not in record]
            if missing:
                raise DataError(
                    path,
                    line,
                    f"no column(s) {missing} (needed for the ids, images or the template "
                    f"{template!r}); columns are {sorted(record)}",
                )
        if title_field and title_field not in record:
            raise DataError(path, line, f"no title column '{title_field}'; columns are {sorted(record)}")
        return
    raise DataError(path, None, "empty catalog: no products")


def split_pairs(pairs: Pairs, heldout_fraction: float, *, salt: str = "holdout") -> tuple[Pairs, Pairs]:
    """(trained on, held out) by product id; see :func:`heldout_mask`."""
    mask = heldout_mask(pairs.ids, heldout_fraction, salt=salt)
    return pairs.subset(~mask), pairs.subset(mask)


@dataclass(frozen=True)
class PairsRef:
    """Where a committed pairs stage lives, with its counts: what a Prefect task passes on."""

    path: Path
    key: str
    rows: int
    bad: list[dict[str, Any]]
    converted: int


DECODED_STAGE = "decoded-images"
DECODED_SCHEMA_FIELDS = ("doc_id", "pixels", "reason", "converted")
DECODE_PART_SIZE = 512  # products per part: the unit of crash recovery and of a worker's task


def decode_images_stage(
    catalog: Corpus,
    store: Any,
    *,
    image_size: tuple[int, int] = IMAGE_SIZE,
    part_size: int = DECODE_PART_SIZE,
    parts: PartRunner = LOCAL,
    progress: Any = None,
) -> Any:
    """Every product's image decoded to ``image_size`` (or why not), as a stage in parts: each part a
    job for ``parts`` (a Dask worker with ``task_runner: dask``; the images must be at the same paths
    there). Returns the stage's StageRef; :func:`read_decoded` gives the id -> result map."""
    import pyarrow as pa

    from tasks.core.store import chunked, stage_key

    settings = {"image_size": list(image_size), "part_size": part_size}
    key = stage_key(DECODED_STAGE, settings, inputs=[catalog.key])
    if store.is_complete(DECODED_STAGE, key):
        return store.ref(DECODED_STAGE, key)
    writer = store.open(DECODED_STAGE, key, config=settings, inputs=[catalog.key])
    docs = catalog.docs
    chunks = list(chunked(range(len(docs)), part_size))
    jobs = [
        DecodePart(
            str(writer.path),
            index,
            [docs["doc_id"].iat[p] for p in positions],
            [docs["image"].iat[p] for p in positions],
            tuple(image_size),
        )
        for index, positions in chunks
        if not writer.has_part(index)
    ]
    parts.run("decode images", jobs, resumed_progress(progress, len(chunks) - len(jobs), len(chunks)))
    schema = pa.schema(
        [("doc_id", pa.string()), ("pixels", pa.binary()), ("reason", pa.string()), ("converted", pa.bool_())]
    )
    return writer.commit(empty_schema=schema)


@dataclass(frozen=True)
class DecodePart:
    """One part of the decoded-images stage: decode its products' images and write the part (pixels
    as raw bytes, or null and why). Does nothing when the part exists."""

    stage_dir: str
    index: int
    doc_ids: list[str]
    images: list[Any]
    image_size: tuple[int, int]

    def __call__(self) -> int:
        import pyarrow as pa

        from tasks.core.store import part_name, write_parquet_atomic

        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return 0
        rows: dict[str, list[Any]] = {name: [] for name in DECODED_SCHEMA_FIELDS}
        for doc_id, source in zip(self.doc_ids, self.images, strict=True):
            pixels, reason, converted = decode_image(source, self.image_size)
            rows["doc_id"].append(doc_id)
            rows["pixels"].append(None if pixels is None else pixels.tobytes())
            rows["reason"].append(reason)
            rows["converted"].append(bool(converted))
        table = pa.table(
            {
                "doc_id": pa.array(rows["doc_id"], pa.string()),
                "pixels": pa.array(rows["pixels"], pa.binary()),
                "reason": pa.array(rows["reason"], pa.string()),
                "converted": pa.array(rows["converted"], pa.bool_()),
            }
        )
        write_parquet_atomic(target, table)
        return len(self.doc_ids)


def read_decoded(
    store: Any, ref: Any, image_size: tuple[int, int]
) -> dict[str, tuple[np.ndarray | None, str | None, bool]]:
    """Product id -> (pixels, why-bad, converted) of a committed decoded-images stage."""
    table = store.read(ref.stage, ref.key)
    shape = (*image_size, 3)
    return {
        doc_id: (
            None if raw is None else np.frombuffer(raw, dtype=np.uint8).reshape(shape),
            reason,
            bool(converted),
        )
        for doc_id, raw, reason, converted in zip(
            table.column("doc_id").to_pylist(),
            table.column("pixels").to_pylist(),
            table.column("reason").to_pylist(),
            table.column("converted").to_pylist(),
            strict=True,
        )
    }


def pairs_stage(
    catalog_path: str | Path,
    workspace: str | Path,
    *,
    caption_template: str = DEFAULT_CAPTION_TEMPLATE,
    id_field: str = "id",
    title_field: str | None = "productDisplayName",
    image_field: str = "image",
    image_root: str | Path | None = None,
    image_size: tuple[int, int] = IMAGE_SIZE,
    show_progress: bool = True,
    decode_part_size: int = DECODE_PART_SIZE,
    parts: PartRunner = LOCAL,
) -> PairsRef:
    """Read a catalog, build its pairs and commit them to the store (reused when nothing changed).
    The images are decoded first, in parts run by ``parts`` (:func:`decode_images_stage`)."""
    from tasks.core.store import Store, stage_key

    start = time.time()
    catalog = read_catalog(
        catalog_path,
        id_field=id_field,
        title_field=title_field,
        image_field=image_field,
        image_root=image_root,
        missing_image="skip",
    )
    config = {
        "caption_template": caption_template,
        "title_field": title_field,
        "image_size": list(image_size),
    }
    key = stage_key(PAIRS_STAGE, config, inputs=[catalog.key])
    store = Store(workspace)
    if not store.is_complete(PAIRS_STAGE, key):
        import pyarrow as pa

        decoded_ref = decode_images_stage(
            catalog, store, image_size=image_size, part_size=decode_part_size, parts=parts
        )
        pairs = build_pairs(
            catalog,
            caption_template=caption_template,
            title_field=title_field,
            id_field=id_field,
            image_size=image_size,
            show_progress=show_progress,
            decoded=read_decoded(store, decoded_ref, image_size),
        )
        store.remove(PAIRS_STAGE, key)  # a crashed earlier attempt: start over (one part only)
        writer = store.open(PAIRS_STAGE, key, config=config, inputs=[catalog.key])
        writer.write_file(PIXELS_FILE, lambda tmp: _save_npy(tmp, pairs.pixels))
        writer.write_part(0, pa.Table.from_pandas(pairs.table, preserve_index=False))
        writer.commit(
            bad=[s.__dict__ for s in pairs.bad],
            converted=[s.__dict__ for s in pairs.converted],
            source=str(catalog_path),
            seconds_to_build=round(time.time() - start, 2),
        )
    manifest = store.manifest(PAIRS_STAGE, key)
    return PairsRef(
        store.path(PAIRS_STAGE, key), key, manifest["rows"], manifest["bad"], len(manifest["converted"])
    )


def _save_npy(tmp: Path, array: np.ndarray) -> None:
    with tmp.open("wb") as handle:
        np.save(handle, array, allow_pickle=False)


def load_pairs(ref: PairsRef | str | Path) -> Pairs:
    """The pairs of a committed pairs stage (table + pixels)."""
    import pyarrow.parquet as pq

    from tasks.core.store import MANIFEST, IncompleteStageError

    path = Path(ref.path if isinstance(ref, PairsRef) else ref)
    if not (path / MANIFEST).is_file():
        raise IncompleteStageError(f"pairs stage at {path} is not complete (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    table = pd.concat([pq.read_table(path / p).to_pandas() for p in manifest["parts"]], ignore_index=True)
    pixels = np.load(path / PIXELS_FILE, allow_pickle=False)
    bad = [Skipped(**s) for s in manifest.get("bad", [])]
    converted = [Skipped(**s) for s in manifest.get("converted", [])]
    return Pairs(table, pixels, manifest.get("source", str(path)), bad, converted)


def bad_images_markdown(bad: Sequence[Skipped | Mapping[str, Any]], limit: int = 20) -> str:
    """The products left out, as a markdown table a person can act on."""
    if not bad:
        return "_No product left out._"
    lines = ["| product | catalog line | why left out |", "|---|---:|---|"]
    for item in list(bad)[:limit]:
        s = item if isinstance(item, Skipped) else Skipped(**item)
        lines.append(f"| {md(s.doc_id)} | {s.line} | {md(s.reason)} |")
    if len(bad) > limit:
        lines.append(f"| … | | and {len(bad) - limit} more |")
    return "\n".join(lines)
