"""Product catalogs (CSV, TSV or Parquet with text fields and an image file column) read into the
corpus table of the data contract: ``doc_id, title, text, image, content_hash, attributes``.

Image file names are looked up next to the catalog, then in its ``images/`` folder (or a root the
caller names); a missing image is an error naming the catalog line, or with ``missing_image="skip"``
a reported, left-out product. An image path (symbolic links resolved) must lie inside the catalog's
folder or the image root the caller names: one that leaves them (``../``, an absolute path
elsewhere, a link pointing out) is refused like a missing image. :func:`read_products` reads either
a catalog or any corpus file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tasks.core.corpus import (
    Corpus,
    DataError,
    Skipped,
    content_hash,
    field_text,
    file_digest,
    finish_corpus,
    iter_records,
    read_corpus,
    record_unit,
)

log = logging.getLogger(__name__)


def read_catalog(
    path: str | Path,
    *,
    id_field: str = "id",
    title_field: str | None = "productDisplayName",
    text_fields: Sequence[str] | None = None,
    image_field: str = "image",
    image_root: str | Path | None = None,
    missing_image: str = "error",
) -> Corpus:
    """A product catalog (CSV/TSV/Parquet with text fields and an image path column) as a corpus.

    ``text`` joins the text fields' values (default: every column but id, title and image);
    ``attributes`` keeps all fields as JSON for attribute queries. Image paths are taken relative
    to ``image_root`` (default: the catalog's folder, then its ``images/`` subfolder), and accepted
    only inside the catalog's folder or ``image_root`` once symbolic links are resolved.
    ``missing_image``: "error" (DataError) or "skip" (report and leave the product out), for an
    image that is missing or leaves those folders alike.
    """
    path = Path(path)
    if missing_image not in {"error", "skip"}:
        raise ValueError("missing_image must be 'error' or 'skip'")
    unit = record_unit(path)
    roots = [Path(image_root)] if image_root else [path.parent, path.parent / "images"]
    allowed = _allowed_folders(path, image_root)
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for line, record in iter_records(path):
        for required in (id_field, image_field):
            if required not in record:
                raise DataError(
                    path, line, f"no '{required}' column; columns are {sorted(record)}", unit=unit
                )
        fields = text_fields or [k for k in record if k not in {id_field, image_field, title_field}]
        missing = [f for f in fields if f not in record]
        if missing:
            raise DataError(
                path, line, f"text field(s) {missing} not among the columns {sorted(record)}", unit=unit
            )
        doc_id = field_text(path, line, id_field, record[id_field], required=True).strip()
        if not doc_id:
            raise DataError(path, line, f"field '{id_field}' (product id) is empty", unit=unit)
        if doc_id in seen:
            raise DataError(
                path, line, f"duplicate product id '{doc_id}' (first at {unit} {seen[doc_id]})", unit=unit
            )
        seen[doc_id] = line
        title = (
            field_text(path, line, title_field, record.get(title_field), required=False).strip()
            if title_field
            else ""
        )
        values = {f: field_text(path, line, f, record.get(f), required=False).strip() for f in fields}
        text = ", ".join(v for v in values.values() if v)
        image_name = field_text(path, line, image_field, record[image_field], required=False).strip()
        image_path = _find_image(image_name, roots) if image_name else None
        outside = image_path is not None and not _inside(image_path, allowed)
        if image_path is None or outside:
            if outside:
                reason = (
                    f"image path '{image_name}' leaves the catalog's folder (it is {image_path}); "
                    f"images must lie inside {' or '.join(map(str, allowed))}"
                    + ("" if image_root else "; for images elsewhere, name their folder as the image root")
                )
            elif image_name:
                reason = f"image file '{image_name}' not found under {', '.join(map(str, roots))}"
            else:
                reason = "no image named"
            if missing_image == "error":
                raise DataError(path, line, reason, unit=unit)
            skipped.append(Skipped(str(path), line, doc_id, reason))
            continue
        if not text and not title:
            skipped.append(Skipped(str(path), line, doc_id, "empty product (no title and no text fields)"))
            continue
        attributes = json.dumps({"title": title, **values}, ensure_ascii=False, sort_keys=True)
        rows.append(
            {
                "doc_id": doc_id,
                "title": title,
                "text": text,
                "image": str(image_path),
                "content_hash": content_hash(title, text, file_digest(image_path), attributes),
                "attributes": attributes,
            }
        )
    return finish_corpus(path, rows, skipped)


def read_products(path: str | Path, *, image_root: str | Path | None = None) -> Corpus:
    """A catalog (a CSV/TSV/Parquet with an ``image`` column; products with a missing image, or one
    outside the catalog's folder and ``image_root``, are reported and left out) or else any corpus
    :func:`read_corpus` reads."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in {".csv", ".tsv", ".parquet"}:
        _, first = next(iter_records(path), (None, {}))
        if "image" in (first or {}):
            return read_catalog(path, image_root=image_root, missing_image="skip")
    return read_corpus(path)


def _find_image(name: str, roots: Sequence[Path]) -> Path | None:
    """The image file, its symbolic links resolved, or None when there is none."""
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate.resolve() if candidate.is_file() else None
    for root in roots:
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    return None


def _allowed_folders(catalog: Path, image_root: str | Path | None) -> list[Path]:
    """Where a catalog's images may lie: its own folder, and the image root the caller names."""
    folders = [catalog.resolve().parent]
    if image_root:
        folders.append(Path(image_root).resolve())
    return folders


def _inside(image: Path, folders: Sequence[Path]) -> bool:
    return any(image.is_relative_to(folder) for folder in folders)
