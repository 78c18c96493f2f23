"""Product images: opened as RGB, fitted to the training size, and decoded for a whole catalog as a
stage in parts (the part jobs run here or on a Dask cluster, see :mod:`tasks.core.parts`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.core.corpus import Corpus
from tasks.core.defaults import IMAGE_SIZE
from tasks.core.parts import LOCAL, PartRunner, resumed_progress

MIN_IMAGE_SIDE = 8  # smaller than this is not a product photo (a tracking pixel, a broken export)


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
