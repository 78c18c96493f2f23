"""Flow: incremental refresh of a catalog's text retriever (the nightly `catalog-refresh` deployment).

Each run compares the catalog with the snapshot of the last finished run by content hash
(:mod:`tasks.text.refresh`):

* **new and changed** products go through query generation, negative mining and labelling (the
  stages are keyed by the content of just those products, so nothing else is generated again);
* **removed** products leave the search index and the training set (their old labels are dropped);
* **unchanged** products are never regenerated; their embeddings come from the embedding cache.

The student continues from the registry's current version, trains on the new labels plus a replay
sample of earlier ones, and is promoted only if it beats the current version on held-out queries
(generated from a fixed hash-chosen slice of the products that is never trained on).

What it trains: the first run (nothing adapted serves yet) fine-tunes both towers, i.e. the whole
bi-encoder, and indexes the catalog with it. Later refreshes (``refresh_towers="query"``, the
default) adapt only the query side: the passages keep the serving version's document embeddings
(from the cache), so neither training, evaluation nor the index needs the catalog encoded again, and
a refresh costs in proportion to the change, not to the catalog. Such a version's card names its
``document_model``; search encodes documents with it. Once ``full_retrain_share`` of the catalog
has been added or changed since the document encoder was trained, a refresh trains both towers again.

A run with no change does no model work and says so. The whole run holds a lock: a second refresh of the same
model waits, then fails cleanly. The snapshot is written last, so a crash leaves the previous one
and the next run redoes the same delta from the store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import ConfigDict, Field

from finetune.marginmse import TrainConfig
from flows.engine import part_runner
from flows.stages import progress_reporter, train_marginmse_task, train_query_side_task
from tasks.core.defaults import BASE_MODEL, CATALOG_TEXT_MODEL_NAME, DEFAULT_WORKSPACE
from tasks.core.parts import LOCAL, EngineSettings, encode_part_size_field
from tasks.text.negatives import MineConfig
from tasks.text.pseudo_labels import LabelConfig
from tasks.text.queries import QGenConfig
from tasks.text.refresh import RefreshLockedError, refresh_lock

__all__ = ["RefreshConfig", "RefreshLockedError", "catalog_refresh_flow"]


class RefreshTrainConfig(TrainConfig):
    """MarginMSE training of a refresh: a nightly run is bounded in time by default."""

    time_budget_minutes: float | None = Field(
        30.0, gt=0, description="stop (and keep the model) after this many minutes of training"
    )


class RefreshConfig(EngineSettings):
    """Settings of `adapt refresh` and of the `catalog-refresh` flow."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    catalog: Path = Field(
        description="the catalog (CSV/TSV/Parquet with an image column) or a corpus file/folder"
    )
    image_root: Path | None = Field(
        None,
        description="folder of the image files; none: look next to the catalog, then in its images/ folder",
    )
    model_name: str = Field(
        CATALOG_TEXT_MODEL_NAME, description="registry name of the catalog's text retriever"
    )
    base_model: str = Field(BASE_MODEL, description="model to start from before anything is promoted")
    workspace: Path = Field(
        DEFAULT_WORKSPACE, description="folder for stage outputs, models, snapshots, reports"
    )
    heldout_fraction: float = Field(
        0.1,
        gt=0,
        le=0.5,
        description="share of the products (chosen by a hash of "
        "the id, the same every run) whose queries only evaluate, never train",
    )
    max_heldout_queries: int = Field(500, ge=10, description="most held-out queries evaluated")
    replay_ratio: float = Field(
        1.0,
        ge=0,
        description="earlier training queries (of products still unchanged) "
        "mixed in per new one, so the model does not forget them; "
        "it keeps a refresh's cost proportional to the change",
    )
    max_seq_length: int = Field(
        128, ge=8, le=8192, description="tokens per product text (index, mining, evaluation)"
    )
    refresh_towers: Literal["query", "both"] = Field(
        "query",
        description="what a refresh trains once an adapted version serves: 'query' adapts only the "
        "query side against the catalog embeddings of the serving version's document encoder "
        "(they stay valid, so nothing is re-encoded: a refresh costs little); 'both' "
        "fine-tunes the whole model (the catalog is encoded again to evaluate and index it)",
    )
    full_retrain_share: float = Field(
        0.1,
        ge=0,
        le=1,
        description="with refresh-towers 'query': once this share "
        "of the catalog has been added or changed since the document encoder was "
        "trained, the next refresh trains both towers",
    )
    promote_min_delta: float = Field(
        0.0, ge=0, description="promote only when nDCG@10 improves by more than this"
    )
    lock_timeout_seconds: float = Field(
        1800.0, ge=0, description="how long a second refresh waits for a running one"
    )
    seed: int = Field(13, description="random seed")
    encode_part_size: int = encode_part_size_field()
    qgen: QGenConfig = Field(default_factory=QGenConfig, description="query generation")
    mine: MineConfig = Field(default_factory=MineConfig, description="negative mining")
    label: LabelConfig = Field(default_factory=LabelConfig, description="pseudo-labels")
    train: RefreshTrainConfig = Field(default_factory=RefreshTrainConfig, description="MarginMSE training")


