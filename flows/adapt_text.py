"""Flow: unsupervised adaptation of a bi-encoder to a corpus (GPL).

corpus -> queries -> negatives -> pseudo-labels (:class:`tasks.text.pipeline.LabelPipeline`) ->
MarginMSE training -> before/after -> register and gate -> report. Every stage's output goes through
the store, so a rerun with the same inputs does no work and a crash resumes at the last finished part.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import ConfigDict, Field, model_validator

from finetune.listwise import ListwiseConfig
from finetune.marginmse import TrainConfig
from flows.engine import part_runner
from flows.stages import progress_reporter, train_marginmse_task, train_query_side
from tasks.core.defaults import (
    BASE_MODEL,
    DEFAULT_WORKSPACE,
    HELDOUT_FRACTION,
    MAX_HELDOUT_QUERIES,
    TEXT_MODEL_NAME,
)
from tasks.core.evaluation import evaluate_modes, heldout_eval_set, served_mode
from tasks.core.index import INDEX_DIR, index_corpus
from tasks.core.parts import LOCAL, EngineSettings, encode_part_size_field
from tasks.core.settings import deep_merge, require_beir_split, require_path
from tasks.text.lists import ListConfig
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
        "method": "marginmse",
    },
}


class AdaptTextConfig(EngineSettings):
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
        HELDOUT_FRACTION,
        gt=0,
        lt=0.5,
        description="without --eval: share of documents whose generated queries are held out for evaluation",
    )
    max_heldout_queries: int = Field(
        MAX_HELDOUT_QUERIES, ge=10, description="without --eval: most held-out queries evaluated"
    )
    max_train_queries: int | None = Field(
        None, ge=1, description="train on at most this many generated queries (a seeded sample); none: all"
    )
    promote_min_delta: float = Field(
        0.0, ge=0, description="promote only when nDCG@10 improves by more than this"
    )
    eval_max_seq_length: int = Field(256, ge=8, le=8192, description="tokens per passage when evaluating")
    encode_backend: Literal["pytorch", "onnx", "onnx-int8"] = Field(
        "pytorch",
        description="how the start model encodes without gradients (corpus, teacher queries, probes, "
        "the before evaluation): PyTorch, or ONNX Runtime in fp32 or int8 (exported once per "
        "workspace, refused if its embeddings drift from PyTorch's)",
    )
    seed: int = Field(13, description="random seed for sampling and splitting")
    encode_part_size: int = encode_part_size_field()
    method: Literal["listwise", "marginmse"] = Field(
        "listwise",
        description="listwise: the query side learns the teacher's order of each query's candidate "
        "documents against their cached embeddings (minutes on a CPU; the index stays valid); "
        "marginmse: GPL's MarginMSE on both sides (hours on a CPU)",
    )
    serve_mode: Literal["auto", "dense", "hybrid"] = Field(
        "auto",
        description="what the new version serves and the gate compares: dense, hybrid (dense + BM25), "
        "or auto: whichever measures better after training",
    )
    qgen: QGenConfig = Field(default_factory=QGenConfig, description="query generation")
    mine: MineConfig = Field(default_factory=MineConfig, description="negative mining (method marginmse)")
    label: LabelConfig = Field(default_factory=LabelConfig, description="pseudo-labels")
    lists: ListConfig = Field(default_factory=ListConfig, description="candidate lists (method listwise)")
    listwise: ListwiseConfig = Field(
        default_factory=ListwiseConfig, description="listwise training of the query side (method listwise)"
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="MarginMSE training (method marginmse)"
    )

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
    from tasks.core.corpus import read_corpus, read_judged_queries
    from tasks.core.embeddings import CacheSpec, EmbeddingCache
    from tasks.core.evaluation import identical_ids
    from tasks.core.models import load_sentence_transformer, resolve_model
    from tasks.core.registry import Registry
    from tasks.core.report import publish_markdown
    from tasks.core.store import Store
    from tasks.core.timing import Stopwatch
    from tasks.core.workspace import check_writable
    from tasks.text.pipeline import LabelPipeline
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
    # a version that adapted only its query side serves documents with an earlier model
    documents = resolve_model(registry.document_model(config.model_name, current)) if current else start
    encoder = load_sentence_transformer(start)
    doc_encoder = encoder if documents.path == start.path else load_sentence_transformer(documents)

    def cache_of(
        model: Any, resolved: Any, length: int, backend: str = config.encode_backend
    ) -> EmbeddingCache:
        from tasks.core.onnx import fast_encode

        encode = fast_encode(
            resolved.path, resolved.fingerprint, config.workspace, backend=backend, max_seq_length=length
        )
        name = f"{resolved.fingerprint}-{length}-{backend}" if encode else None
        return EmbeddingCache(
            config.workspace,
            model,
            resolved.fingerprint,
            max_seq_length=length,
            batch_size=config.mine.batch_size,
            encode=encode,
            name=name,
            spec=CacheSpec(
                str(config.workspace),
                str(resolved.path),
                resolved.fingerprint,
                length,
                config.mine.batch_size,
                backend,
                name,
            ),
        )

    cache = cache_of(doc_encoder, documents, config.mine.max_seq_length)
    query_cache = cache if doc_encoder is encoder else cache_of(encoder, start, config.mine.max_seq_length)

    # --- 1. corpus embeddings, queries (and below, candidate lists): the per-part stages, on a Dask
    # cluster with task_runner dask (open until the lists are done)
    with contextlib.ExitStack() as engine:  # closed by the training step (leave_cluster)
        parts = engine.enter_context(part_runner(config, config.workspace))
        pipeline = LabelPipeline(
            corpus,
            cache,
            store,
            documents.fingerprint,
            config,
            watch=watch,
            progress=progress_reporter(logger),
            query_cache=query_cache,
            parts=parts,
        )
        logger.info("offline teacher: %s", pipeline.teacher_weight.describe())

        def leave_cluster() -> None:  # the training step calls it once its labels are stored
            engine.close()
            pipeline.parts = LOCAL

        queries_ref, queries = pipeline.queries()
        manifest = queries_ref.manifest
        logger.info("queries: %d kept of %d generated", len(queries), manifest.get("generated", len(queries)))
        if queries.empty:
            raise ValueError(
                "no query survived generation and filtering; lower qgen.consistency_top_k or check the corpus"
            )

        # --- evaluation set: the user's judgments, or generated queries of held-out documents. Queries of
        # held-out and probe documents are never trained on, whichever evaluation set is used.
        train_queries, heldout = pipeline.split_queries(queries, config.max_heldout_queries, config.seed)
        if user_eval is not None:
            eval_data = user_eval
            eval_note = (
                f"the user's queries and judgments: {config.eval} [{config.eval_split}], "
                f"{len(eval_data.queries)} queries"
            )
        else:
            eval_data = heldout_eval_set(corpus, heldout)
            eval_note = (
                f"held-out generated queries ({len(heldout)} queries from {config.heldout_fraction:.0%} of the "
                "documents, never trained on; relevant = the document each was generated from)"
            )
        if config.max_train_queries and len(train_queries) > config.max_train_queries:
            train_queries = train_queries.sample(n=config.max_train_queries, random_state=config.seed)
        train_ids = sorted(train_queries["query_id"])

        # --- 2.-4. labels and training
        trained_run = (_train_listwise if config.method == "listwise" else _train_marginmse)(
            config, pipeline, queries_ref, queries, train_ids, start, query_cache, watch, leave_cluster
        )
    result, labels_key = trained_run["result"], trained_run["labels_key"]

    # --- 5. evaluate before/after (dense and hybrid), register and gate
    length = config.eval_max_seq_length

    def at_length(existing: EmbeddingCache, model: Any, resolved: Any, tokens: int, **backend: str):
        """``existing`` when it already encodes at ``tokens``, else a cache of the same model that does."""
        return existing if existing.max_seq_length == tokens else cache_of(model, resolved, tokens, **backend)

    before_docs = at_length(cache, doc_encoder, documents, length)
    before_queries = before_docs if query_cache is cache else at_length(query_cache, encoder, start, length)
    trained = load_sentence_transformer(str(result.model_dir))
    trained_model = resolve_model(str(result.model_dir))
    after_queries = cache_of(trained, trained_model, length, "pytorch")  # few texts: no export
    after_docs = before_docs if config.method == "listwise" else after_queries
    exclude = identical_ids(eval_data)
    card_before = registry.card(config.model_name, current) if current else {}
    weight_before = (card_before.get("serving") or {}).get("bm25_weight", pipeline.teacher_weight.weight)
    with watch.stage("choose bm25 weight after") as record:
        weight_after = (
            pipeline.choose_bm25_weight(
                at_length(
                    after_queries, trained, trained_model, config.mine.max_seq_length, backend="pytorch"
                )
            )
            if config.method == "listwise"
            else pipeline.choose_bm25_weight(
                after_queries, doc_cache=after_queries, doc_vectors=after_queries.embed(corpus.texts())
            )
        )
        record["items"] = weight_after.probes
    logger.info("hybrid after training: %s", weight_after.describe())
    evaluation = evaluate_modes(
        watch,
        eval_data,
        pipeline.bm25,
        exclude,
        pool=config.label.pool,
        before=(before_queries, before_docs, weight_before, f"before: {current or config.base_model}"),
        after=(after_queries, after_docs, weight_after.weight, "after: adapted"),
        progress=progress_reporter(logger),
    )
    mode = served_mode(evaluation, config.serve_mode)
    before, after = evaluation[mode]
    serving = {"mode": mode, "bm25_weight": weight_after.weight, "pool": config.label.pool}
    card = {
        "base_model": config.base_model,
        "parent_version": current,
        "start_model": start_model,
        "data_key": corpus.key,
        "labels_key": labels_key,
        "config": json.loads(config.model_dump_json()),
        "method": config.method,
        "serving": serving,
        "bm25_weights": {"teacher": pipeline.teacher_weight.to_dict(), "after": weight_after.to_dict()},
        "metrics_before": evaluation["dense"][0].metrics,
        "metrics_after": evaluation["dense"][1].metrics,
        "metrics_before_hybrid": evaluation["hybrid"][0].metrics,
        "metrics_after_hybrid": evaluation["hybrid"][1].metrics,
        "eval_set": eval_note,
        "kind": "sentence-transformer",
    }
    if config.method == "listwise":  # documents keep the embeddings of the model they were indexed with
        card |= {"document_model": str(documents.path), "document_fingerprint": documents.fingerprint}
    decision = registry.register_and_gate(
        config.model_name,
        result.model_dir,
        card,
        new_score=after.primary,
        current_score=before.primary,
        metric=f"{mode} nDCG@10",
        min_delta=config.promote_min_delta,
    )
    logger.info("%s %s: %s", config.model_name, decision.version, decision.reason)
    if decision.promoted:  # the new current serves searches: its index goes next to it (embeddings cached)
        watch.run(
            "search index",
            len(corpus),
            index_corpus,
            doc_encoder if config.method == "listwise" else trained,
            corpus,
            registry.path(config.model_name, decision.version) / INDEX_DIR,
            cache=after_docs,
            max_seq_length=length,
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
        evaluation=evaluation,
        mode=mode,
        weights={"teacher": pipeline.teacher_weight, "after": weight_after, "before": weight_before},
        identical=len(exclude),
        result=result,
        method=config.method,
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


def _train_listwise(
    config, pipeline, queries_ref, queries, train_ids, start, query_cache, watch, leave_cluster
) -> dict:
    """Candidate lists for the training queries (on the cluster, if any, which closes then), then
    listwise training of the query side."""
    from finetune.listwise import CandidateLists

    lists_ref, table = pipeline.lists(queries_ref, train_ids, config.lists)
    leave_cluster()
    doc_ids, doc_vectors = pipeline.doc_embeddings
    row_of = {d: i for i, d in enumerate(doc_ids)}
    lists = CandidateLists.from_table(
        table, dict(zip(queries["query_id"], queries["text"], strict=True)), row_of
    )
    result = train_query_side(
        watch,
        key_name="train-listwise",
        inputs=[lists_ref.key, pipeline.embeddings_ref.key],
        model_name=config.model_name,
        start=start,
        lists=lists,
        document_vectors=doc_vectors,
        settings=config.listwise,
        workspace=config.workspace,
    )
    return {"result": result, "labels_key": lists_ref.key}


def _train_marginmse(
    config, pipeline, queries_ref, queries, train_ids, start, query_cache, watch, leave_cluster
) -> dict:
    """Negatives and margins for the training queries (on the cluster, if any, which closes then),
    then MarginMSE on both sides (GPL)."""
    from finetune.marginmse import TrainingRows, cached_student_margins
    from tasks.core.store import stage_key
    from tasks.text.pipeline import training_table

    labels_ref, labels = pipeline.labels(queries_ref, train_ids)
    leave_cluster()
    rows = TrainingRows.from_table(training_table(labels, queries, pipeline.corpus))
    key = stage_key("train", config.train.key_settings(), inputs=[labels_ref.key], models=[start.fingerprint])
    result = watch.run(
        "train",
        len(rows),
        train_marginmse_task,
        config.model_name,
        str(start.path),
        rows,
        config.train,
        str(config.workspace / "train" / key),
        student_margins=cached_student_margins(query_cache, pipeline.cache),
    )
    watch.stages["train"]["items"] = result.steps * config.train.batch_size
    return {"result": result, "labels_key": labels_ref.key}
