"""Flow: adapt an image/text model to a product catalog from the catalog itself (no labels).

catalog -> image/text pairs (captions from a template; bad images reported and left out) ->
evaluate the starting model on held-out products -> train -> evaluate the trained model (loaded
back from its saved directory) -> register it, and promote it only if it beats the current model
(or, with none yet, the starting one) -> picture report (top images before/after) as an artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger
from pydantic import ConfigDict, Field, model_validator

from finetune.clip.config import ClipTrainConfig
from finetune.clip.stage import tower_config
from flows.engine import part_runner
from flows.stages import (
    evaluate_catalog_model_task,
    publish_catalog_report_task,
    train_catalog_encoder_task,
)
from tasks.catalog.evaluation import DEFAULT_ATTRIBUTE_QUERIES
from tasks.catalog.images import DECODE_PART_SIZE
from tasks.catalog.pairs import DEFAULT_CAPTION_TEMPLATE, pairs_stage
from tasks.core.defaults import BASE_MODEL, CATALOG_CLIP_MODEL_NAME, DEFAULT_WORKSPACE, IMAGE_SIZE
from tasks.core.markdown import md, md_code
from tasks.core.parts import EngineSettings
from tasks.core.settings import require_path

CATALOG_METRICS = Literal["attribute_ndcg@10", "caption_recall@10", "caption_mrr", "image_precision@10"]


class ClipConfig(EngineSettings):
    """Settings of `adapt clip` and of the `adapt-clip` flow."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    catalog: Path = Field(
        description="product catalog: CSV or Parquet with an id column, text fields and an image "
        "file column (like data/fashion-sample/styles.csv)"
    )
    model: str = Field(
        BASE_MODEL,
        description=(
            "model to adapt: a sentence-transformers text model (kept frozen as the text tower; an image tower is trained "
            "from scratch into its space: needs no pretrained vision weights), a CLIP model such as "
            "openai/clip-vit-base-patch32 or its directory (fine-tuned), or a saved catalog encoder (training continues)"
        ),
    )
    caption_template: str = Field(
        DEFAULT_CAPTION_TEMPLATE,
        description="caption of a product from its fields (Python format fields; empty values dropped)",
    )
    id_field: str = Field("id", description="catalog column with the product id")
    title_field: str | None = Field("productDisplayName", description="catalog column with the product name")
    image_field: str = Field("image", description="catalog column with the image file name")
    image_root: Path | None = Field(
        None,
        description="folder of the image files; none: look next to the catalog, then in its images/ folder",
    )
    image_height: int = Field(
        IMAGE_SIZE[0],
        ge=16,
        le=512,
        description="height images are decoded at, fitted on white: the "
        "input of a trained image tower (a CLIP model's processor "
        "resizes them further)",
    )
    image_width: int = Field(
        IMAGE_SIZE[1], ge=16, le=512, description="width images are decoded at (see image height)"
    )
    image_part_size: int = Field(
        DECODE_PART_SIZE,
        ge=1,
        description="products per part of image decoding (the unit of crash recovery and of a worker's task)",
    )
    heldout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of products held out of training for "
        "evaluation, chosen by a hash of the product id",
    )
    split_salt: str = Field("holdout", description="salt of the id hash that chooses the held-out products")
    attribute_queries: list[str] = Field(
        default_factory=lambda: list(DEFAULT_ATTRIBUTE_QUERIES),
        description="templates of attribute queries for evaluation; every product "
        "with a query's values is relevant",
    )
    group_field: str = Field(
        "articleType",
        description="field whose equal values make images relevant to each other (image -> image evaluation)",
    )
    showcase_queries: list[str] = Field(
        default_factory=list, description="free-text queries whose top images the picture report also shows"
    )
    train: ClipTrainConfig = Field(default_factory=ClipTrainConfig, description="training settings")
    model_name: str = Field(
        CATALOG_CLIP_MODEL_NAME, description="registry name the adapted model is saved under"
    )
    promote_metric: CATALOG_METRICS = Field(
        "attribute_ndcg@10", description="held-out metric the new model must improve to be promoted"
    )
    promote_min_delta: float = Field(
        0.0, ge=0, description="promote only when the promotion metric improves by more than this"
    )
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for run outputs (stages, models, reports)")

    @model_validator(mode="after")
    def _catalog_exists(self) -> ClipConfig:
        require_path(self.catalog, "a product catalog (CSV or Parquet)")
        return self