@flow(name="catalog-refresh", description="Incremental nightly adaptation of a catalog's text retriever.")
def catalog_refresh_flow(config: RefreshConfig) -> dict:
    """Delta -> queries/labels of the delta -> train on them plus replay -> gate -> index -> snapshot."""
    from tasks.core.workspace import check_writable

    check_writable(config.workspace)
    folder = Path(config.workspace) / "refresh" / config.model_name
    with refresh_lock(folder, config.lock_timeout_seconds):
        return _refresh(config, folder)


def _refresh(config: RefreshConfig, folder: Path) -> dict:
    from finetune.marginmse import TrainingRows, cached_student_margins
    from tasks.core.corpus import Corpus
    from tasks.core.embeddings import EmbeddingCache, cache_for
    from tasks.core.evaluation import evaluate_cached, heldout_eval_set
    from tasks.core.heldout import split_heldout_queries
    from tasks.core.index import INDEX_DIR, index_corpus
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.core.products import read_products
    from tasks.core.registry import Registry
    from tasks.core.store import Store, stage_key, write_json_atomic
    from tasks.core.timing import Stopwatch
    from tasks.text.pipeline import LabelPipeline, training_table
    from tasks.text.refresh import (
        RefreshState,
        choose_towers,
        diff_snapshot,
        index_is_current,
        live_training_data,
        replay_labels,
    )

    logger = get_run_logger()
    watch, store, registry = Stopwatch(), Store(config.workspace), Registry(config.workspace)
    state = RefreshState.load(folder)

    # --- what changed
    catalog = watch.run("read catalog", None, read_products, config.catalog, image_root=config.image_root)
    watch.stages["read catalog"]["items"] = len(catalog)
    diff = diff_snapshot(state.snapshot, catalog.docs)
    counts = {k: len(v) for k, v in diff.items()}
    logger.info("catalog %s: %d products; %s", config.catalog, len(catalog), counts)
    current = registry.current(config.model_name)
    summary: dict[str, Any] = {
        "model": config.model_name,
        "catalog": str(config.catalog),
        "changes": counts,
        "current_before": current,
        "recomputed_unchanged": 0,
    }
    if current is not None and not (diff["new"] or diff["changed"] or diff["removed"]):
        logger.info("no change since the last refresh: no model work")
        return {
            **summary,
            "changed": False,
            "trained": False,
            "message": "no change since the last refresh",
            "stages": watch.stages,
            "total_seconds": watch.total(),
        }

    # --- models: the student starts from the serving version; the catalog's embeddings come from the
    # serving version's document encoder (itself, or for a query-side version the one it kept)
    card = registry.card(config.model_name, current) if current else {}
    start_name = str(registry.path(config.model_name, current)) if current else config.base_model
    start = resolve_model(start_name)
    documents = resolve_model(registry.document_model(config.model_name, current) if current else start_name)
    cache = cache_for(documents, config.workspace, max_seq_length=config.max_seq_length)
    query_cache = cache_for(start, config.workspace, max_seq_length=config.max_seq_length, reuse=cache)
    unchanged = set(diff["unchanged"])
    summary["unchanged_first_encoded"] = sum(
        1 for d, t in zip(catalog.ids, catalog.texts(), strict=True) if d in unchanged and t not in cache
    )
    delta_ids = set(diff["new"]) | set(diff["changed"])
    delta = (
        Corpus(
            catalog.docs[catalog.docs["doc_id"].isin(delta_ids)].reset_index(drop=True), str(config.catalog)
        )
        if delta_ids
        else None
    )
    # the per-part stages (on the cluster with task_runner dask): the catalog's embeddings; queries,
    # negatives and labels for the new and changed products only
    with part_runner(config, config.workspace) as parts:
        pipeline = LabelPipeline(
            catalog,
            cache,
            store,
            documents.fingerprint,
            config,
            watch=watch,
            progress=progress_reporter(logger),
            encode_stage="encode catalog",
            parts=parts,
        )
        summary["encoded"] = pipeline.embeddings_ref.manifest.get("encoded")

        # --- only the new and changed products get queries, negatives and labels
        queries_ref, queries = pipeline.queries(delta) if delta is not None else (None, None)
        stages = list(state.stages)
        if delta is not None:
            stages.append({"queries": queries_ref.key, "labels": None, "docs": sorted(delta_ids)})
            # counted from the store: products whose queries were generated in this run but had not changed
            summary["recomputed_unchanged"] = int(
                queries.loc[queries["doc_id"].isin(unchanged), "doc_id"].nunique()
            )
            train_queries, _ = split_heldout_queries(
                queries, config.heldout_fraction, len(queries), seed=config.seed
            )
            if len(train_queries):
                labels_ref, _ = pipeline.labels(queries_ref, sorted(train_queries["query_id"]))
                stages[-1]["labels"] = labels_ref.key
        else:
            logger.info("only removals: the index is updated, nothing to train")
        pipeline.parts = LOCAL  # the cluster closes here

    # --- the live data, the held-out queries, the towers to train
    queries_all, all_labels = live_training_data(store, stages, set(catalog.ids), set(diff["changed"]))
    _, heldout = split_heldout_queries(
        queries_all, config.heldout_fraction, config.max_heldout_queries, seed=config.seed
    )
    since_full = int(state.changed_since.get(documents.fingerprint, 0)) + len(delta_ids)
    changed_since = {documents.fingerprint: since_full}
    towers = choose_towers(config.refresh_towers, card, since_full, config.full_retrain_share, len(catalog))

    # --- train on the new labels plus replay
    result = rows = None
    if delta_ids and all_labels and all_labels[-1][0] == len(stages) - 1 and len(heldout) > 0:
        labels = replay_labels(all_labels, config.replay_ratio, config.seed)
        rows = TrainingRows.from_table(training_table(labels, queries_all, catalog))
        if len(rows) >= 2:
            train_key = stage_key(
                "train",
                {**config.train.key_settings(), "replay": config.replay_ratio, "towers": towers},
                inputs=[s["labels"] for s in stages if s["labels"]],
                models=[start.fingerprint, documents.fingerprint],
            )
            output = str(config.workspace / "train" / train_key)
            logger.info(
                "training %s (%d rows)",
                "the query side only" if towers == "query" else "both towers",
                len(rows),
            )
            if towers == "query":
                result = watch.run(
                    "train",
                    len(rows),
                    train_query_side_task,
                    str(start.path),
                    rows,
                    cache,
                    config.train,
                    output,
                    student_margins=cached_student_margins(query_cache, cache),
                )
            else:
                result = watch.run(
                    "train",
                    len(rows),
                    train_marginmse_task,
                    config.model_name,
                    str(start.path),
                    rows,
                    config.train,
                    output,
                    student_margins=cached_student_margins(query_cache),
                )

    # --- before/after on the held-out products, register and gate
    if result is not None:
        eval_data = heldout_eval_set(catalog, heldout)
        before = watch.run(
            "evaluate before",
            len(heldout),
            evaluate_cached,
            query_cache,
            eval_data,
            f"before: {current or config.base_model}",
            doc_cache=cache,
            progress=progress_reporter(logger)("evaluation before: encoding the catalog"),
        )
        trained_fingerprint = resolve_model(str(result.model_dir)).fingerprint
        after_cache = EmbeddingCache(
            config.workspace,
            load_sentence_transformer(str(result.model_dir)),
            trained_fingerprint,
            max_seq_length=config.max_seq_length,
        )
        if towers == "both":  # a new document encoder: nothing has changed since it was trained
            changed_since[trained_fingerprint] = 0
        # a query-side model searches the same catalog embeddings: only its queries are encoded
        after_docs = cache if towers == "query" else after_cache
        after = watch.run(
            "evaluate after",
            len(heldout),
            evaluate_cached,
            after_cache,
            eval_data,
            "after: refreshed",
            doc_cache=after_docs,
            progress=progress_reporter(logger)("evaluation after: encoding the catalog"),
        )
        decision = registry.register_and_gate(
            config.model_name,
            result.model_dir,
            {
                "base_model": config.base_model,
                "parent_version": current,
                "start_model": start_name,
                "corpus": str(config.catalog),
                "data_key": catalog.key,
                "labels_key": stages[-1]["labels"],
                "config": json.loads(config.model_dump_json()),
                "metrics_before": before.metrics,
                "metrics_after": after.metrics,
                "kind": "sentence-transformer",
                "eval_set": f"held-out generated queries ({len(heldout)}) of {config.heldout_fraction:.0%} of the "
                "products",
                "towers": towers,
                **(
                    {"document_model": str(documents.path), "document_fingerprint": documents.fingerprint}
                    if towers == "query"
                    else {}
                ),
            },
            new_score=after.primary,
            current_score=before.primary,
            metric="nDCG@10",
            min_delta=config.promote_min_delta,
        )
        logger.info("%s %s: %s", config.model_name, decision.version, decision.reason)
        summary.update(
            {
                "ndcg@10_before": before.primary,
                "ndcg@10_after": after.primary,
                "version": decision.version,
                "promoted": decision.promoted,
                "decision": decision.reason,
                "train": {
                    "steps": result.steps,
                    "seconds": result.seconds,
                    "rows": len(rows),
                    "towers": towers,
                },
            }
        )
        if decision.promoted:
            watch.run(
                "search index",
                len(catalog),
                index_corpus,
                after_docs.model,
                catalog,
                registry.path(config.model_name, decision.version) / INDEX_DIR,
                cache=after_docs,
                max_seq_length=config.max_seq_length,
            )
    if registry.current(config.model_name) is None:
        # nothing better than the base model yet (or too little data to train): serve the base model so
        # search works, and say so
        version = registry.register(
            config.model_name,
            start.path,
            {
                "base_model": config.base_model,
                "corpus": str(config.catalog),
                "data_key": catalog.key,
                "kind": "sentence-transformer",
                "config": json.loads(config.model_dump_json()),
                "note": "the base model, served until an adapted version beats it",
            },
        )
        registry.promote(config.model_name, version, reason="first version: the base model")
        summary["serving_note"] = f"{version} is the base model: no adapted version has beaten it yet"

    # --- the live index follows the catalog (removed or new products)
    serving = registry.current(config.model_name)
    index_dir = registry.path(config.model_name, serving) / INDEX_DIR
    if not index_is_current(index_dir, catalog.key):
        serving_docs = resolve_model(registry.document_model(config.model_name, serving))
        serving_cache = cache_for(
            serving_docs, config.workspace, max_seq_length=config.max_seq_length, reuse=cache
        )
        watch.run(
            "search index",
            len(catalog),
            index_corpus,
            serving_cache.model,
            catalog,
            index_dir,
            cache=serving_cache,
            max_seq_length=config.max_seq_length,
        )

    # the snapshot goes last: a crash before here leaves the previous one, and the rerun redoes this delta
    RefreshState(
        snapshot=dict(zip(catalog.ids, catalog.docs["content_hash"], strict=True)),
        stages=stages,
        runs=state.runs + 1,
        catalog_key=catalog.key,
        changed_since=changed_since,
    ).save(folder)
    summary.update(
        {
            "changed": True,
            "trained": result is not None,
            "serving": serving,
            "stages": watch.stages,
            "total_seconds": watch.total(),
            "queries_generated_for": len(delta_ids),
        }
    )
    report = config.workspace / "reports" / f"catalog-refresh-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(report, summary)
    summary["report"] = str(report)
    return summary
