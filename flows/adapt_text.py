"""Flow: unsupervised adaptation of a bi-encoder to a corpus (GPL).

corpus -> queries -> negatives -> pseudo-labels (:class:`tasks.text.pipeline.LabelPipeline`) ->
MarginMSE training -> before/after -> register and gate -> report. Every stage's output goes through
the store, so a rerun with the same inputs does no work and a crash resumes at the last finished part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field, model_validator

from finetune.marginmse import TrainConfig
from flows.stages import progress_reporter, train_marginmse_task
from tasks.core.defaults import BASE_MODEL, DEFAULT_WORKSPACE, TEXT_MODEL_NAME
from tasks.core.settings import deep_merge, require_beir_split, require_path
from tasks.text.negatives import MineConfig
from tasks.text.pseudo_labels import LabelConfig
from tasks.text.queries import OFFLINE, QGenConfig

# The GPL paper's models, for users who have a hub (or these directories locally).
PRESETS: dict[str, dict[str, Any]] = {
    "offline": {},
    "gpl": {
        "base_model": "sentence-transformers/msmarco-distilbert-base-v3",
        "qgen": {
            "generator": "BeIR/query-gen-msmarco-t5-base-v1",
            "queries_per_doc": 3,
            "consistency_top_k": None,
        },
        "label": {"teacher": "cross-encoder/ms-marco-MiniLM-L-6-v2"},
    },
}


class AdaptTextConfig(BaseModel):
    """Settings of `adapt text` and of the `adapt-text` flow.

    ``preset`` fills the settings it names (see ``PRESETS``) wherever they are not given, however the
    config is made: the command line, a YAML file, a deployment parameter or a Python call.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    corpus: Path = Field(
        description="the corpus: a BEIR folder (corpus.jsonl) or a JSONL/CSV/TSV/Parquet file"
    )
    eval: Path | None = Field(
        None,
        description="BEIR folder with queries.jsonl and qrels/<eval-split>.tsv judging "
        "documents of the corpus (none: held-out generated queries)",
    )
    eval_split: str = Field("test", description="which qrels/<split>.tsv of --eval to use")
    preset: Literal["offline", "gpl"] = Field(
        "offline",
        description="offline: bundled MiniLM, offline generator and teacher; gpl: the GPL paper's hub models",
    )
    base_model: str = Field(
        BASE_MODEL, description="bi-encoder to adapt when the registry has no current version of --model-name"
    )
    model_name: str = Field(TEXT_MODEL_NAME, description="registry name the adapted model is saved under")
    continue_from_current: bool = Field(
        True, description="start from the registry's current version when there is one"
    )
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for stage outputs, models and reports")
    heldout_fraction: float = Field(
        0.1,
        gt=0,
        lt=0.5,
        description="without --eval: share of documents whose generated queries are held out for evaluation",
    )
    max_heldout_queries: int = Field(
        300, ge=10, description="without --eval: most held-out queries evaluated"
    )
    max_train_queries: int | None = Field(
        None, ge=1, description="train on at most this many generated queries (a seeded sample); none: all"
    )
    promote_min_delta: float = Field(
        0.0, ge=0, description="promote only when nDCG@10 improves by more than this"
    )
    eval_max_seq_length: int = Field(256, ge=8, le=8192, description="tokens per passage when evaluating")
    seed: int = Field(13, description="random seed for sampling and splitting")
    qgen: QGenConfig = Field(default_factory=QGenConfig, description="query generation")
    mine: MineConfig = Field(default_factory=MineConfig, description="negative mining")
    label: LabelConfig = Field(default_factory=LabelConfig, description="pseudo-labels")
    train: TrainConfig = Field(default_factory=TrainConfig, description="MarginMSE training")

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in PRESETS:
            return deep_merge(PRESETS[data["preset"]], data)
        return data

    @model_validator(mode="after")
    def _inputs_exist(self) -> AdaptTextConfig:
        require_path(self.corpus, "a BEIR folder or a JSONL/CSV/TSV/Parquet corpus", kind="corpus")
        if self.eval is not None:
            require_beir_split(self.eval, self.eval_split)
        return self


