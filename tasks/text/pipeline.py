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

import numpy as np
import pandas as pd

from tasks.core.bm25 import BM25Index
from tasks.core.corpus import Corpus
from tasks.core.embeddings import embed_corpus, load_embeddings
from tasks.core.heldout import heldout_mask, split_heldout_queries
from tasks.core.parts import ENCODE_PART_SIZE, LOCAL, PartRunner
from tasks.core.store import StageRef, Store, stage_key
from tasks.core.timing import Stopwatch
from tasks.text.fusion import Probes, WeightChoice, choose_weight, make_probes, probe_rows
from tasks.text.lists import ListConfig, list_stage
from tasks.text.negatives import MineConfig, MineInputs, mine_stage
from tasks.text.pseudo_labels import LabelConfig, label_stage, positive_passage
from tasks.text.queries import OFFLINE, OfflineGenerator, QGenConfig, generate_queries
from tasks.text.shared import SharedCorpus, SharedEmbeddings, corpus_texts_stage
from tasks.text.teachers import (
    CrossEncoderSpec,
    CrossEncoderTeacher,
    OfflineTeacher,
    TeacherSpec,
    built,
    source_ranker,
)

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
        query_cache: Any = None,
        parts: PartRunner = LOCAL,
    ):
        """``settings`` has the stages' sections, as every text flow's config does: ``qgen``
        (:class:`QGenConfig`), ``mine`` (:class:`MineConfig`) and ``label`` (:class:`LabelConfig`),
        and ``heldout_fraction`` (the documents whose queries are never trained on: the probes of the
        BM25 weight come from them). ``cache`` encodes documents; ``query_cache`` queries (default: the
        same model; another one when a version adapted only its query side). ``parts`` runs the
        parts of every per-part stage (default: here, one after another)."""
        self.corpus, self.cache, self.store, self.fingerprint = corpus, cache, store, fingerprint
        self.query_cache = query_cache or cache
        self.heldout_fraction: float = settings.heldout_fraction
        self.qgen: QGenConfig = settings.qgen
        self.mine: MineConfig = settings.mine
        self.label: LabelConfig = settings.label
        self.watch, self.progress, self.parts = watch, progress, parts
        began = time.time()
        self.embeddings_ref = watch.run(
            encode_stage,
            len(corpus),
            embed_corpus,
            corpus,
            cache,
            store,
            part_size=getattr(settings, "encode_part_size", ENCODE_PART_SIZE),
            progress=progress("encoding corpus (parts)"),
            parts=parts,
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
    def probe_doc_ids(self) -> list[str]:
        """Documents whose title and inverse-cloze queries choose the BM25 weight; a flow never trains
        on their queries (a salted hash of the id, as :mod:`tasks.core.heldout`, with its own salt)."""
        mask = heldout_mask(self.corpus.ids, self.heldout_fraction, salt="probe")
        return [d for d, held in zip(self.corpus.ids, mask, strict=True) if held]

    @cached_property
    def probes(self) -> Probes:
        """Title and inverse-cloze queries of the probe documents, for choosing the BM25 weight."""
        held = set(self.probe_doc_ids)
        rows = [i for i, d in enumerate(self.corpus.ids) if d in held]
        generator = OfflineGenerator(QGenConfig(seed=self.qgen.seed), self.corpus)
        return make_probes(self.corpus, rows, generator, limit=self.label.probe_queries, seed=self.qgen.seed)

    def probe_scores(
        self, query_cache: Any = None, *, doc_cache: Any = None, doc_vectors: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Dense and BM25 rows of the probes: queries through ``query_cache`` (default the pipeline's),
        passages through ``doc_cache`` with the corpus rows ``doc_vectors`` (default the pipeline's)."""
        probes = self.probes
        queries = (query_cache or self.query_cache).embed(probes.texts, desc="encoding probe queries")
        positives = (doc_cache or self.cache).embed(probes.positives, desc="encoding probe passages")
        vectors = self.doc_embeddings[1] if doc_vectors is None else doc_vectors
        return probe_rows(probes, self.bm25, queries, positives, vectors)

    def choose_bm25_weight(self, query_cache: Any = None, **documents: Any) -> WeightChoice:
        """The hybrid's BM25 weight for queries encoded by ``query_cache`` (the setting when it is a
        number, else chosen on the probes; see :mod:`tasks.text.fusion`); ``documents`` as for
        :meth:`probe_scores`."""
        if self.label.bm25_weight != "auto":
            fixed = float(self.label.bm25_weight)
            return WeightChoice(fixed, fixed, fixed, 0.0, 0)
        dense, lexical = self.probe_scores(query_cache, **documents)
        return choose_weight(dense, lexical, self.probes.sources, default=self.label.default_bm25_weight)

    @cached_property
    def teacher_weight(self) -> WeightChoice:
        """The offline teacher's BM25 weight (chosen once per corpus and start model)."""
        with self.watch.stage("choose bm25 weight") as record:
            choice = self.choose_bm25_weight()
            record["items"] = choice.probes
        return choice

    @cached_property
    def offline_teacher(self) -> OfflineTeacher:
        return OfflineTeacher(
            self.bm25,
            self.query_cache,
            self.doc_embeddings[1],
            bm25_weight=self.teacher_weight.weight,
            pool=self.label.pool,
            passage_dense=self.cache,
        )

    def teacher_key(self) -> str:
        """Names the offline teacher: its settings, the corpus and the models whose embeddings it uses."""
        models = [_cache_name(self.cache)] + (
            [_cache_name(self.query_cache)] if self.query_cache is not self.cache else []
        )
        return stage_key(
            "offline-teacher",
            {"w": self.teacher_weight.weight, "pool": self.label.pool, "catalog": self.corpus.key},
            models=models,
        )

    def queries(self, docs: Corpus | None = None) -> tuple[StageRef, pd.DataFrame]:
        """Queries for ``docs`` (default: the whole corpus), consistency-filtered by the offline teacher."""
        from tasks.core.models import resolve_model

        docs = docs if docs is not None else self.corpus
        generator = [] if self.qgen.generator == OFFLINE else [resolve_model(self.qgen.generator).fingerprint]
        filtered = bool(self.qgen.consistency_top_k)
        key = stage_key(
            "queries",
            self.qgen.model_dump(mode="json"),
            inputs=[docs.key],
            models=[self.fingerprint, *generator, *([self.teacher_key()] if filtered else [])],
        )
        rank_of_source = None
        if filtered:
            spec = self.teacher_spec()  # on a cluster, the workers filter with their own teacher
            rank_of_source = source_ranker(
                spec or self.offline_teacher, None if spec else self.doc_embeddings[0], docs.ids, docs.texts()
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
            parts=self.parts,
        )
        report_reuse("generate queries", ref, began)
        return ref, self.store.read_pandas("queries", ref.key)

    def split_queries(
        self, queries: pd.DataFrame, limit: int, seed: int
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(training, held-out) generated queries: the probe documents' queries are in neither, the
        held-out documents' (:func:`tasks.core.heldout.split_heldout_queries`, at most ``limit``, a
        sample seeded by ``seed``) are never trained on. Every flow that trains on a corpus's
        generated queries selects them here, so they share the candidate-lists stage."""
        probe_docs = set(self.probe_doc_ids)
        return split_heldout_queries(
            queries[~queries["doc_id"].isin(probe_docs)], self.heldout_fraction, limit, seed=seed
        )

    def _on_workers(self) -> bool:
        """Whether the teacher's and the miner's parts go to the cluster: with a distributed runner,
        when both encoders can be rebuilt on a worker (their caches have specs)."""
        return (
            self.parts.distributed
            and getattr(self.query_cache, "spec", None) is not None
            and getattr(self.cache, "spec", None) is not None
        )

    def shared_corpus(self) -> SharedCorpus:
        """The corpus as workers read it (its texts written to the workspace once)."""
        return SharedCorpus(str(self.store.workspace), corpus_texts_stage(self.store, self.corpus))

    def shared_embeddings(self) -> SharedEmbeddings:
        return SharedEmbeddings(str(self.store.workspace), self.embeddings_ref.key)

    def teacher_spec(self) -> TeacherSpec | None:
        """The offline teacher as workers build it (from the shared workspace), when its parts run on
        the cluster; else None (the teacher stays in this process)."""
        if not self._on_workers():
            return None
        return TeacherSpec(
            self.shared_corpus(),
            self.shared_embeddings(),
            self.query_cache.spec,
            self.cache.spec,
            self.teacher_weight.weight,
            self.label.pool,
        )

    def teacher(self) -> tuple[Any, str]:
        """The configured teacher and its fingerprint (the offline one is keyed by its settings,
        the corpus and the model whose embeddings it uses). On a cluster, a spec workers build it from."""
        if self.label.teacher == OFFLINE:
            return self.teacher_spec() or self.offline_teacher, self.teacher_key()
        from tasks.core.models import resolve_model

        settings = {"batch_size": self.label.batch_size, "max_length": self.label.max_length}
        fingerprint = resolve_model(self.label.teacher).fingerprint
        if self.parts.distributed:
            return CrossEncoderSpec(self.label.teacher, **settings), fingerprint
        return CrossEncoderTeacher(self.label.teacher, **settings), fingerprint

    def labels(self, queries_ref: StageRef, train_ids: Sequence[str]) -> tuple[StageRef, pd.DataFrame]:
        """Hard negatives for ``train_ids`` and the teacher's margins: (labels stage, labels table).
        Both stages' parts run on the cluster when there is one (see :meth:`_on_workers`)."""
        on_workers = self._on_workers()
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
            self.query_cache,
            self.mine,
            bm25=None if on_workers else self.bm25,  # workers build their own
            progress=self.progress("mining (parts)"),
            parts=self.parts,
            shared=(
                MineInputs(self.shared_embeddings(), self.shared_corpus(), self.query_cache.spec)
                if on_workers
                else None
            ),
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
                parts=self.parts,
                shared_corpus=self.shared_corpus() if self.parts.distributed else None,
            )
            labels = self.store.read_pandas("labels", labels_ref.key)
            record["items"] = len(labels)
        report_reuse("pseudo-labels", labels_ref, began)
        return labels_ref, labels

    def lists(
        self, queries_ref: StageRef, train_ids: Sequence[str], config: ListConfig
    ) -> tuple[StageRef, pd.DataFrame]:
        """Candidate lists for ``train_ids`` scored by the configured teacher (the listwise method's
        labels): (lists stage, lists table)."""
        teacher, fingerprint = self.teacher()
        rescore = None
        if self.label.teacher != OFFLINE:  # the offline teacher chooses, the cross-encoder scores: here
            rescore, teacher = built(teacher).score, self.offline_teacher
        began = time.time()
        with self.watch.stage("candidate lists") as record:
            ref = list_stage(
                self.store,
                queries_ref,
                list(train_ids),
                self.corpus,
                teacher,
                fingerprint,
                config,
                rescore=rescore,
                progress=self.progress("candidate lists (parts)"),
                parts=self.parts,
            )
            table = self.store.read_pandas("lists", ref.key)
            record["items"] = len(table)
        report_reuse("candidate lists", ref, began)
        return ref, table


def _cache_name(cache: Any) -> str:
    """An embedding cache's name: its model, length and encoder (PyTorch or ONNX) when it has a folder."""
    folder = getattr(cache, "folder", None)
    return folder.name if folder is not None else cache.fingerprint


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
