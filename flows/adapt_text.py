"""Flow: unsupervised adaptation of a bi-encoder to a corpus (GPL).

corpus -> queries -> negatives -> pseudo-labels -> MarginMSE training -> before/after -> promotion.
Every stage's output goes through the store, so a rerun with the same inputs does no work and a
crash resumes at the last finished part.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import flow, get_run_logger, task
from pydantic import BaseModel, ConfigDict, Field

from finetune.marginmse import TrainConfig
from flows.evaluate import DEFAULT_WORKSPACE
from tasks.label import LabelConfig
from tasks.mine import MineConfig
from tasks.qgen import QGenConfig

# The GPL paper's models, for users who have a hub (or these directories locally).
PRESETS: dict[str, dict[str, Any]] = {
    "offline": {},
    "gpl": {
        "base_model": "sentence-transformers/msmarco-distilbert-base-v3",
        "qgen": {"generator": "BeIR/query-gen-msmarco-t5-base-v1", "queries_per_doc": 3, "consistency_top_k": None},
        "label": {"teacher": "cross-encoder/ms-marco-MiniLM-L-6-v2"},
    },
}


class AdaptTextConfig(BaseModel):
    """Settings of `adapt text` and of the `adapt-text` flow."""

    model_config = ConfigDict(extra="forbid")

    corpus: Path = Field(description="the corpus: a BEIR folder (corpus.jsonl) or a JSONL/CSV/TSV/Parquet file")
    eval: Path | None = Field(None, description="BEIR folder with queries.jsonl and qrels/<eval-split>.tsv judging "
                                                "documents of the corpus (none: held-out generated queries)")
    eval_split: str = Field("test", description="which qrels/<split>.tsv of --eval to use")
    preset: Literal["offline", "gpl"] = Field("offline", description="offline: bundled MiniLM, offline generator and "
                                                                     "teacher; gpl: the GPL paper's hub models")
    base_model: str = Field("all-MiniLM-L6-v2", description="bi-encoder to adapt when the registry has no current "
                                                            "version of --model-name")
    model_name: str = Field("text-retriever", description="registry name the adapted model is saved under")
    continue_from_current: bool = Field(True, description="start from the registry's current version when there is one")
    workspace: Path = Field(DEFAULT_WORKSPACE, description="folder for stage outputs, models and reports")
    heldout_fraction: float = Field(0.1, gt=0, lt=0.5, description="without --eval: share of documents whose "
                                                                   "generated queries are held out for evaluation")
    max_heldout_queries: int = Field(300, ge=10, description="without --eval: most held-out queries evaluated")
    max_train_queries: int | None = Field(None, ge=1, description="train on at most this many generated queries "
                                                                   "(a seeded sample); none: all")
    promote_min_delta: float = Field(0.0, ge=0, description="promote only when nDCG@10 improves by more than this")
    eval_max_seq_length: int = Field(256, ge=8, le=8192, description="tokens per passage when evaluating")
    seed: int = Field(13, description="random seed for sampling and splitting")
    qgen: QGenConfig = Field(default_factory=QGenConfig, description="query generation")
    mine: MineConfig = Field(default_factory=MineConfig, description="negative mining")
    label: LabelConfig = Field(default_factory=LabelConfig, description="pseudo-labels")
    train: TrainConfig = Field(default_factory=TrainConfig, description="MarginMSE training")


# ------------------------------------------------------------------------------------ helpers


class Stopwatch:
    """Wall time and item counts per stage, for the report."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}
        self.began = time.time()

    def run(self, name: str, items: int | None, function, *args, **kwargs):
        start = time.time()
        result = function(*args, **kwargs)
        self.stages[name] = {"seconds": round(time.time() - start, 2), "items": items}
        return result

    def total(self) -> float:
        return round(time.time() - self.began, 1)