@flow(
    name="adapt-text",
    description="Unsupervised adaptation of a bi-encoder to a corpus (GPL), with promotion.",
)
def adapt_text_flow(config: AdaptTextConfig) -> dict:
    """Run every stage; returns the report (also saved as JSON and published as artifacts)."""
    from finetune.marginmse import TrainingRows, cached_student_margins
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.embeddings import EmbeddingCache
    from tasks.core.evaluation import evaluate_cached, heldout_eval_set
    from tasks.core.heldout import split_heldout_queries
    from tasks.core.index import INDEX_DIR, index_corpus
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.core.registry import Registry
    from tasks.core.report import publish_markdown
    from tasks.core.store import Store, stage_key
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import check_writable
    from tasks.text.pipeline import LabelPipeline, training_table
    from tasks.text.report import adaptation_report

    logger = get_run_logger()
    check_writable(config.workspace)
    watch, store, registry = Stopwatch(), Store(config.workspace), Registry(config.workspace)

    # --- inputs, checked here once (bad input stops before any work, with the file and line)
    corpus = watch.run("read corpus", None, read_corpus, config.corpus)
    watch.stages["read corpus"]["items"] = len(corpus)
    logger.info("corpus %s: %d documents (%d left out)", config.corpus, len(corpus), len(corpus.skipped))
    user_eval = (
        read_judged_queries(config.eval, config.eval_split, corpus) if config.eval is not None else None
    )
    for name in (config.qgen.generator, config.label.teacher):
        if name != OFFLINE:
            resolve_model(name)
    current = registry.current(config.model_name) if config.continue_from_current else None
    start_model = str(registry.path(config.model_name, current)) if current else config.base_model
    start = resolve_model(start_model)
    logger.info("starting model: %s", start.describe() if not current else f"{config.model_name} {current}")
    encoder = load_sentence_transformer(start)
    cache = EmbeddingCache(
        config.workspace,
        encoder,
        start.fingerprint,
        max_seq_length=config.mine.max_seq_length,
        batch_size=config.mine.batch_size,
    )

    # --- 1. queries
    pipeline = LabelPipeline(
        corpus,
        cache,
        store,
        start.fingerprint,
        config,
        watch=watch,
        progress=progress_reporter(logger),
    )
    queries_ref, queries = pipeline.queries()
    manifest = queries_ref.manifest
    logger.info("queries: %d kept of %d generated", len(queries), manifest.get("generated", len(queries)))
    if queries.empty:
        raise ValueError(
            "no query survived generation and filtering; lower qgen.consistency_top_k or check the corpus"
        )

    # --- evaluation set: the user's judgments, or generated queries of held-out documents
    if user_eval is not None:
        eval_data, train_queries = user_eval, queries
        eval_note = (
            f"the user's queries and judgments: {config.eval} [{config.eval_split}], "
            f"{len(eval_data.queries)} queries"
        )
    else:
        train_queries, heldout = split_heldout_queries(
            queries, config.heldout_fraction, config.max_heldout_queries, seed=config.seed
        )
        eval_data = heldout_eval_set(corpus, heldout)
        eval_note = (
            f"held-out generated queries ({len(heldout)} queries from {config.heldout_fraction:.0%} of the "
            "documents, never trained on; relevant = the document each was generated from)"
        )
    if config.max_train_queries and len(train_queries) > config.max_train_queries:
        train_queries = train_queries.sample(n=config.max_train_queries, random_state=config.seed)

    # --- 2. negatives, 3. labels, 4. training
    labels_ref, labels = pipeline.labels(queries_ref, sorted(train_queries["query_id"]))
    rows = TrainingRows.from_table(training_table(labels, queries, corpus))
    train_key = stage_key(
        "train", config.train.model_dump(mode="json"), inputs=[labels_ref.key], models=[start.fingerprint]
    )
    result = watch.run(
        "train",
        len(rows),
        train_marginmse_task,
        config.model_name,
        str(start.path),
        rows,
        config.train,
        str(config.workspace / "train" / train_key),
        student_margins=cached_student_margins(cache),
    )
    watch.stages["train"]["items"] = result.steps * config.train.batch_size

    # --- 5. evaluate before/after, register and gate
    eval_length = config.eval_max_seq_length
    before_cache = (
        cache
        if eval_length == cache.max_seq_length
        else EmbeddingCache(config.workspace, encoder, start.fingerprint, max_seq_length=eval_length)
    )
    before = watch.run(
        "evaluate before",
        len(eval_data.queries),
        evaluate_cached,
        before_cache,
        eval_data,
        f"before: {current or config.base_model}",
        progress=progress_reporter(logger)("evaluation before: encoding the corpus"),
    )
    trained = load_sentence_transformer(str(result.model_dir))
    after_cache = EmbeddingCache(
        config.workspace,
        trained,
        resolve_model(str(result.model_dir)).fingerprint,
        max_seq_length=eval_length,
    )
    after = watch.run(
        "evaluate after",
        len(eval_data.queries),
        evaluate_cached,
        after_cache,
        eval_data,
        "after: adapted",
        progress=progress_reporter(logger)("evaluation after: encoding the corpus"),
    )
    decision = registry.register_and_gate(
        config.model_name,
        result.model_dir,
        {
            "base_model": config.base_model,
            "parent_version": current,
            "start_model": start_model,
            "data_key": corpus.key,
            "labels_key": labels_ref.key,
            "config": json.loads(config.model_dump_json()),
            "metrics_before": before.metrics,
            "metrics_after": after.metrics,
            "eval_set": eval_note,
            "kind": "sentence-transformer",
        },
        new_score=after.primary,
        current_score=before.primary,
        metric="nDCG@10",
        min_delta=config.promote_min_delta,
    )
    logger.info("%s %s: %s", config.model_name, decision.version, decision.reason)
    if (
        decision.promoted
    ):  # the new current serves searches: its index goes next to it (embeddings are cached)
        watch.run(
            "search index",
            len(corpus),
            index_corpus,
            trained,
            corpus,
            registry.path(config.model_name, decision.version) / INDEX_DIR,
            cache=after_cache,
            max_seq_length=eval_length,
        )

    # --- report
    summary = adaptation_report(
        workspace=Path(config.workspace),
        model_name=config.model_name,
        corpus=corpus,
        queries=queries,
        manifest=manifest,
        eval_data=eval_data,
        eval_note=eval_note,
        before=before,
        after=after,
        result=result,
        version=decision.version,
        decision=decision,
        stages=watch.stages,
        total_seconds=watch.total(),
    )
    publish_markdown(
        summary["markdown"], key="adapt-text-report", description="before/after, examples, timings"
    )
    logger.info("report written to %s", summary["report"])
    return summary
