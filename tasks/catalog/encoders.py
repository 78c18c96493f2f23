"""Image/text encoders for a catalog: one interface over a locked-text model and a CLIP model.

Two kinds, one API (``encode_text(texts)``, ``encode_images(images)``, unit-length float32 rows):

* ``lit``: a frozen sentence-transformers text tower (default: the bundled all-MiniLM-L6-v2) and a
  small image tower trained into its embedding space (locked-image-text tuning with the text side
  locked). Text embeddings are exactly the text model's, so one text index serves both products'
  texts and their images.
* ``clip``: a transformers ``CLIPModel`` with its ``CLIPProcessor`` (e.g.
  openai/clip-vit-base-patch32 for users with a hub, or a directory).

A saved encoder is a directory with ``catalog_encoder.json`` (kind, embedding size, image size,
what it was trained from) and the model files: for ``lit`` a copy of the text model in ``text/``
and the image tower in ``image_tower/``; for ``clip`` the CLIP model and processor at the top.
:func:`load_catalog_encoder` reads either back, and also opens a plain CLIP model directory or
hub id (zero-shot). Saving goes through a temporary directory renamed into place.

Images can be given as file paths, PIL images, or one uint8 array (N x height x width x 3).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


ENCODER_FILE = "catalog_encoder.json"


TEXT_DIR = "text"


TOWER_DIR = "image_tower"


FORMAT_VERSION = 1


DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"


TEXT_MAX_SEQ_LENGTH = 64  # captions and queries are short (a catalog caption is ~20-35 tokens)


def _unit_rows(array: Any) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.maximum(norms, 1e-12), dtype=np.float32)


def images_to_array(images: Any, size: tuple[int, int]) -> np.ndarray:
    """Paths, PIL images or a uint8 NHWC array -> uint8 array of shape (N, height, width, 3)."""
    from tasks.catalog.images import decode_image

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 array (N, height, width, 3), got {images.dtype} {images.shape}"
            )
        if tuple(images.shape[1:3]) == tuple(size):
            return images
    out = np.empty((len(images), *size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        if isinstance(image, np.ndarray):
            from PIL import Image

            image = Image.fromarray(image)
        pixels, reason, _ = decode_image(image, size)
        if pixels is None:
            raise ValueError(f"{image if isinstance(image, (str, Path)) else 'image'}: {reason}")
        out[i] = pixels
    return out


def images_to_pil(images: Any) -> list[Any]:
    """Paths, PIL images or a uint8 NHWC array -> RGB PIL images at their own size."""
    from PIL import Image

    from tasks.catalog.images import open_rgb

    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        rgb, reason, _ = open_rgb(image)
        if rgb is None:
            raise ValueError(f"{image if isinstance(image, (str, Path)) else 'image'}: {reason}")
        out.append(rgb)
    return out


class LitEncoder:
    """Frozen sentence-transformers text tower + trained image tower, in the text tower's space."""

    kind = "lit"

    def __init__(
        self,
        text_model: Any,
        tower: Any,
        *,
        text_fingerprint: str,
        text_name: str,
        logit_scale: float = 1.0 / 0.07,
        flip_average: bool = True,
        meta: dict[str, Any] | None = None,
    ):
        self.text_model = text_model
        self.tower = tower
        # an image's vector is the mean of it and its mirror image (product photos look the same
        # mirrored; measured +0.008 attribute nDCG@10 on the validation slice, for 2x the encoding time)
        self.flip_average = bool(flip_average)
        self.text_fingerprint = text_fingerprint
        self.text_name = text_name
        self.logit_scale = float(logit_scale)
        self.meta = dict(meta or {})

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.tower.config.image_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.tower.config.embedding_dim)

    def encode_text(
        self, texts: Sequence[str], *, batch_size: int = 128, show_progress: bool = False
    ) -> np.ndarray:
        from tasks.core.embeddings import encode_texts

        return encode_texts(self.text_model, texts, batch_size=batch_size, show_progress=show_progress)

    def encode_images(self, images: Any, *, batch_size: int = 256, show_progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        pixels = images_to_array(images, self.image_size)
        self.tower.eval()
        out = np.empty((len(pixels), self.embedding_dim), dtype=np.float32)
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(pixels), batch_size), desc="encoding images", disable=not show_progress
            ):
                batch = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
                vectors = torch.nn.functional.normalize(self.tower(batch), dim=-1)
                if self.flip_average:
                    vectors = vectors + torch.nn.functional.normalize(self.tower(batch.flip(2)), dim=-1)
                out[start : start + batch_size] = torch.nn.functional.normalize(vectors, dim=-1).numpy()
        return out

    def save(self, target: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        """Write the encoder as a directory (atomically: a temp dir renamed into place)."""
        from tasks.core.models import resolve_model

        def write(folder: Path) -> None:
            text_source = Path(self.meta.get("text_path") or resolve_model(self.text_name).path)
            shutil.copytree(text_source, folder / TEXT_DIR, ignore=shutil.ignore_patterns(".git*", "*.lock"))
            self.tower.save(folder / TOWER_DIR)
            card = {
                "format": FORMAT_VERSION,
                "kind": self.kind,
                "embedding_dim": self.embedding_dim,
                "image_size": list(self.image_size),
                "text_model": self.text_name,
                "text_fingerprint": self.text_fingerprint,
                "logit_scale": self.logit_scale,
                "flip_average": self.flip_average,
                **{k: v for k, v in self.meta.items() if k != "text_path"},
                **(extra or {}),
            }
            (folder / ENCODER_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")

        return _write_dir_atomically(Path(target), write)


class ClipEncoder:
    """A transformers CLIPModel and its processor."""

    kind = "clip"

    def __init__(
        self, model: Any, processor: Any, *, fingerprint: str, name: str, meta: dict[str, Any] | None = None
    ):
        self.model = model
        self.processor = processor
        self.text_fingerprint = (
            f"clip-{fingerprint}"  # the text tower may be fine-tuned: key on the whole model
        )
        self.name = name
        self.meta = dict(meta or {})

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.model.config.vision_config.image_size
        return (size, size)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    def text_inputs(self, texts: Sequence[str]) -> dict[str, Any]:
        max_length = int(self.model.config.text_config.max_position_embeddings)
        encoded = self.processor(
            text=list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
        return {k: encoded[k] for k in ("input_ids", "attention_mask") if k in encoded}

    def image_inputs(self, images: Any) -> dict[str, Any]:
        return dict(self.processor(images=images_to_pil(images), return_tensors="pt"))

    def encode_text(
        self, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = False
    ) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        self.model.eval()
        chunks = []
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(texts), batch_size), desc="encoding texts", disable=not show_progress
            ):
                features = self.model.get_text_features(**self.text_inputs(texts[start : start + batch_size]))
                chunks.append(_features(features).float().numpy())
        return _unit_rows(np.concatenate(chunks) if chunks else np.zeros((0, self.embedding_dim)))

    def encode_images(self, images: Any, *, batch_size: int = 64, show_progress: bool = False) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        self.model.eval()
        chunks = []
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(images), batch_size), desc="encoding images", disable=not show_progress
            ):
                inputs = self.image_inputs(images[start : start + batch_size])
                chunks.append(
                    _features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
                    .float()
                    .numpy()
                )
        return _unit_rows(np.concatenate(chunks) if chunks else np.zeros((0, self.embedding_dim)))

    def save(self, target: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
        def write(folder: Path) -> None:
            self.model.save_pretrained(folder, safe_serialization=True)
            self.processor.save_pretrained(folder)
            card = {
                "format": FORMAT_VERSION,
                "kind": self.kind,
                "embedding_dim": self.embedding_dim,
                "image_size": list(self.image_size),
                "base_model": self.name,
                "logit_scale": self.logit_scale,
                **self.meta,
                **(extra or {}),
            }
            (folder / ENCODER_FILE).write_text(json.dumps(card, indent=2, default=str) + "\n")

        return _write_dir_atomically(Path(target), write)


def _features(output: Any) -> Any:
    """transformers 5 returns a model output with the projected ``pooler_output``; 4.x a tensor."""
    return output if hasattr(output, "shape") else output.pooler_output


def _write_dir_atomically(target: Path, write) -> Path:
    """Build a directory under a temporary name next to ``target``, then swap it into place."""
    target = target.resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_catalog_encoder(path: str | Path) -> bool:
    return (Path(path) / ENCODER_FILE).is_file()


def model_kind(model: str | Path) -> str:
    """What a model name or directory holds: "lit" or "clip" (saved encoders), "clip-base" (a CLIP
    model), or "text" (a sentence-transformers text model, to train a locked-text encoder from)."""
    from tasks.core.models import ModelNotAvailableError, resolve_model

    resolved = resolve_model(model)
    card_file = resolved.path / ENCODER_FILE
    if card_file.is_file():
        return json.loads(card_file.read_text())["kind"]
    config_file = resolved.path / "config.json"
    model_type = json.loads(config_file.read_text()).get("model_type") if config_file.is_file() else None
    if model_type == "clip":
        return "clip-base"
    if (resolved.path / "modules.json").is_file():
        return "text"
    raise ModelNotAvailableError(
        f"{resolved.describe()} is neither a CLIP model (config.json with model_type 'clip'), a "
        "sentence-transformers text model (modules.json), nor a saved catalog encoder (catalog_encoder.json)"
    )


def load_text_tower(model: Any = DEFAULT_TEXT_MODEL):
    """(sentence-transformers model, resolved model) for a locked text tower (a name, dir or ResolvedModel)."""
    from tasks.core.models import ResolvedModel, load_sentence_transformer, resolve_model

    resolved = model if isinstance(model, ResolvedModel) else resolve_model(model)
    return load_sentence_transformer(resolved, max_seq_length=TEXT_MAX_SEQ_LENGTH), resolved


def new_lit_encoder(
    text_model: str | Path = DEFAULT_TEXT_MODEL, tower_config: Any = None, *, seed: int = 0, text: Any = None
) -> LitEncoder:
    """A locked-text encoder with a freshly initialised (untrained, seeded) image tower."""
    import torch

    from tasks.catalog.image_tower import ImageTower, ImageTowerConfig
    from tasks.core.models import resolve_model

    resolved = resolve_model(text_model)
    encoder = text if text is not None else load_text_tower(resolved)[0]
    dim = int(
        encoder.get_embedding_dimension()
        if hasattr(encoder, "get_embedding_dimension")
        else encoder.get_sentence_embedding_dimension()
    )
    config = tower_config or ImageTowerConfig()
    if config.embedding_dim != dim:
        config = type(config)(**{**config.to_dict(), "embedding_dim": dim})
    torch.manual_seed(seed)
    tower = ImageTower(config)
    tower.eval()
    return LitEncoder(
        encoder,
        tower,
        text_fingerprint=resolved.fingerprint,
        text_name=str(text_model),
        meta={"text_path": str(resolved.path)},
    )


def initial_encoder(model: str | Path, tower: Any = None, *, seed: int = 0) -> LitEncoder | ClipEncoder:
    """The encoder training starts from, which is also the "before" of an evaluation.

    A sentence-transformers text model: a locked-text encoder with a new image tower of shape
    ``tower`` (an ImageTowerConfig or its dict), seeded. A saved catalog encoder: itself (training
    continues from it). A CLIP model: itself (zero-shot).
    """
    from tasks.catalog.image_tower import ImageTowerConfig

    if model_kind(model) == "text":
        if isinstance(tower, dict):
            tower = ImageTowerConfig(**tower)
        return new_lit_encoder(model, tower, seed=seed)
    return load_catalog_encoder(model)


def load_clip_model(model: str | Path):
    """(CLIPModel, CLIPProcessor, resolved model) through tasks.core.models (safetensors, no remote code)."""
    import warnings

    from transformers import CLIPModel, CLIPProcessor

    from tasks.core.models import load_pretrained, load_processor, resolve_model

    resolved = resolve_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CLIPImageProcessor requires torchvision ... falling back to PIL"
        processor = load_processor(resolved, CLIPProcessor)
    clip = load_pretrained(resolved, CLIPModel)
    clip.eval()
    return clip, processor, resolved


def load_catalog_encoder(model: str | Path) -> LitEncoder | ClipEncoder:
    """A saved catalog encoder (``lit`` or ``clip``), or a plain CLIP model used zero-shot."""
    from tasks.catalog.image_tower import ImageTower
    from tasks.core.models import ModelNotAvailableError, load_sentence_transformer, resolve_model

    resolved = resolve_model(model)
    kind = model_kind(resolved.path)
    if kind == "lit":
        card = json.loads((resolved.path / ENCODER_FILE).read_text())
        text_dir = resolved.path / TEXT_DIR
        text = load_sentence_transformer(str(text_dir), max_seq_length=TEXT_MAX_SEQ_LENGTH)
        tower = ImageTower.load(resolved.path / TOWER_DIR)
        meta = {
            k: v
            for k, v in card.items()
            if k
            not in {
                "format",
                "kind",
                "embedding_dim",
                "image_size",
                "text_model",
                "text_fingerprint",
                "logit_scale",
                "flip_average",
            }
        }
        meta["text_path"] = str(text_dir)
        return LitEncoder(
            text,
            tower,
            text_fingerprint=resolve_model(str(text_dir)).fingerprint,
            text_name=card.get("text_model", str(text_dir)),
            logit_scale=card.get("logit_scale", 1 / 0.07),
            flip_average=card.get("flip_average", False),
            meta=meta,
        )
    if kind in {"clip", "clip-base"}:
        clip, processor, resolved = load_clip_model(resolved.path)
        return ClipEncoder(clip, processor, fingerprint=resolved.fingerprint, name=str(model))
    raise ModelNotAvailableError(
        f"{resolved.describe()} is a text model, not an image/text encoder; train one from it with "
        "`adapt clip --catalog PATH --model " + str(model) + "`"
    )


TEXT_EMBEDDINGS_STAGE = "text-embeddings"


def cached_text_embeddings(
    encoder: Any,
    texts: Sequence[str],
    workspace: str | Path | None,
    *,
    batch_size: int = 128,
    show_progress: bool = True,
) -> np.ndarray:
    """``encoder.encode_text(texts)`` through the workspace's embedding cache
    (:class:`tasks.core.embeddings.EmbeddingCache`, keyed by the text model's fingerprint), so a rerun
    (or the after-training evaluation of a locked text tower) does not encode the same texts again.
    Without a workspace, just encodes."""
    if workspace is None:
        return encoder.encode_text(texts, batch_size=batch_size, show_progress=show_progress)
    from tasks.core.embeddings import EmbeddingCache

    cache = EmbeddingCache(
        workspace,
        None,
        encoder.text_fingerprint,
        max_seq_length=0,
        name=f"{encoder.text_fingerprint}-{TEXT_EMBEDDINGS_STAGE}",
        encode=lambda chunk: encoder.encode_text(chunk, batch_size=batch_size, show_progress=show_progress),
    )
    return cache.embed(list(texts), desc="encoding captions")
