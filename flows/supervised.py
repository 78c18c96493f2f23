"""Flow: supervised fine-tuning from labels (pairs, groups or query/positive rows), optionally with a
hyper-parameter search, evaluated before and after and promoted through the registry's gate; or, from
judged queries over a corpus (a BEIR split, a click log), the query side trained against the corpus
(:mod:`flows.judged`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import ConfigDict, Field, model_validator

from finetune.hparam_search import SearchSettings
from finetune.judged_search import JudgedSearchSettings
from finetune.listwise import JudgedListwiseConfig
from finetune.supervised import TrainSettings
from flows.judged import is_judged, run_judged
from flows.stages import (
    evaluate_prepared_task,
    prepare_labelled_task,
    search_supervised_task,
    train_supervised_task,
)
from tasks.core.defaults import DEFAULT_WORKSPACE, SUPERVISED_MODEL_NAME
from tasks.core.evaluation import MEASURES
from tasks.core.markdown import md, md_code
from tasks.core.report import publish_markdown
from tasks.core.settings import require_beir_split, require_path
from tasks.labelled.evaluation import PAIR_METRICS
from tasks.text.lists import ListConfig
from tasks.text.pseudo_labels import LabelConfig

METRICS = tuple(MEASURES) + tuple(f"pair {m}" for m in PAIR_METRICS)


class SupervisedConfig(JudgedSearchSettings, SearchSettings, TrainSettings):
    """Settings of `adapt supervised` and of the `supervised` flow."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    train: Path = Field(
        description="labelled training file (.tsv/.csv/.jsonl/.parquet): pairs (text1, text2, label "
        "0/1, e.g. Quora's question1, question2, is_duplicate), groups (text, label) or "
        "query, positive[, negative] rows; or judged queries over a corpus: a BEIR folder "
        "(corpus.jsonl, queries.jsonl, qrels/<train-split>.tsv), or a click log (query, doc_id"
        "[, clicks] rows) with --corpus"
    )
    eval: Path | None = Field(
        None,
        description="labelled evaluation file of the same layout (judged queries: a BEIR folder with "
        "queries.jsonl and qrels/<eval-split>.tsv over the same corpus); none: carve --eval-fraction "
        "of the training rows (judged queries: of the queries), with nothing shared",
    )
    corpus: Path | None = Field(
        None,
        description="judged queries: the corpus a click log's doc_ids name (a BEIR folder or a "
        "JSONL/CSV/TSV/Parquet corpus); none: --train is a BEIR folder with its corpus.jsonl",
    )
    train_split: str = Field("train", description="judged queries: which qrels/<split>.tsv of --train")
    eval_split: str = Field("test", description="judged queries: which qrels/<split>.tsv of --eval")
    with_pseudo_labels: bool = Field(
        False,
        description="judged queries: also train on the generated queries and teacher lists of `adapt "
        "text` for the same corpus (read from the workspace's store when that ran; else made)",
    )
    serve_mode: Literal["auto", "dense", "hybrid"] = Field(
        "auto",
        description="judged queries: what the new version serves and the gate compares: dense, hybrid "
        "(dense + BM25), or auto: whichever measures better after training",
    )
    eval_max_seq_length: int = Field(
        256, ge=8, le=8192, description="judged queries: tokens per passage when evaluating"
    )
    label: LabelConfig = Field(
        default_factory=LabelConfig, description="judged queries: the teacher and the hybrid's BM25 weight"
    )
    lists: ListConfig = Field(
        default_factory=ListConfig,
        description="judged queries: candidate lists (the teacher's top documents)",
    )
    listwise: JudgedListwiseConfig = Field(
        default_factory=JudgedListwiseConfig,
        description="judged queries: training of the query side against the corpus's cached embeddings",
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
    model_name: str = Field(
        SUPERVISED_MODEL_NAME, description="registry name the fine-tuned model is saved under"
    )
    promote: bool = Field(
        True, description="make the new version current if it beats the current one on --metric"
    )
    promote_min_delta: float = Field(
        0.0, ge=0, description="promote only when --metric improves by more than this"
    )
    eval_batch_size: int = Field(64, ge=1, description="encoding batch size for evaluation")
    workspace: Path = Field(
        DEFAULT_WORKSPACE, description="folder for run outputs, studies and the model registry"
    )
    output: Path | None = Field(
        None, description="JSON report path; none means <workspace>/reports/supervised-<time>.json"
    )

    @model_validator(mode="after")
    def _inputs_exist(self) -> SupervisedConfig:
        require_path(self.train, "a labelled training file, a BEIR folder or a click log")
        if self.corpus is not None:
            require_path(self.corpus, "a BEIR folder or a JSONL/CSV/TSV/Parquet corpus", kind="corpus")
        if Path(self.train).is_dir():
            require_beir_split(self.train, self.train_split)
            if self.corpus is None:
                require_path(Path(self.train) / "corpus.jsonl", "the corpus of the BEIR folder (or --corpus)")
        if self.eval is not None:
            if is_judged(self):
                require_beir_split(self.eval, self.eval_split)
            else:
                require_path(self.eval, "a labelled evaluation file")
        return self

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self.model_dump(include=set(TrainSettings.model_fields)))

    def search_settings(self) -> SearchSettings:
        return SearchSettings(**self.model_dump(include=set(SearchSettings.model_fields)))


