"""`adapt supervised` over a corpus: judged queries (a BEIR split, or a click log next to a corpus)
train the query side, optionally mixed with the generated queries and teacher lists of `adapt text`
for the same corpus, optionally after an Optuna search; retrieval over the whole corpus is measured
before and after, dense and hybrid, and the registry's gate decides. Composition only: the stages are
in ``tasks/`` and ``finetune/``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from flows.stages import progress_reporter, train_query_side


def is_judged(config: Any) -> bool:
    """Judged queries over a corpus: ``--train`` is a BEIR folder, or ``--corpus`` names the corpus of a
    click log."""
    return Path(config.train).is_dir() or config.corpus is not None


def _text_stages(config: Any) -> Any:
    """The text stages' settings `adapt text` uses by default, with this run's teacher settings: the
    same store keys, so a corpus `adapt text` has run on is not labelled again."""
    from tasks.core.defaults import HELDOUT_FRACTION
    from tasks.text.negatives import MineConfig
    from tasks.text.queries import QGenConfig

    return SimpleNamespace(
        qgen=QGenConfig(), mine=MineConfig(), label=config.label, heldout_fraction=HELDOUT_FRACTION
    )


def _read_inputs(config: Any, watch: Any, logger: Any) -> tuple[Any, Any, Any, str, dict[str, Any]]:
    """(corpus, judged training queries, evaluation queries, evaluation note, the reader's counts)."""
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.labelled.judged import carve_by_query, read_training_judgments, subset

    corpus_path = config.corpus or Path(config.train) / "corpus.jsonl"
    corpus = watch.run("read corpus", None, read_corpus, corpus_path)
    watch.stages["read corpus"]["items"] = len(corpus)
    judged = read_training_judgments(config.train, config.train_split, corpus)
    notes: dict[str, Any] = {"dropped_training_judgments": judged.dropped_judgments, "shared_queries": 0}
    if config.eval is not None:
        eval_data = read_judged_queries(config.eval, config.eval_split, corpus)
        shared = set(judged.queries["query_id"]) & set(eval_data.queries["query_id"])
        if shared:  # a query judged on both sides is evaluated, never trained on
            logger.warning("%d queries are in both the training and the evaluation judgments", len(shared))
            judged = subset(judged, set(judged.queries["query_id"]) - shared, judged.split)
        notes["shared_queries"] = len(shared)
        eval_note = f"{config.eval} [{config.eval_split}], {len(eval_data.queries)} queries"
    else:
        judged, eval_data = carve_by_query(judged, config.eval_fraction)
        eval_note = (
            f"{len(eval_data.queries)} queries carved off {config.train} [{config.train_split}] by a hash "
            "of the query id (never trained on)"
        )
    if len(judged.queries) < 2:
        raise ValueError(f"{config.train}: {len(judged.queries)} judged training queries; at least 2 needed")
    logger.info(
        "corpus %s: %d documents; %d judged training queries; evaluation: %s",
        corpus_path,
        len(corpus),
        len(judged.queries),
        eval_note,
    )
    return corpus, judged, eval_data, eval_note, notes


def run_judged(config: Any, logger: Any) -> dict:
    """Read, label, (search,) train, evaluate, gate and report; returns the summary (also saved as JSON)."""
    from finetune.hparam_report import trials_markdown
    from tasks.core.embeddings import EmbeddingCache, cache_for
    from tasks.core.evaluation import evaluate_modes, identical_ids, served_mode
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.core.registry import Registry, document_model_of
    from tasks.core.report import publish_markdown
    from tasks.core.store import Store
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import check_writable
    from tasks.labelled.judged_report import judged_report
    from tasks.text.pipeline import LabelPipeline

    check_writable(config.workspace)
    watch, store, registry = Stopwatch(), Store(config.workspace), Registry(config.workspace)
    progress = progress_reporter(logger)
    corpus, judged, eval_data, eval_note, notes = _read_inputs(config, watch, logger)
    start = resolve_model(config.model)
    # a version `adapt text` adapted only on its query side (--model pointing at it) keeps serving
    # documents with its document model: the documents, the offline teacher and the store keys are
    # that model's (so `adapt text`'s lists are read, not made again); training starts from `start`
    kept = document_model_of(start.path)
    documents = resolve_model(kept) if kept else start
    if documents.path != start.path:
        logger.info("starting model %s serves documents with %s", start.path, documents.path)
    encoder = load_sentence_transformer(documents)
    stages = _text_stages(config)
    cache = EmbeddingCache(
        config.workspace,
        encoder,
        documents.fingerprint,
        max_seq_length=stages.mine.max_seq_length,
        batch_size=stages.mine.batch_size,
    )
    pipeline = LabelPipeline(
        corpus, cache, store, documents.fingerprint, stages, watch=watch, progress=progress
    )
    logger.info("offline teacher: %s", pipeline.teacher_weight.describe())
    length = config.eval_max_seq_length
    docs = cache_for(documents, config.workspace, max_seq_length=length, reuse=cache)
    before_queries = cache_for(start, config.workspace, max_seq_length=length, reuse=docs)

    # --- candidate lists: the judged queries' (teacher's top + judged documents), then the pseudo ones
    doc_ids, doc_vectors = pipeline.doc_embeddings
    row_of = {d: i for i, d in enumerate(doc_ids)}
    build = _list_builder(config, pipeline, corpus, row_of)
    with watch.stage("judged lists") as record:
        built = build(judged)
        record["items"] = len(built.queries)
    pseudo_lists = _pseudo_lists(config, pipeline, row_of) if config.with_pseudo_labels else None
    settings, search = config.listwise, None
    if config.search:
        with watch.stage("search") as record:
            search = _search(config, start, judged, build, pseudo_lists, doc_vectors, docs, pipeline, logger)
            record["items"] = len(search.trials)
        settings = config.listwise.model_copy(update=search.best_params)
        logger.info(
            "search: best trial %d of %d, %s", search.best_trial, len(search.trials), search.best_params
        )
    lists = mix_lists(built, pseudo_lists, settings.pseudo_per_judged, config.seed)
    pseudo = len(lists) - len(built.queries)
    logger.info(
        "training lists: %d judged (%d judged documents added from outside the teacher's top; %d "
        "unjudged candidates above every judged one left out of the contrastive term), %d generated",
        len(built.queries),
        built.positives_added,
        built.filtered,
        pseudo,
    )

    # --- training (query side; the documents keep the start model's embeddings)
    result = train_query_side(
        watch,
        key_name="train-judged",
        inputs=[lists.digest(), pipeline.embeddings_ref.key],
        model_name=config.model_name,
        start=start,
        lists=lists,
        document_vectors=doc_vectors,
        settings=settings,
        workspace=config.workspace,
    )

    # --- evaluate before/after over the whole corpus, dense and hybrid
    before_weight = pipeline.teacher_weight.weight
    if documents.path != start.path:  # the starting version's queries get a hybrid weight of their own
        with watch.stage("choose bm25 weight before") as record:
            choice = pipeline.choose_bm25_weight(
                cache_for(
                    start, config.workspace, max_seq_length=stages.mine.max_seq_length, reuse=before_queries
                )
            )
            record["items"] = choice.probes
        before_weight = choice.weight
    trained_model = resolve_model(str(result.model_dir))
    after_queries = cache_for(trained_model, config.workspace, max_seq_length=length)
    with watch.stage("choose bm25 weight after") as record:
        weight_after = pipeline.choose_bm25_weight(
            cache_for(
                trained_model,
                config.workspace,
                max_seq_length=stages.mine.max_seq_length,
                reuse=after_queries,
            )
        )
        record["items"] = weight_after.probes
    exclude = identical_ids(eval_data)
    evaluation = evaluate_modes(
        watch,
        eval_data,
        pipeline.bm25,
        exclude,
        pool=config.label.pool,
        before=(before_queries, docs, before_weight, f"before: {config.model}"),
        after=(after_queries, docs, weight_after.weight, "after: fine-tuned"),
        progress=progress,
    )
    mode = served_mode(evaluation, config.serve_mode)
    before, after = evaluation[mode]
    card = {
        "base_model": config.model,
        "start_model": str(start.path),
        "data_key": corpus.key,
        "train": str(config.train),
        "train_split": judged.split,
        "eval_set": eval_note,
        "config": json.loads(config.model_dump_json()),
        "settings": settings.model_dump(mode="json"),
        "method": "judged listwise" + (" + pseudo-labels" if pseudo else ""),
        "search": search.card() if search else None,
        "serving": {"mode": mode, "bm25_weight": weight_after.weight, "pool": config.label.pool},
        "metrics_before": evaluation["dense"][0].metrics,
        "metrics_after": evaluation["dense"][1].metrics,
        "metrics_before_hybrid": evaluation["hybrid"][0].metrics,
        "metrics_after_hybrid": evaluation["hybrid"][1].metrics,
        "document_model": str(documents.path),
        "document_fingerprint": documents.fingerprint,
        "kind": "sentence-transformer",
    }
    decision = registry.register_and_gate(
        config.model_name,
        result.model_dir,
        card,
        new_score=after.primary,
        current_score=before.primary,
        metric=f"{mode} nDCG@10",
        min_delta=config.promote_min_delta,
        promote=config.promote,
    )
    logger.info("%s %s: %s", config.model_name, decision.version, decision.reason)
    if decision.promoted:  # the promoted version serves searches: its index goes next to it
        from tasks.core.index import INDEX_DIR, index_corpus

        watch.run(
            "search index",
            len(corpus),
            index_corpus,
            encoder,
            corpus,
            registry.path(config.model_name, decision.version) / INDEX_DIR,
            cache=docs,
            max_seq_length=length,
        )
    watch.stages["total"] = {"seconds": watch.total()}
    summary = judged_report(
        workspace=Path(config.workspace),
        model_name=config.model_name,
        corpus=corpus,
        train=judged,
        eval_data=eval_data,
        eval_note=eval_note,
        evaluation=evaluation,
        mode=mode,
        weights={"teacher": pipeline.teacher_weight, "after": weight_after},
        identical=len(exclude),
        lists={
            "judged": len(built.queries),
            "pseudo": pseudo,
            "positives_added": built.positives_added,
            "filtered": built.filtered,
        },
        notes=notes,
        result=result,
        search=search,
        search_markdown=trials_markdown(search) if search is not None else None,
        settings=settings.model_dump(mode="json"),
        decision=decision,
        stages=watch.stages,
        output=config.output,
        stamp=time.strftime("%Y%m%d-%H%M%S"),
    )
    publish_markdown(
        summary["markdown"],
        key="supervised-judged-report",
        description="judged queries: before/after, examples, search, timings",
    )
    logger.info("report written to %s", summary["report"])
    return summary


def _list_builder(config: Any, pipeline: Any, corpus: Any, row_of: dict[str, int]) -> Any:
    """``build(judged queries)`` -> their lists (:func:`tasks.labelled.judged.judged_lists`), the
    offline teacher choosing the candidates and, where a cross-encoder teaches, re-scoring them."""
    from tasks.labelled.judged import filter_unjudged, judged_lists

    teacher, _ = pipeline.teacher()

    def build(data: Any) -> Any:
        rows = pipeline.offline_teacher.rank_rows(data.queries["text"].tolist())
        built = judged_lists(data, rows, row_of, config.lists.top)
        if teacher is not pipeline.offline_teacher:
            texts = corpus.texts()
            pairs_q = [q for q in built.queries for _ in range(built.candidates.shape[1])]
            pairs_p = [texts[c] for c in built.candidates.reshape(-1)]
            built.scores = np.asarray(teacher.score(pairs_q, pairs_p), np.float32).reshape(built.scores.shape)
            built.filtered = filter_unjudged(built.relevance, built.scores)
        return built

    return build


def _pseudo_lists(config: Any, pipeline: Any, row_of: dict[str, int]) -> Any:
    """`adapt text`'s generated training queries and their teacher lists, as :class:`CandidateLists`,
    from the same stages and keys, so a corpus `adapt text` has run on is read from the store."""
    from finetune.listwise import CandidateLists
    from tasks.core.defaults import MAX_HELDOUT_QUERIES

    queries_ref, queries = pipeline.queries()
    # the seed only samples which held-out queries are evaluated; the training ones do not depend on it
    train_queries, _ = pipeline.split_queries(queries, MAX_HELDOUT_QUERIES, seed=0)
    _, table = pipeline.lists(queries_ref, sorted(train_queries["query_id"]), config.lists)
    return CandidateLists.from_table(
        table, dict(zip(queries["query_id"], queries["text"], strict=True)), row_of
    )


def mix_lists(built: Any, pseudo: Any, per_judged: float, seed: int) -> Any:
    """The judged lists plus ``per_judged`` generated queries' lists per judged query (a seeded sample
    of the lists ``pseudo``; none when it is None), at the judged lists' width."""
    from finetune.listwise import CandidateLists

    lists = CandidateLists(built.queries, built.candidates, built.scores, built.relevance)
    take = 0 if pseudo is None else min(len(pseudo), int(round(per_judged * len(lists))))
    if take == 0:
        return lists
    chosen = np.sort(np.random.default_rng(seed).choice(len(pseudo), size=take, replace=False))
    candidates, scores = _fit_width(
        pseudo.candidates[chosen], pseudo.scores[chosen], lists.candidates.shape[1]
    )
    return CandidateLists(
        lists.queries + [pseudo.queries[i] for i in chosen],
        np.concatenate([lists.candidates, candidates]),
        np.concatenate([lists.scores, scores]),
        np.concatenate([lists.relevance, np.zeros(candidates.shape, dtype=np.int8)]),
    )


def _fit_width(candidates: np.ndarray, scores: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pseudo lists cut or repeated (their last column) to the judged lists' width (a query with more
    judged documents than the list's top widens the judged lists)."""
    if candidates.shape[1] >= width:
        return candidates[:, :width], scores[:, :width]
    pad = width - candidates.shape[1]
    return (
        np.concatenate([candidates, np.repeat(candidates[:, -1:], pad, axis=1)], axis=1),
        np.concatenate([scores, np.repeat(scores[:, -1:], pad, axis=1)], axis=1),
    )


def _search(config, start, judged, build, pseudo, doc_vectors, docs, pipeline, logger) -> Any:
    """The Optuna search (:mod:`finetune.judged_search`): trials train on the judged queries less a
    validation split carved by query, and are scored by dense nDCG@10 on that split."""
    from finetune.judged_search import JudgedSearchSettings, run_judged_search
    from tasks.core.embeddings import cache_for
    from tasks.core.evaluation import evaluate_cached, identical_ids
    from tasks.core.models import resolve_model
    from tasks.labelled.judged import carve_by_query

    fit, validation = carve_by_query(judged, config.search_validation_fraction, salt="validation")
    fit_built = build(fit)
    logger.info(
        "search: %d trials; %d training and %d validation queries",
        config.search,
        len(fit_built.queries),
        len(validation.queries),
    )

    def score(model_dir: Path) -> float:
        queries = cache_for(
            resolve_model(str(model_dir)), config.workspace, max_seq_length=docs.max_seq_length
        )
        report = evaluate_cached(
            queries, validation, "trial", doc_cache=docs, exclude=identical_ids(validation)
        )
        return report.metrics["nDCG@10"]

    def on_trial(row: dict) -> None:
        logger.info("search trial %d: %s, nDCG@10 %s", row["number"], row["state"].lower(), row["value"])

    inputs = [mix_lists(fit_built, None, 0, 0).digest(), pipeline.embeddings_ref.key]
    if pseudo is not None:
        inputs.append(pseudo.digest())
    return run_judged_search(
        str(start.path),
        doc_vectors,
        config.listwise,
        JudgedSearchSettings(**config.model_dump(include=set(JudgedSearchSettings.model_fields))),
        trials=config.search,
        lists_for=lambda per_judged: mix_lists(fit_built, pseudo, per_judged, config.seed),
        score=score,
        with_pseudo=pseudo is not None,
        workdir=Path(config.workspace) / "search",
        inputs=inputs,
        seed=config.seed,
        on_trial=on_trial,
    )
