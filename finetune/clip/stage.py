"""The image/text training stage: pairs in, a saved catalog encoder out, keyed in the store.

:func:`train_catalog_encoder` picks the path from the model (a text model: locked-text tuning; a
CLIP model: fine-tuning; a saved encoder: training continues), builds the caption views (the
template plus extra caption templates as text augmentation) and saves the encoder.
:func:`train_stage` runs it on the training side of the held-out split, under a key of the
settings, the pairs and the model, so a rerun reuses a finished model and resumes a cut-off one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.clip.clip_model import train_clip
from finetune.clip.config import ClipTrainConfig, TrainResult
from finetune.clip.lit import train_lit
from finetune.clip.loop import CHECKPOINT_FILE
from finetune.distributed import is_main
from tasks.core.defaults import IMAGE_SIZE

log = logging.getLogger(__name__)


def tower_config(config: ClipTrainConfig, image_size: tuple[int, int]) -> Any:
    """The image tower's shape from the training settings: one stage per entry of ``tower_blocks``,
    ``tower_width`` channels doubling at each stage (the embedding size follows the text tower)."""
    from tasks.catalog.image_tower import ImageTowerConfig

    blocks = tuple(config.tower_blocks)
    return ImageTowerConfig(
        image_size=tuple(image_size),
        blocks=blocks,
        widths=tuple(config.tower_width * 2**i for i in range(len(blocks))),
    )


def caption_views(pairs: Any, extra_templates: Sequence[str]) -> list[list[str]]:
    """The pairs' captions, then one more caption per product for each extra template (a product
    whose fields leave an extra template empty keeps its main caption there)."""
    from tasks.catalog.pairs import render_caption, template_fields

    views = [list(pairs.captions)]
    attributes = pairs.attributes() if extra_templates else []
    for template in extra_templates:
        missing = [f for f in template_fields(template) if attributes and f not in attributes[0]]
        if missing:
            raise ValueError(
                f"extra caption template {template!r} names field(s) {missing} that are not catalog "
                f"fields; fields: {sorted(attributes[0])}"
            )
        views.append(
            [
                render_caption(template, values) or caption
                for values, caption in zip(attributes, pairs.captions, strict=True)
            ]
        )
    return views


def train_catalog_encoder(
    model: str | Path,
    pairs: Any,
    config: ClipTrainConfig,
    output_dir: str | Path,
    *,
    image_size: tuple[int, int] = IMAGE_SIZE,
    workspace: str | Path | None = None,
    run_key: str = "catalog-encoder",
    checkpoint_dir: str | Path | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    card: dict[str, Any] | None = None,
) -> tuple[Path, TrainResult]:
    """Train an image/text encoder on a catalog's pairs (a :class:`tasks.catalog.pairs.Pairs`) and save it.

    Which path follows from ``model`` (see :func:`tasks.catalog.encoders.initial_encoder`): a text model or saved locked-
    text encoder trains an image tower against the frozen text tower's caption vectors (cached in
    ``workspace``); a CLIP model is fine-tuned. The saved directory loads back with
    :func:`tasks.catalog.encoders.load_catalog_encoder`.
    """

    from tasks.catalog.encoders import LitEncoder, cached_text_embeddings, initial_encoder

    encoder = initial_encoder(model, tower_config(config, image_size), seed=config.seed)
    if isinstance(encoder, LitEncoder):
        if tuple(pairs.pixels.shape[1:3]) != tuple(encoder.image_size):
            raise ValueError(
                f"pairs hold {pairs.pixels.shape[1]}x{pairs.pixels.shape[2]} images but the image tower "
                f"takes {encoder.image_size[0]}x{encoder.image_size[1]}"
            )
        captions = caption_views(pairs, config.extra_caption_templates)
        text_vectors = np.stack(
            [
                cached_text_embeddings(encoder, view, workspace, show_progress=show_progress)
                for view in captions
            ]
        )
        result = train_lit(
            encoder,
            pairs.pixels,
            text_vectors,
            config,
            captions=captions,
            run_key=run_key,
            checkpoint_dir=checkpoint_dir,
            show_progress=show_progress,
            on_step=on_step,
        )
        path = "locked-text (LiT): frozen text tower, image tower trained from scratch"
    else:
        result = train_clip(
            encoder,
            pairs.pixels,
            caption_views(pairs, config.extra_caption_templates),
            config,
            run_key=run_key,
            checkpoint_dir=checkpoint_dir,
            show_progress=show_progress,
            on_step=on_step,
        )
        path = f"CLIP fine-tuning, WiSE-FT ratio {config.wise_ft_ratio}"
    trained = {
        "from": str(model),
        "path": path,
        "pairs": len(pairs),
        "settings": config.model_dump(mode="json"),
        "result": {k: v for k, v in result.to_dict().items() if k != "losses"},
        **(card or {}),
    }
    if not is_main():  # the same weights are in every process: the first one saves them
        return Path(output_dir), result
    saved = encoder.save(output_dir, extra={"trained": trained})
    return saved, result


TRAIN_STAGE = "clip-train"


MODEL_SUBDIR = "model"


RESULT_FILE = "train.json"


def train_stage(
    model: str | Path,
    pairs_path: str | Path,
    config: ClipTrainConfig,
    *,
    heldout_fraction: float,
    split_salt: str = "holdout",
    image_size: tuple[int, int] = IMAGE_SIZE,
    workspace: str | Path,
    show_progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train on the non-held-out products of a committed pairs stage; the stage output (model,
    ``train.json``, loss plot) lives at ``<workspace>/clip-train/<key>/``, keyed by the model's
    fingerprint, the training pairs and the settings. A finished stage is reused; an interrupted
    one resumes from its checkpoint. Returns paths and small metadata (what a Prefect task passes)."""
    import json

    from tasks.catalog.pairs import load_pairs, split_pairs
    from tasks.core.models import resolve_model
    from tasks.core.report import plot_series
    from tasks.core.store import stage_key, write_json_atomic

    pairs = load_pairs(pairs_path)
    train_pairs, held_out = split_pairs(pairs, heldout_fraction, salt=split_salt)
    if len(train_pairs) < 2:
        raise ValueError(
            f"only {len(train_pairs)} product(s) left to train on after holding out "
            f"{len(held_out)}; lower the held-out fraction or add products"
        )
    settings = {"train": config.key_settings(), "image_size": list(image_size)}
    key = stage_key(
        TRAIN_STAGE, settings, inputs=[train_pairs.key], models=[resolve_model(model).fingerprint]
    )
    folder = Path(workspace) / TRAIN_STAGE / key
    model_dir, result_file = folder / MODEL_SUBDIR, folder / RESULT_FILE
    if result_file.is_file() and model_dir.is_dir():
        log.info("reusing the trained model at %s (same model, pairs and settings)", model_dir)
        return {**json.loads(result_file.read_text()), "reused": True}
    saved, result = train_catalog_encoder(
        model,
        train_pairs,
        config,
        model_dir,
        image_size=image_size,
        workspace=workspace,
        run_key=key,
        checkpoint_dir=folder,
        show_progress=show_progress,
        on_step=on_step,
        card={"pairs_key": train_pairs.key, "held_out_products": len(held_out)},
    )
    curve = [(i / result.steps_per_epoch, loss) for i, loss in enumerate(result.losses, start=1)]
    plot = folder / "loss.png"
    if is_main():  # one writer when training runs on several processes
        plot = plot_series(
            {"contrastive loss": curve}, plot, title="training loss", xlabel="epoch", ylabel="loss"
        )
    summary = {
        "model_dir": str(saved),
        "key": key,
        "loss_plot": str(plot),
        "trained_on": len(train_pairs),
        "held_out": len(held_out),
        "result": result.to_dict(),
    }
    if is_main():  # one writer when training runs on several processes
        write_json_atomic(result_file, summary)  # written last: its presence means the stage is complete
        (folder / CHECKPOINT_FILE).unlink(missing_ok=True)
    return {**summary, "reused": False}