def _progress(logger, label: str):
    """A progress callback for long stages: a log line and a Prefect progress artifact every ~10%."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    state: dict[str, Any] = {"last": -1, "artifact": None}

    def report(done: int, total: int) -> None:
        step = int(10 * done / max(total, 1))
        if step == state["last"]:
            return
        state["last"] = step
        logger.info("%s: %d/%d", label, done, total)
        percent = round(100.0 * done / max(total, 1), 1)
        try:
            if state["artifact"] is None:
                state["artifact"] = create_progress_artifact(progress=percent, description=label)
            else:
                update_progress_artifact(artifact_id=state["artifact"], progress=percent)
        except Exception as exc:  # progress display must never stop the work
            logger.debug("progress artifact not updated: %s", exc)

    return report


def split_heldout(queries, fraction: float, limit: int, seed: int):
    """(train queries, held-out queries): held out by document, so no held-out document trains."""
    docs = sorted(queries["doc_id"].unique())
    rng = np.random.default_rng(seed)
    n_heldout = max(1, int(round(len(docs) * fraction)))
    heldout_docs = set(rng.choice(docs, size=n_heldout, replace=False).tolist())
    heldout = queries[queries["doc_id"].isin(heldout_docs)]
    heldout = heldout.sample(n=min(limit, len(heldout)), random_state=seed) if len(heldout) > limit else heldout
    train = queries[~queries["doc_id"].isin(heldout_docs)]
    return train, heldout


# -------------------------------------------------------------------------------------- tasks


@task(name="train-marginmse", task_run_name="train {model_name}")
def train_task(model_name: str, base_path: str, rows, config: TrainConfig, output_dir: str, student_margins=None):
    from finetune.marginmse import train_marginmse
    from tasks.models import load_sentence_transformer

    logger = get_run_logger()
    model = load_sentence_transformer(base_path)
    return train_marginmse(model, rows, config, output_dir, student_margins=student_margins,
                           progress=_progress(logger, "training steps"))


@task(name="train-query-side", task_run_name="train the query side of {base_path}")
def query_side_train_task(base_path: str, rows, doc_cache, config: TrainConfig, output_dir: str, student_margins=None):
    from finetune.marginmse import train_query_side

    logger = get_run_logger()
    return train_query_side(base_path, rows, lambda texts: doc_cache.embed(list(texts)), config, output_dir,
                            student_margins=student_margins, progress=_progress(logger, "training steps"))


# --------------------------------------------------------------------------------------- flow


@flow(name="adapt-text", description="Unsupervised adaptation of a bi-encoder to a corpus (GPL), with promotion.")
def adapt_text_flow(config: AdaptTextConfig) -> dict:
    """Run every stage; returns the report (also saved as JSON and published as artifacts)."""
    from tasks.corpus import BeirData, read_corpus, read_qrels, read_queries
    from tasks.embeddings import EmbeddingCache
    from tasks.evaluate import BM25Index
    from tasks.label import CrossEncoderTeacher, OfflineTeacher, label_stage, source_ranker
    from tasks.mine import embed_corpus, load_embeddings, mine_stage
    from tasks.models import load_sentence_transformer, resolve_model
    from tasks.qgen import OFFLINE, generate_queries
    from tasks.registry import Registry
    from tasks.store import Store, stage_key

    logger = get_run_logger()
    watch = Stopwatch()
    store = Store(config.workspace)
    registry = Registry(config.workspace)

    # --- inputs
    corpus = watch.run("read corpus", None, read_corpus, config.corpus)
    watch.stages["read corpus"]["items"] = len(corpus)
    logger.info("corpus %s: %d documents (%d left out)", config.corpus, len(corpus), len(corpus.skipped))
    current = registry.current(config.model_name) if config.continue_from_current else None
    start_model = str(registry.path(config.model_name, current)) if current else config.base_model
    start = resolve_model(start_model)
    logger.info("starting model: %s", start.describe() if not current else f"{config.model_name} {current}")
    encoder = load_sentence_transformer(start)
    cache = EmbeddingCache(config.workspace, encoder, start.fingerprint, max_seq_length=config.mine.max_seq_length,
                           batch_size=config.mine.batch_size)

    # --- corpus embeddings and the teacher's parts
    embeddings_ref = watch.run("encode corpus", len(corpus), embed_corpus, corpus, cache, store,
                               progress=_progress(logger, "encoding corpus"))
    doc_ids, _, doc_embeddings = load_embeddings(store, embeddings_ref)
    bm25 = watch.run("bm25 index", len(corpus), BM25Index, corpus.texts())
    hybrid = OfflineTeacher(bm25, cache, doc_embeddings, bm25_weight=config.label.bm25_weight,
                            pool=config.label.pool)
    rank_of_source = source_ranker(hybrid, doc_ids, corpus.ids, corpus.texts())

    # --- 1. queries
    qgen_models = [start.fingerprint] + ([] if config.qgen.generator == OFFLINE else [resolve_model(config.qgen.generator).fingerprint])
    queries_key = stage_key("queries", config.qgen.model_dump(mode="json"), inputs=[corpus.key], models=qgen_models)
    queries_ref = watch.run("generate queries", len(corpus), generate_queries, corpus, config.qgen, store, key=queries_key,
                            rank_of_source=rank_of_source if config.qgen.consistency_top_k else None,
                            progress=_progress(logger, "query generation (parts)"))
    queries = store.read_pandas("queries", queries_ref.key)
    manifest = queries_ref.manifest
    logger.info("queries: %d kept of %d generated", len(queries), manifest.get("generated", len(queries)))
    if queries.empty:
        raise ValueError("no query survived generation and filtering; lower qgen.consistency_top_k or check the corpus")

    # --- evaluation set
    if config.eval is not None:
        eval_queries = read_queries(config.eval / "queries.jsonl")
        qrels = read_qrels(config.eval / "qrels" / f"{config.eval_split}.tsv",
                           query_ids=set(eval_queries["query_id"]), doc_ids=set(corpus.ids))
        eval_queries = eval_queries[eval_queries["query_id"].isin(qrels)].reset_index(drop=True)
        eval_data = BeirData(corpus, eval_queries, qrels, str(config.eval), config.eval_split)
        eval_note = f"the user's queries and judgments: {config.eval} [{config.eval_split}], {len(eval_queries)} queries"
        train_queries = queries
    else:
        train_queries, heldout = split_heldout(queries, config.heldout_fraction, config.max_heldout_queries, config.seed)
        qrels = {q: {d: 1} for q, d in zip(heldout["query_id"], heldout["doc_id"], strict=True)}
        eval_data = BeirData(corpus, heldout[["query_id", "text"]].reset_index(drop=True), qrels, "held-out", "generated")
        eval_note = (f"held-out generated queries ({len(heldout)} queries from {config.heldout_fraction:.0%} of the "
                     "documents, never trained on; relevant = the document each was generated from)")
    if config.max_train_queries and len(train_queries) > config.max_train_queries:
        train_queries = train_queries.sample(n=config.max_train_queries, random_state=config.seed)
    train_ids = sorted(train_queries["query_id"])

    # --- 2. negatives, 3. labels
    negatives_ref = watch.run("mine negatives", len(train_ids), mine_stage, store, queries_ref, train_ids, corpus,
                              embeddings_ref, cache, config.mine, bm25=bm25,
                              progress=_progress(logger, "mining (parts)"))
    if config.label.teacher == OFFLINE:
        teacher, teacher_fp = hybrid, stage_key("offline-teacher", {"w": config.label.bm25_weight, "pool": config.label.pool},
                                                models=[start.fingerprint])
    else:
        teacher = CrossEncoderTeacher(config.label.teacher, batch_size=config.label.batch_size,
                                      max_length=config.label.max_length)
        teacher_fp = teacher.resolved.fingerprint
    labels_ref = watch.run("pseudo-labels", None, label_stage, store, negatives_ref, queries_ref, corpus, teacher,
                           teacher_fp, config.label, progress=_progress(logger, "labelling (parts)"))
    labels = store.read_pandas("labels", labels_ref.key)
    watch.stages["pseudo-labels"]["items"] = len(labels)

    # --- 4. training
    rows = _training_rows(labels, queries, corpus)
    train_key = stage_key("train", config.train.model_dump(mode="json"), inputs=[labels_ref.key], models=[start.fingerprint])
    output_dir = config.workspace / "train" / train_key
    result = watch.run("train", len(rows), train_task, config.model_name, str(start.path), rows, config.train,
                       str(output_dir), student_margins=_cached_margins(cache, rows))
    watch.stages["train"]["items"] = result.steps * config.train.batch_size

    # --- 5. evaluate before/after, register, promote
    eval_length = config.eval_max_seq_length
    before_cache = cache if eval_length == cache.max_seq_length else EmbeddingCache(
        config.workspace, encoder, start.fingerprint, max_seq_length=eval_length)
    before = watch.run("evaluate before", len(eval_data.queries), _evaluate, before_cache, eval_data,
                       f"before: {current or config.base_model}")
    trained = load_sentence_transformer(str(result.model_dir))
    after_cache = EmbeddingCache(config.workspace, trained, resolve_model(str(result.model_dir)).fingerprint,
                                 max_seq_length=eval_length)
    after = watch.run("evaluate after", len(eval_data.queries), _evaluate, after_cache, eval_data, "after: adapted")
    version = registry.register(config.model_name, result.model_dir, {
        "base_model": config.base_model, "parent_version": current, "start_model": start_model,
        "data_key": corpus.key, "labels_key": labels_ref.key, "config": json.loads(config.model_dump_json()),
        "metrics_before": before.metrics, "metrics_after": after.metrics, "eval_set": eval_note,
        "kind": "sentence-transformer",
    })
    decision = registry.promote_if_better(config.model_name, version, new_score=after.primary,
                                          current_score=before.primary, metric="nDCG@10",
                                          min_delta=config.promote_min_delta)
    logger.info("%s %s: %s", config.model_name, version, decision.reason)
    if decision.promoted:  # the new current serves searches: its index goes next to it (embeddings are cached)
        from tasks.search import INDEX_DIR, build_index

        watch.run("search index", len(corpus), build_index, trained, corpus,
                  registry.path(config.model_name, version) / INDEX_DIR, cache=after_cache,
                  max_seq_length=eval_length)
    return _report(config, corpus, queries, manifest, eval_data, eval_note, before, after, result, version, decision,
                   watch, logger)


def _training_rows(labels, queries, corpus):
    from finetune.marginmse import TrainingRows
    from tasks.label import positive_passage

    texts = dict(zip(corpus.ids, corpus.texts(), strict=True))
    info = queries.set_index("query_id")
    rows = TrainingRows([], [], [], [])
    for query_id, group in labels.groupby("query_id", sort=True):
        record = info.loc[query_id]
        rows.queries.append(record["text"])
        rows.positives.append(positive_passage(record, texts))
        rows.negatives.append([texts[n] for n in group["neg_id"]])
        rows.margins.append(group["margin"].astype(float).tolist())
    return rows


def _cached_margins(cache, rows, doc_cache=None):
    """Initial student margins from the embedding cache (the start model is the student; passages from
    ``doc_cache`` when the student keeps another model's document embeddings)."""
    doc_cache = doc_cache or cache

    def margins(rows_, indices):
        out = []
        for i in indices:
            q = cache.embed([rows_.queries[i]])[0]
            p = doc_cache.embed([rows_.positives[i]])[0]
            negs = doc_cache.embed(rows_.negatives[i])
            out.append(q @ p - negs @ q)
        return np.concatenate(out)
    return margins


def _evaluate(cache, data, system: str, doc_cache=None):
    """Queries through ``cache``, documents through ``doc_cache`` (default: the same model)."""
    from tasks.evaluate import exact_index, report_from_run, search_index

    start = time.time()
    doc_vectors = (doc_cache or cache).embed(data.corpus.texts(), desc="encoding corpus for evaluation")
    query_vectors = cache.embed(data.queries["text"].tolist(), desc="encoding evaluation queries")
    run = search_index(exact_index(doc_vectors), data.corpus.ids, data.queries["query_id"].tolist(), query_vectors,
                       top_k=100)
    return report_from_run(system, data, run, seconds=time.time() - start)


def _report(config, corpus, queries, manifest, eval_data, eval_note, before, after, result, version, decision,
            watch, logger) -> dict:
    from tasks.evaluate import publish_markdown
    from tasks.report import (
        before_after_markdown,
        example_matches,
        examples_markdown,
        plot_series,
        timings_markdown,
    )
    from tasks.store import write_json_atomic

    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = config.workspace / "reports"
    plot = plot_series(result.loss_series(), reports / f"adapt-text-{stamp}-loss.png",
                       title="MarginMSE loss", xlabel="step", ylabel="loss")
    titles = {d: (t or x[:80]) for d, t, x in zip(corpus.docs["doc_id"], corpus.docs["title"], corpus.docs["text"], strict=True)}
    query_texts = dict(zip(eval_data.queries["query_id"], eval_data.queries["text"], strict=True))
    examples = example_matches(before, after, query_texts, titles, eval_data.qrels, n=6, k=3)
    summary = {
        "ndcg@10_before": before.primary,
        "ndcg@10_after": after.primary,
        "promoted": decision.promoted,
        "decision": decision.reason,
        "model": config.model_name,
        "version": version,
        "eval_set": eval_note,
        "metrics_before": before.metrics,
        "metrics_after": after.metrics,
        "queries_generated": manifest.get("generated"),
        "queries_kept": len(queries),
        "train": {"steps": result.steps, "seconds": result.seconds, "rows": result.train_rows,
                  "label_scale": result.label_scale, "stopped_early": result.stopped_early,
                  "resumed_from": result.resumed_from},
        "stages": watch.stages,
        "total_seconds": watch.total(),
        "loss_plot": str(plot),
        "examples": examples,
    }
    path = reports / f"adapt-text-{stamp}.json"
    write_json_atomic(path, summary)
    summary["report"] = str(path)
    markdown = "\n\n".join([
        f"# Adaptation of {config.model_name}: {version} {'promoted' if decision.promoted else 'not promoted'}",
        f"**Decision**: {decision.reason}",
        f"**Evaluation set**: {eval_note}",
        before_after_markdown(before, after),
        "## Example matches (top 3, before | after; ✅ relevant)",
        examples_markdown(examples),
        "## Stages",
        timings_markdown(watch.stages),
        f"Training: {result.steps} steps in {result.seconds:.0f} s; loss curve: `{plot}`; report: `{path}`",
    ])
    publish_markdown(markdown, key="adapt-text-report", description="before/after, examples, timings")
    summary["markdown"] = markdown
    logger.info("report written to %s", path)
    return summary
