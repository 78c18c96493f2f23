"""The GPL label pipeline, written once: corpus -> queries -> negatives -> teacher -> labels.

`adapt text` runs it over the whole corpus; the catalog refresh runs it over the new and changed
products only (``queries(delta)``) against the whole catalog's embeddings. Each step is a store
stage keyed by its config, its input's key and the models' fingerprints, so a rerun reuses what is
finished and a crash resumes at the last finished part.

* :class:`LabelPipeline` holds what every step shares: the corpus embeddings of the model whose
  document side serves (a stage of their own), BM25 over the corpus (built on first use) and the
  offline teacher made of both;
* :meth:`LabelPipeline.queries`: generate (and consistency-filter) queries for some documents;
* :meth:`LabelPipeline.labels`: mine negatives for the chosen training queries and label them with
  the configured teacher (the offline hybrid, or a cross-encoder);
* :func:`training_table`: the labels joined with the query and passage texts, the table the
  MarginMSE trainer reads (one row per query: its text, positive, negatives and margins).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import pandas as pd

from tasks.core.bm25 import BM25Index
from tasks.core.corpus import Corpus
from tasks.core.embeddings import embed_corpus, load_embeddings
from tasks.core.store import StageRef, Store, stage_key
from tasks.core.timing import Stopwatch
from tasks.text.negatives import MineConfig, mine_stage
from tasks.text.pseudo_labels import LabelConfig, label_stage, positive_passage
from tasks.text.queries import OFFLINE, QGenConfig, generate_queries
from tasks.text.teachers import CrossEncoderTeacher, OfflineTeacher, source_ranker

log = logging.getLogger(__name__)
Progress = Callable[[str], Callable[[int, int], None] | None]


def _no_progress(label: str) -> None:
    return None


def report_reuse(stage: str, ref: StageRef, started: float) -> None:
    """Say what a rerun reused: a stage finished before this run, or resumed after some finished parts."""
    manifest = ref.manifest
    timings, parts = manifest.get("timings", {}), len(manifest.get("parts", []))
    if timings.get("finished", started) < started:
        log.info("%s: reused %d of %d parts (finished in an earlier run)", stage, parts, parts)
    elif timings.get("resumed_parts"):
        log.info("%s: resumed after %d of %d parts", stage, timings["resumed_parts"], parts)


class LabelPipeline:
    """The GPL stages over one corpus, with the embeddings of ``cache``'s model.

    ``fingerprint`` names the model whose embeddings the stages use (it keys queries and labels);
    ``progress(label)`` gives a ``(done, total)`` callback for a long step, or None.
    """

    def __init__(
        self,
        corpus: Corpus,
        cache: Any,
        store: Store,
        fingerprint: str,
        settings: Any,
        *,
        watch: Stopwatch,
        progress: Progress = _no_progress,
        encode_stage: str = "encode corpus",
    ):
        """``settings`` has the stages' sections, as every text flow's config does: ``qgen``
        (:class:`QGenConfig`), ``mine`` (:class:`MineConfig`) and ``label`` (:class:`LabelConfig`)."""
        self.corpus, self.cache, self.store, self.fingerprint = corpus, cache, store, fingerprint
        self.qgen: QGenConfig = settings.qgen
        self.mine: MineConfig = settings.mine
        self.label: LabelConfig = settings.label
        self.watch, self.progress = watch, progress
        began = time.time()
        self.embeddings_ref = watch.run(
            encode_stage,
            len(corpus),
            embed_corpus,
            corpus,
            cache,
            store,
            progress=progress("encoding corpus"),
        )
        report_reuse(encode_stage, self.embeddings_ref, began)

    @cached_property
    def doc_embeddings(self) -> tuple[list[str], Any]:
        doc_ids, _, vectors = load_embeddings(self.store, self.embeddings_ref)
        return doc_ids, vectors

    @cached_property
    def bm25(self) -> BM25Index:
        return self.watch.run("bm25 index", len(self.corpus), BM25Index, self.corpus.texts())

    @cached_property
    def offline_teacher(self) -> OfflineTeacher:
        return OfflineTeacher(
            self.bm25,
            self.cache,
            self.doc_embeddings[1],
            bm25_weight=self.label.bm25_weight,
            pool=self.label.pool,
        )

    def queries(self, docs: Corpus | None = None) -> tuple[StageRef, pd.DataFrame]:
        """Queries for ``docs`` (default: the whole corpus), consistency-filtered by the offline teacher."""
        from tasks.core.models import resolve_model

        docs = docs if docs is not None else self.corpus
        generator = [] if self.qgen.generator == OFFLINE else [resolve_model(self.qgen.generator).fingerprint]
        key = stage_key(
            "queries",
            self.qgen.model_dump(mode="json"),
            inputs=[docs.key],
            models=[self.fingerprint, *generator],
        )
        rank_of_source = None
        if self.qgen.consistency_top_k:
            rank_of_source = source_ranker(
                self.offline_teacher, self.doc_embeddings[0], docs.ids, docs.texts()
            )
        began = time.time()
        ref = self.watch.run(
            "generate queries",
            len(docs),
            generate_queries,
            docs,
            self.qgen,
            self.store,
            key=key,
            rank_of_source=rank_of_source,
            progress=self.progress("query generation (parts)"),
        )
        report_reuse("generate queries", ref, began)
        return ref, self.store.read_pandas("queries", ref.key)

    def teacher(self) -> tuple[Any, str]:
        """The configured teacher and its fingerprint (the offline one is keyed by its settings,
        the corpus and the model whose embeddings it uses)."""
        if self.label.teacher == OFFLINE:
            fingerprint = stage_key(
                "offline-teacher",
                {"w": self.label.bm25_weight, "pool": self.label.pool, "catalog": self.corpus.key},
                models=[self.fingerprint],
            )
            return self.offline_teacher, fingerprint
        teacher = CrossEncoderTeacher(
            self.label.teacher, batch_size=self.label.batch_size, max_length=self.label.max_length
        )
        return teacher, teacher.resolved.fingerprint

    def labels(self, queries_ref: StageRef, train_ids: Sequence[str]) -> tuple[StageRef, pd.DataFrame]:
        """Hard negatives for ``train_ids`` and the teacher's margins: (labels stage, labels table)."""
        began = time.time()
        negatives_ref = self.watch.run(
            "mine negatives",
            len(train_ids),
            mine_stage,
            self.store,
            queries_ref,
            list(train_ids),
            self.corpus,
            self.embeddings_ref,
            self.cache,
            self.mine,
            bm25=self.bm25,
            progress=self.progress("mining (parts)"),
        )
        report_reuse("mine negatives", negatives_ref, began)
        teacher, fingerprint = self.teacher()
        began = time.time()
        with self.watch.stage("pseudo-labels") as record:
            labels_ref = label_stage(
                self.store,
                negatives_ref,
                queries_ref,
                self.corpus,
                teacher,
                fingerprint,
                self.label,
                progress=self.progress("labelling (parts)"),
            )
            labels = self.store.read_pandas("labels", labels_ref.key)
            record["items"] = len(labels)
        report_reuse("pseudo-labels", labels_ref, began)
        return labels_ref, labels


def training_table(labels: pd.DataFrame, queries: pd.DataFrame, corpus: Corpus) -> pd.DataFrame:
    """One row per labelled query (sorted by query id): ``query``, ``positive`` (the passage it was made
    from), ``negatives`` (texts) and ``margins`` (the teacher's, one per negative)."""
    texts = dict(zip(corpus.ids, corpus.texts(), strict=True))
    info = queries.set_index("query_id")
    rows = []
    for query_id, group in labels.groupby("query_id", sort=True):
        record = info.loc[query_id]
        rows.append(
            {
                "query": record["text"],
                "positive": positive_passage(record, texts),
                "negatives": [texts[n] for n in group["neg_id"]],
                "margins": group["margin"].astype(float).tolist(),
            }
        )
    return pd.DataFrame(rows, columns=["query", "positive", "negatives", "margins"])
