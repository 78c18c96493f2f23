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

from tasks.catalog.images import DECODE_PART_SIZE, decode_image, decode_images_stage, read_decoded
from tasks.core.corpus import Corpus, DataError, Skipped, iter_records
from tasks.core.defaults import IMAGE_SIZE
from tasks.core.heldout import heldout_mask
from tasks.core.markdown import md
from tasks.core.parts import LOCAL, PartRunner
from tasks.core.products import read_catalog

log = logging.getLogger(__name__)


DEFAULT_CAPTION_TEMPLATE = "{productDisplayName}. {articleType}, {baseColour}, {gender}, {usage}"


PAIRS_STAGE = "pairs"


PIXELS_FILE = "pixels.npy"


PAIR_COLUMNS = ["doc_id", "line", "caption", "image", "content_hash", "attributes"]


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
