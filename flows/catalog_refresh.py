"""Flow: incremental refresh of a catalog's text retriever (the nightly `catalog-refresh` deployment).

Each run compares the catalog with the snapshot of the last finished run by content hash:

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

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel, ConfigDict, Field

from finetune.marginmse import TrainConfig
from flows.adapt_text import (
    Stopwatch,
    _cached_margins,
    _evaluate,
    _progress,
    _training_rows,
    query_side_train_task,
    train_task,
)
from flows.evaluate import DEFAULT_WORKSPACE
from tasks.corpus import read_products
from tasks.label import LabelConfig
from tasks.mine import MineConfig
from tasks.qgen import QGenConfig
from tasks.store import file_lock

__all__ = ["RefreshConfig", "catalog_refresh_flow", "read_products"]


class RefreshConfig(BaseModel):
    """Settings of the `catalog-refresh` flow."""

    model_config = ConfigDict(extra="forbid")

    catalog: Path = Field(description="the catalog (CSV/TSV/Parquet with an image column) or a corpus file/folder")
    model_name: str = Field("catalog-text", description="registry name of the catalog's text retriever")
    base_model: str = Field("all-MiniLM-L6-v2", description="model to start from before anything is promoted")
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for stage outputs, models, snapshots, reports")
    heldout_percent: int = Field(10, ge=1, le=50, description="products (chosen by a hash of the id, the same every "
                                                               "run) whose queries only evaluate, never train")
    max_heldout_queries: int = Field(500, ge=10, description="most held-out queries evaluated")
    replay_ratio: float = Field(1.0, ge=0, description="earlier training queries (of products still unchanged) "
                                                        "mixed in per new one, so the model does not forget them; "
                                                        "it keeps a refresh's cost proportional to the change")
    max_seq_length: int = Field(128, ge=8, le=8192, description="tokens per product text (index, mining, evaluation)")
    refresh_towers: Literal["query", "both"] = Field(
        "query", description="what a refresh trains once an adapted version serves: 'query' adapts only the "
                             "query side against the catalog embeddings of the serving version's document encoder "
                             "(they stay valid, so nothing is re-encoded: a refresh costs little); 'both' "
                             "fine-tunes the whole model (the catalog is encoded again to evaluate and index it)")
    full_retrain_share: float = Field(0.1, ge=0, le=1, description="with refresh-towers 'query': once this share "
                                      "of the catalog has been added or changed since the document encoder was "
                                      "trained, the next refresh trains both towers")
    promote_min_delta: float = Field(0.0, ge=0, description="promote only when nDCG@10 improves by more than this")
    lock_timeout_seconds: float = Field(1800.0, ge=0, description="how long a second refresh waits for a running one")
    seed: int = Field(13, description="random seed")
    qgen: QGenConfig = Field(default_factory=lambda: QGenConfig(consistency_top_k=10), description="query generation")
    mine: MineConfig = Field(default_factory=MineConfig, description="negative mining")
    label: LabelConfig = Field(default_factory=LabelConfig, description="pseudo-labels")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_seq_length=128, time_budget_minutes=30),
                               description="MarginMSE training")


class RefreshLockedError(RuntimeError):
    """Another refresh of the same model is running."""


def refresh_lock(folder: Path, timeout: float):
    """One refresh of a model at a time: a second one waits up to ``timeout`` s, then fails cleanly."""
    return file_lock(folder / ".refresh.lock", timeout, lambda: RefreshLockedError(
        f"another refresh holds {folder / '.refresh.lock'} (waited {timeout:.0f} s); try again when it finishes"))


def is_heldout(doc_id: str, percent: int) -> bool:
    """Fixed per product: the same products are held out in every run."""
    return int(hashlib.sha256(f"heldout:{doc_id}".encode()).hexdigest()[:8], 16) % 100 < percent


def diff_snapshot(previous: dict[str, str], docs) -> dict[str, list[str]]:
    """new / changed / removed / unchanged product ids against the last snapshot (id -> content hash)."""
    now = dict(zip(docs["doc_id"], docs["content_hash"], strict=True))
    return {
        "new": sorted(d for d in now if d not in previous),
        "changed": sorted(d for d in now if d in previous and previous[d] != now[d]),
        "removed": sorted(d for d in previous if d not in now),
        "unchanged": sorted(d for d in now if previous.get(d) == now[d]),
    }


@flow(name="catalog-refresh", description="Incremental nightly adaptation of a catalog's text retriever.")
def catalog_refresh_flow(config: RefreshConfig) -> dict:
    from tasks.registry import Registry

    folder = Path(config.workspace) / "refresh" / config.model_name
    with refresh_lock(folder, config.lock_timeout_seconds):
        return _refresh(config, folder, Registry(config.workspace))


def _refresh(config: RefreshConfig, folder: Path, registry) -> dict:
    from tasks.corpus import BeirData, Corpus
    from tasks.embeddings import EmbeddingCache
    from tasks.evaluate import BM25Index
    from tasks.label import CrossEncoderTeacher, OfflineTeacher, label_stage, source_ranker
    from tasks.mine import embed_corpus, load_embeddings, mine_stage
    from tasks.models import load_sentence_transformer, resolve_model
    from tasks.qgen import OFFLINE, generate_queries
    from tasks.search import INDEX_DIR, build_index
    from tasks.store import Store, stage_key, write_json_atomic

    logger = get_run_logger()
    watch = Stopwatch()
    store = Store(config.workspace)
    state_file = folder / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"snapshot": {}, "stages": [], "runs": 0}

    catalog = watch.run("read catalog", None, read_products, config.catalog)
    watch.stages["read catalog"]["items"] = len(catalog)
    diff = diff_snapshot(state["snapshot"], catalog.docs)
    counts = {k: len(v) for k, v in diff.items()}
    logger.info("catalog %s: %d products; %s", config.catalog, len(catalog), counts)
    current = registry.current(config.model_name)
    summary: dict[str, Any] = {"model": config.model_name, "catalog": str(config.catalog), "changes": counts,
                               "current_before": current, "recomputed_unchanged": 0}
    if current is not None and not (diff["new"] or diff["changed"] or diff["removed"]):
        logger.info("no change since the last refresh: no model work")
        return {**summary, "changed": False, "trained": False, "message": "no change since the last refresh",
                "stages": watch.stages, "total_seconds": watch.total()}

    card = registry.card(config.model_name, current) if current else {}
    start_name = str(registry.path(config.model_name, current)) if current else config.base_model
    start = resolve_model(start_name)
    # the catalog's embeddings (index, mining, teacher) come from the serving version's document encoder:
    # the version itself, or for a query-side refresh the version whose document side it kept
    documents = resolve_model(registry.document_model(config.model_name, current) if current else start_name)
    encoder = load_sentence_transformer(documents)
    cache = EmbeddingCache(config.workspace, encoder, documents.fingerprint, max_seq_length=config.max_seq_length)
    query_cache = cache if documents.fingerprint == start.fingerprint else EmbeddingCache(
        config.workspace, load_sentence_transformer(start), start.fingerprint, max_seq_length=config.max_seq_length)
    unchanged = set(diff["unchanged"])
    # unchanged products this model has not encoded yet (it was promoted without an index, or is new)
    summary["unchanged_first_encoded"] = sum(1 for d, t in zip(catalog.ids, catalog.texts(), strict=True)
                                             if d in unchanged and t not in cache)
    embeddings_ref = watch.run("encode catalog", len(catalog), embed_corpus, catalog, cache, store)
    summary["encoded"] = embeddings_ref.manifest.get("encoded")

    delta_ids = set(diff["new"]) | set(diff["changed"])
    trained = False
    if delta_ids:
        doc_ids, _, doc_embeddings = load_embeddings(store, embeddings_ref)
        bm25 = watch.run("bm25 index", len(catalog), BM25Index, catalog.texts())
        teacher = OfflineTeacher(bm25, cache, doc_embeddings, bm25_weight=config.label.bm25_weight,
                                 pool=config.label.pool)
        delta = Corpus(catalog.docs[catalog.docs["doc_id"].isin(delta_ids)].reset_index(drop=True),
                       str(config.catalog))
        rank_of_source = source_ranker(teacher, doc_ids, delta.ids, delta.texts())

        # --- only the new and changed products get queries, negatives and labels
        generator_fp = [] if config.qgen.generator == OFFLINE else [resolve_model(config.qgen.generator).fingerprint]
        qgen_key = stage_key("queries", config.qgen.model_dump(mode="json"), inputs=[delta.key],
                             models=[documents.fingerprint, *generator_fp])
        queries_ref = watch.run("generate queries", len(delta), generate_queries, delta, config.qgen, store,
                                key=qgen_key, rank_of_source=rank_of_source if config.qgen.consistency_top_k else None,
                                progress=_progress(logger, "query generation (parts)"))
        stages = state["stages"] + [{"queries": queries_ref.key, "labels": None, "docs": sorted(delta_ids)}]
        queries = store.read_pandas("queries", queries_ref.key)
        # counted from the store: products whose queries were generated in this run but had not changed
        summary["recomputed_unchanged"] = int(queries.loc[queries["doc_id"].isin(unchanged), "doc_id"].nunique())
        train_queries = queries[~queries["doc_id"].map(lambda d: is_heldout(d, config.heldout_percent))]
        train_ids = sorted(train_queries["query_id"])
        if train_ids:
            negatives_ref = watch.run("mine negatives", len(train_ids), mine_stage, store, queries_ref, train_ids,
                                      catalog, embeddings_ref, cache, config.mine, bm25=bm25)
            if config.label.teacher == OFFLINE:
                labeller, teacher_fp = teacher, stage_key("offline-teacher", {
                    "w": config.label.bm25_weight, "pool": config.label.pool, "catalog": catalog.key},
                    models=[documents.fingerprint])
            else:
                labeller = CrossEncoderTeacher(config.label.teacher, batch_size=config.label.batch_size,
                                               max_length=config.label.max_length)
                teacher_fp = labeller.resolved.fingerprint
            labels_ref = watch.run("pseudo-labels", len(train_ids), label_stage, store, negatives_ref, queries_ref,
                                   catalog, labeller, teacher_fp, config.label)
            stages[-1]["labels"] = labels_ref.key
    else:
        stages = list(state["stages"])
        logger.info("only removals: the index is updated, nothing to train")

    # --- the live data: each product's queries/labels from the latest stage that covered it
    live = set(catalog.ids)
    owner: dict[str, int] = {}
    for number, stage in enumerate(stages):
        for doc in stage["docs"]:
            owner[doc] = number
    all_queries, all_labels = [], []
    for number, stage in enumerate(stages):
        frame = store.read_pandas("queries", stage["queries"])
        frame = frame[frame["doc_id"].map(lambda d, n=number: d in live and owner.get(d) == n)]
        all_queries.append(frame)
        if stage["labels"]:
            labels = store.read_pandas("labels", stage["labels"])
            valid = set(frame["query_id"])
            # an older stage's label is stale when its negative changed since (or is gone)
            stale = set(diff["changed"]) if number < len(stages) - 1 else set()
            labels = labels[labels["query_id"].isin(valid) & ~labels["neg_id"].isin(stale) & labels["neg_id"].isin(live)]
            all_labels.append((number, labels))
    import pandas as pd

    queries_all = pd.concat(all_queries, ignore_index=True) if all_queries else pd.DataFrame()
    heldout = queries_all[queries_all["doc_id"].map(lambda d: is_heldout(d, config.heldout_percent))]
    if len(heldout) > config.max_heldout_queries:
        heldout = heldout.sample(n=config.max_heldout_queries, random_state=config.seed)

    result = decision = version = None
    # query side only while the document encoder is an adapted one and the catalog has not drifted far from it
    # products added or changed since each document encoder was trained (keyed by its fingerprint)
    since_full = int(state.get("changed_since", {}).get(documents.fingerprint, 0)) + len(delta_ids)
    changed_since = {documents.fingerprint: since_full}
    towers = "query" if (config.refresh_towers == "query" and card.get("labels_key")
                         and since_full < config.full_retrain_share * len(catalog)) else "both"
    if delta_ids and all_labels and all_labels[-1][0] == len(stages) - 1 and len(heldout) > 0:
        new_labels = all_labels[-1][1]
        old = [labels for number, labels in all_labels[:-1]]
        replay = pd.concat(old, ignore_index=True) if old else new_labels.iloc[:0]
        wanted = int(round(config.replay_ratio * new_labels["query_id"].nunique()))
        if len(replay) and wanted:
            keep = replay["query_id"].drop_duplicates().sample(
                n=min(wanted, replay["query_id"].nunique()), random_state=config.seed)
            replay = replay[replay["query_id"].isin(set(keep))]
        else:
            replay = replay.iloc[:0]
        labels = pd.concat([new_labels, replay], ignore_index=True)
        rows = _training_rows(labels, queries_all, catalog)
        if len(rows) >= 2:
            train_key = stage_key("train", {**config.train.model_dump(mode="json"), "replay": config.replay_ratio,
                                            "towers": towers},
                                  inputs=[s["labels"] for s in stages if s["labels"]],
                                  models=[start.fingerprint, documents.fingerprint])
            output = str(config.workspace / "train" / train_key)
            logger.info("training %s (%d rows)", "the query side only" if towers == "query" else "both towers",
                        len(rows))
            if towers == "query":
                result = watch.run("train", len(rows), query_side_train_task, str(start.path), rows, cache,
                                   config.train, output, student_margins=_cached_margins(query_cache, rows, cache))
            else:
                result = watch.run("train", len(rows), train_task, config.model_name, str(start.path), rows,
                                   config.train, output, student_margins=_cached_margins(query_cache, rows))
            trained = True

    if trained:
        qrels = {q: {d: 1} for q, d in zip(heldout["query_id"], heldout["doc_id"], strict=True)}
        eval_data = BeirData(catalog, heldout[["query_id", "text"]].reset_index(drop=True), qrels, "held-out",
                             "generated")
        before = watch.run("evaluate before", len(heldout), _evaluate, query_cache, eval_data,
                           f"before: {current or config.base_model}", doc_cache=cache)
        model = load_sentence_transformer(str(result.model_dir))
        trained_fingerprint = resolve_model(str(result.model_dir)).fingerprint
        after_cache = EmbeddingCache(config.workspace, model, trained_fingerprint,
                                     max_seq_length=config.max_seq_length)
        if towers == "both":  # a new document encoder: nothing has changed since it was trained
            changed_since[trained_fingerprint] = 0
        # a query-side model searches the same catalog embeddings: only its queries are encoded
        after_docs = cache if towers == "query" else after_cache
        after = watch.run("evaluate after", len(heldout), _evaluate, after_cache, eval_data, "after: refreshed",
                          doc_cache=after_docs)
        version = registry.register(config.model_name, result.model_dir, {
            "base_model": config.base_model, "parent_version": current, "start_model": start_name,
            "corpus": str(config.catalog), "data_key": catalog.key, "labels_key": stages[-1]["labels"],
            "config": json.loads(config.model_dump_json()), "metrics_before": before.metrics,
            "metrics_after": after.metrics, "kind": "sentence-transformer",
            "eval_set": f"held-out generated queries ({len(heldout)}) of {config.heldout_percent}% of the products",
            "towers": towers,
            **({"document_model": str(documents.path), "document_fingerprint": documents.fingerprint}
               if towers == "query" else {}),
        })
        decision = registry.promote_if_better(config.model_name, version, new_score=after.primary,
                                              current_score=before.primary, metric="nDCG@10",
                                              min_delta=config.promote_min_delta)
        logger.info("%s %s: %s", config.model_name, version, decision.reason)
        summary.update({"ndcg@10_before": before.primary, "ndcg@10_after": after.primary, "version": version,
                        "promoted": decision.promoted, "decision": decision.reason,
                        "train": {"steps": result.steps, "seconds": result.seconds, "rows": len(rows),
                                  "towers": towers}})
        if decision.promoted:
            watch.run("search index", len(catalog), build_index, after_docs.model, catalog,
                      registry.path(config.model_name, version) / INDEX_DIR, cache=after_docs,
                      max_seq_length=config.max_seq_length)
    if registry.current(config.model_name) is None:
        # nothing better than the base model yet (or too little data to train): serve the base model so
        # search works, and say so
        version = registry.register(config.model_name, start.path, {
            "base_model": config.base_model, "corpus": str(config.catalog), "data_key": catalog.key,
            "kind": "sentence-transformer", "note": "the base model, served until an adapted version beats it"})
        registry.promote(config.model_name, version, reason="first version: the base model")
        summary["serving_note"] = f"{version} is the base model: no adapted version has beaten it yet"
    serving = registry.current(config.model_name)
    index_dir = registry.path(config.model_name, serving) / INDEX_DIR
    meta = json.loads((index_dir / "meta.json").read_text()) if (index_dir / "meta.json").is_file() else {}
    if meta.get("corpus_key") != catalog.key:  # removed or new products: the live index follows the catalog
        serving_docs = resolve_model(registry.document_model(config.model_name, serving))
        serving_cache = cache if serving_docs.fingerprint == documents.fingerprint else EmbeddingCache(
            config.workspace, load_sentence_transformer(serving_docs), serving_docs.fingerprint,
            max_seq_length=config.max_seq_length)
        watch.run("search index", len(catalog), build_index, serving_cache.model, catalog, index_dir,
                  cache=serving_cache, max_seq_length=config.max_seq_length)

    # the snapshot goes last: a crash before here leaves the previous one, and the rerun redoes this delta
    write_json_atomic(state_file, {"snapshot": dict(zip(catalog.ids, catalog.docs["content_hash"], strict=True)),
                                   "stages": stages, "runs": state["runs"] + 1, "catalog_key": catalog.key,
                                   "changed_since": changed_since})
    summary.update({"changed": True, "trained": trained, "serving": serving, "stages": watch.stages,
                    "total_seconds": watch.total(), "queries_generated_for": len(delta_ids)})
    report = config.workspace / "reports" / f"catalog-refresh-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json_atomic(report, summary)
    summary["report"] = str(report)
    return summary
