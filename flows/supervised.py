"""Flow: supervised fine-tuning from labels (pairs, groups or query/positive rows), optionally with a
hyper-parameter search, evaluated before and after and promoted through the registry's gate."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from pydantic import ConfigDict, Field

from finetune.search import SearchSettings
from finetune.supervised import TrainSettings
from tasks.evaluate import MEASURES, publish_markdown
from tasks.labelled import PAIR_METRICS, PreparedData, evaluate_prepared_task, prepare_labelled_task

DEFAULT_WORKSPACE = Path("adapt-workspace")
METRICS = tuple(MEASURES) + tuple(f"pair {m}" for m in PAIR_METRICS)


class SupervisedConfig(SearchSettings, TrainSettings):
    """Settings of `adapt supervised` and of the `supervised` flow."""

    model_config = ConfigDict(extra="forbid")

    train: Path = Field(
        description="labelled training file (.tsv/.csv/.jsonl/.parquet): pairs (text1, text2, label "
        "0/1, e.g. Quora's question1, question2, is_duplicate), groups (text, label) or "
        "query, positive[, negative] rows"
    )
    eval: Path | None = Field(
        None,
        description="labelled evaluation file of the same layout; none: carve "
        "--eval-fraction of the training rows, with no text shared",
    )
    layout: Literal["auto", "pairs", "groups", "triplets"] = Field(
        "auto", description="layout of the files; auto: told from the column names"
    )
    eval_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of the training rows carved off for evaluation when no --eval file is given",
    )
    metric: Literal[METRICS] = Field(  # type: ignore[valid-type]
        "nDCG@10",
        description="what the search maximises (on its validation rows) and the promotion gate compares",
    )
    name: str = Field("supervised", description="model name in the registry (<workspace>/models/<name>/)")
    promote: bool = Field(
        True, description="make the new version current if it beats the current one on --metric"
    )
    eval_batch_size: int = Field(64, ge=1, description="encoding batch size for evaluation")
    workspace: Path = Field(
        DEFAULT_WORKSPACE, description="folder for run outputs, studies and the model registry"
    )
    output: Path | None = Field(
        None, description="JSON report path; none means <workspace>/reports/supervised-<time>.json"
    )

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self.model_dump(include=set(TrainSettings.model_fields)))

    def search_settings(self) -> SearchSettings:
        return SearchSettings(**self.model_dump(include=set(SearchSettings.model_fields)))


# Thin tasks over finetune/ (which has no Prefect in it). They take and return paths and small
# metadata; the rows are read from the prepared Parquet files.


def _train(
    prepared: PreparedData, settings: TrainSettings, output_dir: str, split: str = "train"
) -> dict[str, Any]:
    from finetune.supervised import train_supervised

    return train_supervised(prepared.load(split), settings, output_dir).to_dict()


def _search(
    prepared: PreparedData, base: TrainSettings, space: SearchSettings, workdir: str, metric: str
) -> dict:
    from finetune.search import plot_trials, run_search, save_result
    from tasks.labelled import build_eval_set

    validation = build_eval_set(prepared.load("validation"), seed=base.seed)
    result = run_search(
        prepared.load("train"), validation, base=base, space=space, workdir=workdir, metric=metric
    )
    study_dir = Path(workdir) / result.study_name
    save_result(result, study_dir / "result.json")
    plot = plot_trials(result, study_dir / "trials.png")
    return {**result.to_dict(), "plot": str(plot), "study_dir": str(study_dir)}


train_task = task(_train, name="train-supervised", task_run_name="train {settings.model}")
search_task = task(_search, name="search-supervised")


@flow(
    name="supervised",
    description="Fine-tune an embedding model from labels, optionally with a hyper-parameter "
    "search; evaluate before and after; promote through the registry's gate.",
)
def supervised_flow(config: SupervisedConfig) -> dict:
    """Prepare the splits, train (or search), evaluate before/after, register and gate, report."""
    from finetune.search import SearchResult, trials_markdown
    from tasks.labelled import LabelledReport, build_eval_set, labelled_markdown
    from tasks.registry import Registry
    from tasks.report import timings_markdown
    from tasks.store import write_json_atomic

    logger = get_run_logger()
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = config.workspace / "runs" / f"supervised-{stamp}"
    timings: dict[str, dict[str, Any]] = {}
    base, space = config.train_settings(), config.search_settings()
    space.check()

    clock = time.time()
    prepared = prepare_labelled_task(
        config.train,
        config.workspace,
        eval_file=config.eval,
        layout=config.layout,
        eval_fraction=config.eval_fraction,
        validation_fraction=space.search_validation_fraction if config.search else None,
        seed=config.seed,
    )
    timings["prepare"] = {"seconds": time.time() - clock, "items": sum(prepared.rows.values())}
    logger.info(
        "%s: %s rows %s; evaluation %s", config.train, prepared.kind, prepared.rows, prepared.eval_source
    )
    if prepared.shared_texts:
        logger.warning("%d texts are in both the training and the evaluation file", prepared.shared_texts)

    def evaluate(model: str, system: str, tag: str) -> LabelledReport:
        clock = time.time()
        result = evaluate_prepared_task(
            model,
            prepared,
            run_dir / f"eval-{tag}.json",
            system=system,
            batch_size=config.eval_batch_size,
            max_seq_length=config.max_seq_length,
            seed=config.seed,
        )
        timings[f"evaluate {tag}"] = {"seconds": time.time() - clock, "items": prepared.rows["eval"]}
        return LabelledReport.load(result["report"])

    before = evaluate(config.model, f"{Path(config.model).name} (base)", "before")

    search: SearchResult | None = None
    search_info: dict[str, Any] = {}
    clock = time.time()
    if config.search:
        search_info = search_task(prepared, base, space, str(config.workspace / "search"), config.metric)
        search = SearchResult.from_dict(
            {k: v for k, v in search_info.items() if k not in {"plot", "study_dir"}}
        )
        timings["search"] = {"seconds": time.time() - clock, "items": len(search.trials)}
        best = base.model_copy(update=search.best_params)
        if space.search_refit:
            clock = time.time()
            trained = train_task(prepared, best, str(run_dir / "model"), "train+validation")
            model_dir = trained["model_dir"]
            timings["refit"] = {"seconds": time.time() - clock, "items": trained["rows"]}
        else:
            model_dir = search.best_model_dir
            trained = {"loss": best.resolved_loss(prepared.kind), "settings": best.model_dump(mode="json")}
        settings_used = best
    else:
        trained = train_task(prepared, base, str(run_dir / "model"), "train")
        model_dir = trained["model_dir"]
        settings_used = base
        timings["train"] = {"seconds": time.time() - clock, "items": trained["rows"]}
    after = evaluate(model_dir, f"fine-tuned ({trained['loss']})", "after")

    registry = Registry(config.workspace)
    current = registry.current(config.name)
    current_score = before.metric(config.metric)
    if current is not None:
        current_report = evaluate(
            str(registry.path(config.name)), f"{config.name} {current} (current)", "current"
        )
        current_score = current_report.metric(config.metric)
    card = {
        "base_model": settings_used.model,
        "loss": trained["loss"],
        "data_key": prepared.key,
        "train": str(config.train),
        "eval": prepared.eval_source,
        "config": config.model_dump(mode="json"),
        "settings": settings_used.model_dump(mode="json"),
        "metric": config.metric,
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "search": {
            "study": search.study_name,
            "best_trial": search.best_trial,
            "best_params": search.best_params,
        }
        if search
        else None,
    }
    version = registry.register(config.name, model_dir, card)
    if config.promote:
        promotion = registry.promote_if_better(
            config.name,
            version,
            new_score=after.metric(config.metric),
            current_score=current_score,
            metric=config.metric,
        )
        decision = promotion.reason
        promoted = promotion.promoted
    else:
        decision, promoted = "not promoted: --no-promote", False
    logger.info("registered %s %s; %s", config.name, version, decision)

    eval_set = build_eval_set(prepared.load("eval"), seed=config.seed)
    timings["total"] = {"seconds": time.time() - started}
    sections = [
        f"# Supervised fine-tuning: {config.name} {version}",
        f"Training: `{config.train}` ({prepared.kind}, {prepared.rows['train']} rows"
        + (f", {prepared.rows['validation']} held out to score search trials" if config.search else "")
        + f"); evaluation: {prepared.eval_source} ({prepared.rows['eval']} rows). Loss: {trained['loss']}; "
        f"base model: {settings_used.model}.",
        f"**Promotion**: {decision}.",
        labelled_markdown(before, after, eval_set),
    ]
    if search is not None:
        sections += [
            f"**Search** ({len(search.trials)} trials, study `{search.study_name}`"
            + (", resumed" if search.resumed else "")
            + f"; {config.metric} on the validation rows; "
            f"plot: `{search_info['plot']}`)",
            trials_markdown(search),
        ]
    sections += ["**Timings**", timings_markdown(timings)]
    markdown = "\n\n".join(sections)
    output = config.output or config.workspace / "reports" / f"supervised-{stamp}.json"
    result = {
        "report": str(output),
        "name": config.name,
        "version": version,
        "promoted": promoted,
        "decision": decision,
        "metric": config.metric,
        "model_dir": str(registry.path(config.name, version)),
        "kind": prepared.kind,
        "rows": prepared.rows,
        "eval": prepared.eval_source,
        "loss": trained["loss"],
        "settings": settings_used.model_dump(mode="json"),
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "search": search_info or None,
        "timings": timings,
        "markdown": markdown,
    }
    write_json_atomic(Path(output), result)
    publish_markdown(markdown, key="supervised-report", description="metrics before/after, examples, trials")
    if search is not None:
        publish_markdown(
            f"# Search trials\n\n{trials_markdown(search)}",
            key="supervised-search-trials",
            description="hyper-parameter search trials",
        )
    logger.info("report written to %s", output)
    return {k: v for k, v in result.items() if k not in {"before", "after"}}