@flow(
    name="adapt-clip",
    description="Adapt an image/text model to a product catalog from its own images and texts.",
)
def adapt_clip_flow(config: ClipConfig) -> dict:
    """Pairs -> before -> train -> after -> register and gate -> picture report; returns paths and metrics."""
    from tasks.catalog.encoders import model_kind
    from tasks.catalog.pairs import check_catalog_columns
    from tasks.core.registry import Registry
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import check_writable

    logger = get_run_logger()
    check_writable(config.workspace)
    common = {"heldout_fraction": config.heldout_fraction, "split_salt": config.split_salt}
    evaluation = {
        **common,
        "attribute_templates": config.attribute_queries,
        "group_field": config.group_field,
        "workspace": config.workspace,
        "showcase_queries": config.showcase_queries,
    }
    image_size = (config.image_height, config.image_width)
    run_dir = config.workspace / "reports" / f"adapt-clip-{time.strftime('%Y%m%d-%H%M%S')}"
    watch = Stopwatch()

    # bad settings fail here, before any work: template fields, the model's name
    check_catalog_columns(
        config.catalog,
        config.caption_template,
        id_field=config.id_field,
        image_field=config.image_field,
        title_field=config.title_field,
        other_templates=[*config.train.extra_caption_templates, *config.attribute_queries],
    )
    kind = model_kind(config.model)
    with watch.stage("pairs (read, check, decode)") as stage, part_runner(config, config.workspace) as parts:
        # called in the flow, not as a task of its own: its parts are the tasks (on Dask, when asked)
        pairs = pairs_stage(
            config.catalog,
            config.workspace,
            caption_template=config.caption_template,
            id_field=config.id_field,
            title_field=config.title_field,
            image_field=config.image_field,
            image_root=config.image_root,
            image_size=image_size,
            decode_part_size=config.image_part_size,
            parts=parts,
        )
        stage["items"] = pairs.rows
    logger.info(
        "%d pairs; %d product(s) left out, %d image(s) converted to RGB",
        pairs.rows,
        len(pairs.bad),
        pairs.converted,
    )
    for bad in pairs.bad[:20]:
        logger.warning("left out product %s (line %s): %s", bad["doc_id"], bad["line"], bad["reason"])

    tower = tower_config(config.train, image_size).to_dict() if kind == "text" else None
    before_name = f"untrained image tower + {config.model}" if kind == "text" else f"{config.model} (before)"
    with watch.stage("evaluate before"):
        before = evaluate_catalog_model_task(
            config.model,
            str(pairs.path),
            run_dir / "before.json",
            system=before_name,
            tower=tower,
            seed=config.train.seed,
            **evaluation,
        )

    with watch.stage("train") as stage:
        trained = train_catalog_encoder_task(
            config.model,
            str(pairs.path),
            config.train,
            heldout_fraction=config.heldout_fraction,
            split_salt=config.split_salt,
            image_size=image_size,
            workspace=config.workspace,
        )
    result = trained["result"]
    stage["items"] = int(result["steps"] * min(config.train.batch_size, trained["trained_on"]))
    if trained["reused"]:
        watch.stages["train (reused)"] = watch.stages.pop("train")
    else:
        stage["seconds"] = result["seconds"]
    logger.info(
        "trained %.2f epochs in %.0f s (%.1f images/s); model at %s",
        result["epochs_done"],
        result["seconds"],
        result["images_per_second"],
        trained["model_dir"],
    )

    with watch.stage("evaluate after"):
        after = evaluate_catalog_model_task(
            trained["model_dir"],
            str(pairs.path),
            run_dir / "after.json",
            system="after training",
            **evaluation,
        )

    reports = [before["report"], after["report"]]
    registry = Registry(config.workspace)
    current_version = registry.current(config.model_name)
    current_score = before["metrics"][config.promote_metric]
    if current_version is not None:
        current = evaluate_catalog_model_task(
            str(registry.path(config.model_name)),
            str(pairs.path),
            run_dir / "current.json",
            system=f"current {config.model_name} {current_version}",
            **evaluation,
        )
        current_score = current["metrics"][config.promote_metric]
        reports.insert(1, current["report"])
    card = {
        "base_model": config.model,
        "data": str(config.catalog),
        "pairs_key": pairs.key,
        "config": config.model_dump(mode="json"),
        "metrics_before": before["metrics"],
        "metrics_after": after["metrics"],
        "train": result,
    }
    promotion = registry.register_and_gate(
        config.model_name,
        trained["model_dir"],
        card,
        new_score=after["metrics"][config.promote_metric],
        current_score=current_score,
        metric=config.promote_metric,
        min_delta=config.promote_min_delta,
    )
    logger.info("registered %s %s: %s", config.model_name, promotion.version, promotion.reason)

    notes = [
        f"Training: {result['epochs_done']} epochs ({result['steps']} steps of {config.train.batch_size} pairs) "
        f"in {result['seconds'] / 60:.1f} min, {result['images_per_second']:.1f} images/s, final temperature "
        f"{result['final_temperature']}"
        + ("; stopped by the time budget" if result["stopped_by_budget"] else "")
        + (
            f"; the {config.train.max_train_minutes:g}-minute budget planned {result['epochs_planned']} of the "
            f"{config.train.epochs} epochs asked"
            if result["epochs_planned"] < config.train.epochs
            else ""
        )
        + f". Loss curve: {md_code(trained['loss_plot'])}.",
        f"Registry: {md(config.model_name)} {promotion.version}: {md(promotion.reason)}.",
    ]
    published = publish_catalog_report_task(
        pairs.path,
        reports,
        run_dir,
        timings=watch.stages,
        notes=notes,
        attribute_templates=config.attribute_queries,
        group_field=config.group_field,
        **common,
    )
    return {
        "model_dir": trained["model_dir"],
        "version": promotion.version,
        "promoted": promotion.promoted,
        "promotion": promotion.reason,
        "metrics_before": before["metrics"],
        "metrics_after": after["metrics"],
        "report": published["markdown"],
        "grid": published["grid"],
        "reports": reports,
        "train": {k: v for k, v in result.items() if k != "losses"},
        "pairs": pairs.rows,
        "left_out": pairs.bad,
    }
