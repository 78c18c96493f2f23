"""Teachers: score (query, passage) pairs for pseudo-labels and for the consistency filter.

Teachers implement ``score(queries, passages) -> float32 array`` over aligned pairs.

* :class:`CrossEncoderTeacher`: a cross-encoder by name (GPL: cross-encoder/ms-marco-MiniLM-L-6-v2),
  raw logits (no sigmoid), so margins keep GPL's scale (~10-20).
* :class:`OfflineTeacher`: needs no extra model: BM25 (bm25s statistics) and the dense bi-encoder,
  each normalised per query (z-score over the query's candidate pool: the union of both
  retrievers' top ``pool`` documents) and mixed with weight ``bm25_weight``.
* :func:`source_ranker`: each generated query's rank of its own document under the offline
  teacher, which the consistency filter of :mod:`tasks.text.queries` keeps or drops it by.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tasks.core.hybrid import fuse, pool_stats
from tasks.core.parts import built_once

log = logging.getLogger(__name__)


OFFLINE = "offline"


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class OfflineTeacher:
    """Hybrid BM25 + dense teacher with per-query z-score normalisation (see module docstring).

    ``bm25`` is a tasks.core.bm25.BM25Index of the corpus, ``dense`` anything with ``embed(texts)``
    returning unit vectors (an EmbeddingCache of the bi-encoder), ``doc_embeddings`` the corpus rows;
    ``passage_dense`` encodes passages when the document side is another model (default: ``dense``).
    """

    name = OFFLINE

    def __init__(
        self,
        bm25: Any,
        dense: Any,
        doc_embeddings: np.ndarray,
        *,
        bm25_weight: float = 0.5,
        pool: int = 100,
        passage_dense: Any = None,
    ):
        self.bm25 = bm25
        self.dense = dense
        self.passage_dense = passage_dense or dense
        self.doc_embeddings = doc_embeddings
        self.weight = bm25_weight
        self.pool = pool
        self._stats: dict[bytes, tuple[float, float, float, float]] = {}

    def _raw_rows(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 and cosine scores of each query against every corpus document; records the z-score stats."""
        embeddings = self.dense.embed(list(queries))
        bm25_rows = self.bm25.score_rows(queries)
        dense_rows = np.asarray(embeddings @ self.doc_embeddings.T, dtype=np.float32)
        fresh = [i for i, q in enumerate(queries) if _digest(q) not in self._stats]
        if fresh:
            stats = pool_stats(dense_rows[fresh], bm25_rows[fresh], self.pool)
            for i, row in zip(fresh, stats, strict=True):
                self._stats[_digest(queries[i])] = tuple(float(v) for v in row)
        return bm25_rows, dense_rows

    def query_stats(self, queries: Sequence[str]) -> np.ndarray:
        """(bm25 mean, bm25 std, dense mean, dense std) over each query's candidate pool, one row per query."""
        missing = list(dict.fromkeys(q for q in queries if _digest(q) not in self._stats))
        for start in range(0, len(missing), 512):
            self._raw_rows(missing[start : start + 512])
        return np.asarray([self._stats[_digest(q)] for q in queries], dtype=np.float64).reshape(-1, 4)

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Hybrid scores of aligned (query, passage) pairs; passages need not be corpus documents."""
        stats = self.query_stats(queries)
        bm25 = self.bm25.score_pairs(queries, passages).astype(np.float64)
        dense = np.einsum(
            "ij,ij->i", self.dense.embed(list(queries)), self.passage_dense.embed(list(passages))
        )
        z_bm25 = (bm25 - stats[:, 0]) / stats[:, 1]
        z_dense = (dense.astype(np.float64) - stats[:, 2]) / stats[:, 3]
        return (self.weight * z_bm25 + (1 - self.weight) * z_dense).astype(np.float32)

    def rank_rows(self, queries: Sequence[str]) -> np.ndarray:
        """Hybrid scores of each query against every corpus document (one row per query)."""
        bm25_rows, dense_rows = self._raw_rows(queries)
        return fuse(dense_rows, bm25_rows, self.weight, self.query_stats(queries))


@dataclass(frozen=True)
class TeacherSpec:
    """How a worker process builds the same :class:`OfflineTeacher`: everything from the shared
    workspace (the corpus, its embeddings; :mod:`tasks.text.shared`) and the caches' specs, once per
    process. Its scores equal the flow's teacher's (the same BM25 statistics, embeddings and weight)."""

    name = OFFLINE  # not a field: what the stages' manifests call the teacher
    corpus: Any  # tasks.text.shared.SharedCorpus
    embeddings: Any  # tasks.text.shared.SharedEmbeddings
    query_cache: Any  # tasks.core.embeddings.CacheSpec
    passage_cache: Any
    weight: float
    pool: int

    def build(self) -> OfflineTeacher:
        return built_once(("offline-teacher", self), self._build)

    def _build(self) -> OfflineTeacher:
        return OfflineTeacher(
            self.corpus.bm25(),
            self.query_cache.build(),
            self.embeddings.load()[1],
            bm25_weight=self.weight,
            pool=self.pool,
            passage_dense=self.passage_cache.build(),
        )


@dataclass(frozen=True)
class CrossEncoderSpec:
    """A cross-encoder teacher as a worker builds it (once per process): its name and settings."""

    model_name: str
    batch_size: int = 32
    max_length: int = 350

    @property
    def name(self) -> str:
        return self.model_name

    def build(self) -> CrossEncoderTeacher:
        return built_once(
            ("cross-encoder", self),
            lambda: CrossEncoderTeacher(
                self.model_name, batch_size=self.batch_size, max_length=self.max_length
            ),
        )


TEACHER_SPECS = (TeacherSpec, CrossEncoderSpec)


def built(teacher: Any) -> Any:
    """The teacher itself, or the one a spec (:data:`TEACHER_SPECS`) builds in this process (once)."""
    return teacher.build() if isinstance(teacher, TEACHER_SPECS) else teacher


def source_ranker(
    teacher: Any, index_ids: Sequence[str] | None, source_ids: Sequence[str], source_texts: Sequence[str]
) -> SourceRanker:
    """``rank_of_source`` for the consistency filter of tasks.text.queries: each query's rank of its source
    passage among every other document of the teacher's index (0 = first).

    ``source_ids``/``source_texts`` are the documents queries are generated for (positions in them
    are what the generator passes); ``index_ids`` the teacher's document order (None for a
    :class:`TeacherSpec`: its corpus's). A query's own positive (an inverse-cloze passage) is scored
    when given, else its whole source document.
    """
    positions = {d: i for i, d in enumerate(index_ids)} if index_ids is not None else None
    return SourceRanker(teacher, dict(enumerate(source_ids)), dict(enumerate(source_texts)), positions)


@dataclass(frozen=True)
class SourceRanker:
    """The consistency filter's ranker (see :func:`source_ranker`). Picklable: :meth:`for_part` keeps
    only a part's source documents, so a query-generation part ships its own documents and a
    :class:`TeacherSpec` that a worker builds the teacher from."""

    teacher: Any  # OfflineTeacher, or a TeacherSpec
    source_ids: dict[int, str]  # by position among the documents queries are generated for
    source_texts: dict[int, str]
    index_positions: dict[str, int] | None = None  # None: from the spec's corpus

    @property
    def portable(self) -> bool:
        """Whether a worker can run it: its teacher is a spec, not the flow's objects."""
        return isinstance(self.teacher, TeacherSpec)

    def for_part(self, positions: Sequence[int]) -> SourceRanker:
        return SourceRanker(
            self.teacher,
            {p: self.source_ids[p] for p in positions},
            {p: self.source_texts[p] for p in positions},
            self.index_positions,
        )

    def __call__(
        self, texts: Sequence[str], positives: Sequence[str | None], sources: Sequence[int]
    ) -> list[int]:
        teacher = built(self.teacher)
        positions = self.index_positions
        if positions is None:
            corpus = self.teacher.corpus
            positions = built_once(
                ("index-positions", corpus), lambda: {d: i for i, d in enumerate(corpus.ids())}
            )
        rows = teacher.rank_rows(texts)
        own = teacher.score(
            texts,
            [p if p is not None else self.source_texts[s] for p, s in zip(positives, sources, strict=True)],
        )
        ranks = []
        for i, source in enumerate(sources):
            row = rows[i].copy()
            row[positions[self.source_ids[source]]] = -np.inf
            ranks.append(int((row > own[i]).sum()))
        return ranks


class CrossEncoderTeacher:
    """A cross-encoder's raw logits as teacher scores."""

    def __init__(self, model_name: str, *, batch_size: int = 32, max_length: int = 350, device: str = "cpu"):
        from tasks.core.models import load_cross_encoder, resolve_model

        self.resolved = resolve_model(model_name)
        self.name = model_name
        self.model = load_cross_encoder(self.resolved, device=device, max_length=max_length)
        self.batch_size = batch_size

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        import torch

        pairs = list(zip(queries, passages, strict=True))
        scores = self.model.predict(
            pairs,
            batch_size=self.batch_size,
            activation_fn=torch.nn.Identity(),
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return np.asarray(scores, dtype=np.float32).reshape(-1)
