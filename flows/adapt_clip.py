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

from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field

from finetune.clip import ClipTrainConfig, tower_config, train_stage
from tasks.catalog_report import evaluate_catalog_model_task, publish_catalog_report_task
from tasks.evaluate import DEFAULT_ATTRIBUTE_QUERIES
from tasks.pairs import DEFAULT_CAPTION_TEMPLATE, pairs_task

DEFAULT_WORKSPACE = Path("adapt-workspace")
CATALOG_METRICS = Literal["attribute_ndcg@10", "caption_recall@10", "caption_mrr", "image_precision@10"]


class ClipConfig(BaseModel):
    """Settings of `adapt clip` and of the `adapt-clip` flow."""

    model_config = ConfigDict(extra="forbid")

    catalog: Path = Field(
        description="product catalog: CSV or Parquet with an id column, text fields and an image "
        "file column (like data/fashion-sample/styles.csv)"
    )
    model: str = Field(
        "all-MiniLM-L6-v2",
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
        80,
        ge=16,
        le=512,
        description="height images are decoded at, fitted on white: the "
        "input of a trained image tower (a CLIP model's processor "
        "resizes them further)",
    )
    image_width: int = Field(60, ge=16, le=512, description="width images are decoded at (see image height)")
    holdout_fraction: float = Field(
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
    registry_name: str = Field("catalog-clip", description="name of the model in the workspace's registry")
    promote_metric: CATALOG_METRICS = Field(
        "attribute_ndcg@10", description="held-out metric the new model must improve to be promoted"
    )
    min_delta: float = Field(
        0.0, ge=0, description="improvement the promotion needs beyond the current score"
    )
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for run outputs (stages, models, reports)")


@task(name="train-catalog-encoder", task_run_name="train from {model}")
def train_task(model: str, pairs_path: str, config: ClipConfig) -> dict:
    logger = get_run_logger()
    every = max(1, config.train.checkpoint_every)

    def on_step(step: int, loss: float) -> None:
        if step % every == 0:
            logger.info("step %d: loss %.4f", step, loss)

    return train_stage(
        model,
        pairs_path,
        config.train,
        holdout_fraction=config.holdout_fraction,
        split_salt=config.split_salt,
        image_size=(config.image_height, config.image_width),
        workspace=config.workspace,
        on_step=on_step,
    )


@task(name="register-and-promote")
def register_and_promote_task(
    config: ClipConfig, model_dir: str, card: dict, new_score: float, current_score: float
) -> dict:
    from tasks.registry import Registry

    registry = Registry(config.workspace)
    version = registry.register(config.registry_name, model_dir, card)
    decision = registry.promote_if_better(
        config.registry_name,
        version,
        new_score=new_score,
        current_score=current_score,
        metric=config.promote_metric,
        min_delta=config.min_delta,
    )
    return {
        "version": version,
        "promoted": decision.promoted,
        "reason": decision.reason,
        "path": str(registry.path(config.registry_name, version)),
    }


@flow(
    name="adapt-clip",
    description="Adapt an image/text model to a product catalog from its own images and texts.",
)
def adapt_clip_flow(config: ClipConfig) -> dict:
    """Pairs -> before -> train -> after -> register/promote -> picture report; returns paths and metrics."""
    from tasks.image_text import model_kind
    from tasks.pairs import check_catalog_columns
    from tasks.registry import Registry

    logger = get_run_logger()
    common = {"holdout_fraction": config.holdout_fraction, "split_salt": config.split_salt}
    evaluation = {
        **common,
        "attribute_templates": config.attribute_queries,
        "group_field": config.group_field,
        "workspace": config.workspace,
        "showcase_queries": config.showcase_queries,
    }
    image_size = (config.image_height, config.image_width)
    run_dir = config.workspace / "reports" / f"adapt-clip-{time.strftime('%Y%m%d-%H%M%S')}"
    timings: dict[str, dict] = {}

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
    began = time.time()
    pairs = pairs_task(
        config.catalog,
        config.workspace,
        caption_template=config.caption_template,
        id_field=config.id_field,
        title_field=config.title_field,
        image_field=config.image_field,
        image_root=config.image_root,
        image_size=image_size,
    )
    timings["pairs (read, check, decode)"] = {"seconds": time.time() - began, "items": pairs.rows}
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
    began = time.time()
    before = evaluate_catalog_model_task(
        config.model,
        str(pairs.path),
        run_dir / "before.json",
        system=before_name,
        tower=tower,
        seed=config.train.seed,
        **evaluation,
    )
    timings["evaluate before"] = {"seconds": time.time() - began}

    began = time.time()
    trained = train_task(config.model, str(pairs.path), config)
    result = trained["result"]
    timings["train" + (" (reused)" if trained["reused"] else "")] = {
        "seconds": time.time() - began if trained["reused"] else result["seconds"],
        "items": int(result["steps"] * min(config.train.batch_size, trained["trained_on"])),
    }
    logger.info(
        "trained %.2f epochs in %.0f s (%.1f images/s); model at %s",
        result["epochs_done"],
        result["seconds"],
        result["images_per_second"],
        trained["model_dir"],
    )

    began = time.time()
    after = evaluate_catalog_model_task(
        trained["model_dir"], str(pairs.path), run_dir / "after.json", system="after training", **evaluation
    )
    timings["evaluate after"] = {"seconds": time.time() - began}

    reports = [before["report"], after["report"]]
    registry = Registry(config.workspace)
    current_version = registry.current(config.registry_name)
    current_score = before["metrics"][config.promote_metric]
    if current_version is not None:
        current = evaluate_catalog_model_task(
            str(registry.path(config.registry_name)),
            str(pairs.path),
            run_dir / "current.json",
            system=f"current {config.registry_name} {current_version}",
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
    promotion = register_and_promote_task(
        config, trained["model_dir"], card, after["metrics"][config.promote_metric], current_score
    )
    logger.info("registered %s %s: %s", config.registry_name, promotion["version"], promotion["reason"])

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
        + f". Loss curve: `{trained['loss_plot']}`.",
        f"Registry: {config.registry_name} {promotion['version']}: {promotion['reason']}.",
    ]
    published = publish_catalog_report_task(
        pairs.path,
        reports,
        run_dir,
        timings=timings,
        notes=notes,
        attribute_templates=config.attribute_queries,
        group_field=config.group_field,
        **common,
    )
    return {
        "model_dir": trained["model_dir"],
        "version": promotion["version"],
        "promoted": promotion["promoted"],
        "promotion": promotion["reason"],
        "metrics_before": before["metrics"],
        "metrics_after": after["metrics"],
        "report": published["markdown"],
        "grid": published["grid"],
        "reports": reports,
        "train": {k: v for k, v in result.items() if k != "losses"},
        "pairs": pairs.rows,
        "left_out": pairs.bad,
    }