@flow(
    name="supervised",
    description="Fine-tune an embedding model from labels, optionally with a hyper-parameter "
    "search; evaluate before and after; promote through the registry's gate.",
)
def supervised_flow(config: SupervisedConfig) -> dict:
    """Prepare the splits, train (or search), evaluate before/after, register and gate, report."""
    from finetune.hparam_report import trials_markdown
    from finetune.hparam_search import SearchResult
    from tasks.core.models import resolve_model
    from tasks.core.registry import Registry
    from tasks.core.report import timings_markdown
    from tasks.core.store import write_json_atomic
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import check_writable
    from tasks.labelled.eval_set import build_eval_set
    from tasks.labelled.evaluation import LabelledReport, labelled_markdown

    logger = get_run_logger()
    if is_judged(config):
        return run_judged(config, logger)
    check_writable(config.workspace)
    watch = Stopwatch()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = config.workspace / "runs" / f"supervised-{stamp}"
    base, space = config.train_settings(), config.search_settings()
    for name in dict.fromkeys([config.model, *config.search_models]):  # an unknown model stops here
        resolve_model(name)

    with watch.stage("prepare") as stage:
        prepared = prepare_labelled_task(
            config.train,
            config.workspace,
            eval_file=config.eval,
            layout=config.layout,
            eval_fraction=config.eval_fraction,
            validation_fraction=space.search_validation_fraction if config.search else None,
            seed=config.seed,
        )
        stage["items"] = sum(prepared.rows.values())
    logger.info(
        "%s: %s rows %s; evaluation %s", config.train, prepared.kind, prepared.rows, prepared.eval_source
    )
    if prepared.shared_texts:
        logger.warning("%d texts are in both the training and the evaluation file", prepared.shared_texts)

    def evaluate(model: str, system: str, tag: str) -> LabelledReport:
        with watch.stage(f"evaluate {tag}", prepared.rows["eval"]):
            result = evaluate_prepared_task(
                model,
                prepared,
                run_dir / f"eval-{tag}.json",
                system=system,
                batch_size=config.eval_batch_size,
                max_seq_length=config.max_seq_length,
                seed=config.seed,
            )
        return LabelledReport.load(result["report"])

    before = evaluate(config.model, f"{Path(config.model).name} (base)", "before")

    search: SearchResult | None = None
    search_info: dict[str, Any] = {}
    if config.search:
        with watch.stage("search"):
            search_info = search_supervised_task(
                prepared, base, space, str(config.workspace / "search"), config.metric
            )
        search = SearchResult.from_dict(
            {k: v for k, v in search_info.items() if k not in {"plot", "study_dir"}}
        )
        watch.stages["search"]["items"] = len(search.trials)
        best = base.model_copy(update=search.best_params)
        if space.search_refit:
            with watch.stage("refit") as stage:
                trained = train_supervised_task(prepared, best, str(run_dir / "model"), "train+validation")
                stage["items"] = trained["rows"]
            model_dir = trained["model_dir"]
        else:
            model_dir = search.best_model_dir
            trained = {"loss": best.resolved_loss(prepared.kind), "settings": best.model_dump(mode="json")}
        settings_used = best
    else:
        with watch.stage("train") as stage:
            trained = train_supervised_task(prepared, base, str(run_dir / "model"), "train")
            stage["items"] = trained["rows"]
        model_dir = trained["model_dir"]
        settings_used = base
    after = evaluate(model_dir, f"fine-tuned ({trained['loss']})", "after")

    registry = Registry(config.workspace)
    current = registry.current(config.model_name)
    current_score = before.metric(config.metric)
    if current is not None:
        current_report = evaluate(
            str(registry.path(config.model_name)), f"{config.model_name} {current} (current)", "current"
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
        "search": search.card() if search else None,
    }
    promotion = registry.register_and_gate(
        config.model_name,
        model_dir,
        card,
        new_score=after.metric(config.metric),
        current_score=current_score,
        metric=config.metric,
        min_delta=config.promote_min_delta,
        promote=config.promote,
    )
    version, decision, promoted = promotion.version, promotion.reason, promotion.promoted
    logger.info("registered %s %s; %s", config.model_name, version, decision)

    eval_set = build_eval_set(prepared.load("eval"), seed=config.seed)
    watch.stages["total"] = {"seconds": watch.total()}
    sections = [
        f"# Supervised fine-tuning: {md(config.model_name)} {version}",
        f"Training: {md_code(config.train)} ({prepared.kind}, {prepared.rows['train']} rows"
        + (f", {prepared.rows['validation']} held out to score search trials" if config.search else "")
        + f"); evaluation: {md(prepared.eval_source)} ({prepared.rows['eval']} rows). Loss: {trained['loss']}; "
        f"base model: {md(settings_used.model)}.",
        f"**Promotion**: {md(decision)}.",
        labelled_markdown(before, after, eval_set),
    ]
    if search is not None:
        sections += [
            f"**Search** ({len(search.trials)} trials, study `{search.study_name}`"
            + (", resumed" if search.resumed else "")
            + f"; {config.metric} on the validation rows; "
            f"plot: {md_code(search_info['plot'])})",
            trials_markdown(search),
        ]
    sections += ["**Timings**", timings_markdown(watch.stages)]
    markdown = "\n\n".join(sections)
    output = config.output or config.workspace / "reports" / f"supervised-{stamp}.json"
    result = {
        "report": str(output),
        "name": config.model_name,
        "version": version,
        "promoted": promoted,
        "decision": decision,
        "metric": config.metric,
        "model_dir": str(registry.path(config.model_name, version)),
        "kind": prepared.kind,
        "rows": prepared.rows,
        "eval": prepared.eval_source,
        "loss": trained["loss"],
        "settings": settings_used.model_dump(mode="json"),
        "training": {
            "steps": trained.get("steps"),
            "seconds": trained.get("seconds"),
            "processes": trained.get("processes", 1),
        },
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "search": search_info or None,
        "timings": watch.stages,
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
