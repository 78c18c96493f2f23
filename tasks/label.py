"""Pseudo-labels: a teacher scores (query, positive) and (query, negative); margin = pos - neg.

Teachers implement ``score(queries, passages) -> float32 array`` over aligned pairs.

* :class:`CrossEncoderTeacher` — a cross-encoder by name (GPL: cross-encoder/ms-marco-MiniLM-L-6-v2),
  raw logits (no sigmoid), so margins keep GPL's scale (~10-20).
* :class:`OfflineTeacher` — needs no extra model: BM25 (bm25s statistics) and the dense bi-encoder,
  each normalised per query (z-score over the query's candidate pool: the union of both
  retrievers' top ``pool`` documents) and mixed with weight ``bm25_weight`` (0.5 was chosen on
  SciFact's train claims, where the hybrid ranked better than either retriever alone; that
  exploration is not a committed benchmark).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

LABELS_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("pos_id", pa.string()),
    ("neg_id", pa.string()),
    ("score_pos", pa.float32()),
    ("score_neg", pa.float32()),
    ("margin", pa.float32()),
])

OFFLINE = "offline"


class LabelConfig(BaseModel):
    """Teacher settings."""

    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(OFFLINE, description="'offline' (BM25 + dense hybrid, no model), or a cross-encoder: "
                                              "directory, bundled name or hub id")
    bm25_weight: float = Field(0.5, ge=0, le=1, description="offline teacher: weight of BM25 against the dense "
                                                            "score (chosen on SciFact's train claims)")
    pool: int = Field(100, ge=10, description="offline teacher: candidates per retriever whose scores set the "
                                              "per-query normalisation")
    batch_size: int = Field(32, ge=1, description="cross-encoder batch size")
    max_length: int = Field(350, ge=16, description="cross-encoder: tokens per (query, passage) pair")
    part_size: int = Field(2048, ge=1, description="queries per stored part (the unit of crash recovery)")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


class OfflineTeacher:
    """Hybrid BM25 + dense teacher with per-query z-score normalisation (see module docstring).

    ``bm25`` is a tasks.evaluate.BM25Index of the corpus, ``dense`` anything with ``embed(texts)``
    returning unit vectors (an EmbeddingCache of the bi-encoder), ``doc_embeddings`` the corpus rows.
    """

    name = OFFLINE

    def __init__(self, bm25: Any, dense: Any, doc_embeddings: np.ndarray, *, bm25_weight: float = 0.5,
                 pool: int = 100):
        self.bm25 = bm25
        self.dense = dense
        self.doc_embeddings = doc_embeddings
        self.weight = bm25_weight
        self.pool = pool
        self._stats: dict[bytes, tuple[float, float, float, float]] = {}

    def _raw_rows(self, queries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """BM25 and cosine scores of each query against every corpus document; records the z-score stats."""
        embeddings = self.dense.embed(list(queries))
        token_ids = self.bm25.query_ids(queries)
        n_docs = len(self.doc_embeddings)
        bm25_rows = np.empty((len(queries), n_docs), dtype=np.float32)
        dense_rows = np.asarray(embeddings @ self.doc_embeddings.T, dtype=np.float32)
        k = min(self.pool, n_docs - 1)
        for i, (query, ids) in enumerate(zip(queries, token_ids, strict=True)):
            bm25_rows[i] = self.bm25.all_scores(ids)
            key = _digest(query)
            if key not in self._stats:
                if k > 0:
                    pool = np.union1d(np.argpartition(-dense_rows[i], k)[:k], np.argpartition(-bm25_rows[i], k)[:k])
                else:
                    pool = np.arange(n_docs)
                b, d = bm25_rows[i, pool], dense_rows[i, pool]
                self._stats[key] = (float(b.mean()), float(b.std()) + 1e-6, float(d.mean()), float(d.std()) + 1e-6)
        return bm25_rows, dense_rows

    def query_stats(self, queries: Sequence[str]) -> np.ndarray:
        """(bm25 mean, bm25 std, dense mean, dense std) over each query's candidate pool, one row per query."""
        missing = list(dict.fromkeys(q for q in queries if _digest(q) not in self._stats))
        for start in range(0, len(missing), 512):
            self._raw_rows(missing[start:start + 512])
        return np.asarray([self._stats[_digest(q)] for q in queries], dtype=np.float64).reshape(-1, 4)

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        """Hybrid scores of aligned (query, passage) pairs; passages need not be corpus documents."""
        stats = self.query_stats(queries)
        bm25 = self.bm25.score_pairs(queries, passages).astype(np.float64)
        dense = np.einsum("ij,ij->i", self.dense.embed(list(queries)), self.dense.embed(list(passages)))
        z_bm25 = (bm25 - stats[:, 0]) / stats[:, 1]
        z_dense = (dense.astype(np.float64) - stats[:, 2]) / stats[:, 3]
        return (self.weight * z_bm25 + (1 - self.weight) * z_dense).astype(np.float32)

    def rank_rows(self, queries: Sequence[str]) -> np.ndarray:
        """Hybrid scores of each query against every corpus document (one row per query)."""
        bm25_rows, dense_rows = self._raw_rows(queries)
        stats = self.query_stats(queries).astype(np.float32)
        z_bm25 = (bm25_rows - stats[:, :1]) / stats[:, 1:2]
        z_dense = (dense_rows - stats[:, 2:3]) / stats[:, 3:4]
        return self.weight * z_bm25 + (1 - self.weight) * z_dense


def source_ranker(teacher: OfflineTeacher, index_ids: Sequence[str], source_ids: Sequence[str],
                  source_texts: Sequence[str]):
    """``rank_of_source`` for the consistency filter of tasks.qgen: each query's rank of its source
    passage among every other document of the teacher's index (0 = first).

    ``source_ids``/``source_texts`` are the documents queries are generated for (positions in them
    are what the generator passes); ``index_ids`` the teacher's document order. A query's own
    positive (an inverse-cloze passage) is scored when given, else its whole source document.
    """
    positions = {d: i for i, d in enumerate(index_ids)}

    def rank_of_source(texts, positives, sources):
        rows = teacher.rank_rows(texts)
        own = teacher.score(texts, [p if p is not None else source_texts[s] for p, s in zip(positives, sources,
                                                                                                 strict=True)])
        ranks = []
        for i, source in enumerate(sources):
            row = rows[i].copy()
            row[positions[source_ids[source]]] = -np.inf
            ranks.append(int((row > own[i]).sum()))
        return ranks

    return rank_of_source


class CrossEncoderTeacher:
    """A cross-encoder's raw logits as teacher scores."""

    def __init__(self, model_name: str, *, batch_size: int = 32, max_length: int = 350, device: str = "cpu"):
        from tasks.models import load_cross_encoder, resolve_model

        self.resolved = resolve_model(model_name)
        self.name = model_name
        self.model = load_cross_encoder(self.resolved, device=device, max_length=max_length)
        self.batch_size = batch_size

    def score(self, queries: Sequence[str], passages: Sequence[str]) -> np.ndarray:
        import torch

        pairs = list(zip(queries, passages, strict=True))
        scores = self.model.predict(pairs, batch_size=self.batch_size, activation_fn=torch.nn.Identity(),
                                    show_progress_bar=False, convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(-1)


def label_triples(
    negatives: pa.Table,
    query_text: Callable[[str], str],
    positive_text: Callable[[str], str],
    doc_text: Callable[[str], str],
    teacher: Any,
) -> pa.Table:
    """Labels for a block of mined negatives: one row per (query, positive, negative)."""
    query_ids, pos_ids, neg_ids, queries, positives, passages = [], [], [], [], [], []
    for query_id, pos_id, negs in zip(negatives.column("query_id").to_pylist(), negatives.column("pos_id").to_pylist(),
                                      negatives.column("neg_ids").to_pylist(), strict=True):
        for neg_id in negs:
            query_ids.append(query_id)
            pos_ids.append(pos_id)
            neg_ids.append(neg_id)
            queries.append(query_text(query_id))
            positives.append(positive_text(query_id))
            passages.append(doc_text(neg_id))
    if not query_ids:
        return LABELS_SCHEMA.empty_table()
    # score each distinct (query, positive) pair once
    unique_pos = list(dict.fromkeys(zip(queries, positives, strict=True)))
    pos_scores = dict(zip(unique_pos, teacher.score([q for q, _ in unique_pos], [p for _, p in unique_pos]),
                          strict=True))
    score_pos = np.asarray([pos_scores[(q, p)] for q, p in zip(queries, positives, strict=True)], dtype=np.float32)
    score_neg = np.asarray(teacher.score(queries, passages), dtype=np.float32)
    return pa.Table.from_pydict({
        "query_id": query_ids, "pos_id": pos_ids, "neg_id": neg_ids,
        "score_pos": score_pos, "score_neg": score_neg, "margin": score_pos - score_neg,
    }, schema=LABELS_SCHEMA)


def positive_passage(query: Any, texts: dict[str, str]) -> str:
    """The passage a query was made from: its own ``positive`` column, else its whole document."""
    positive = query["positive"]
    return positive if isinstance(positive, str) and positive else texts[query["doc_id"]]


def label_stage(
    store: Any,
    negatives_ref: Any,
    queries_ref: Any,
    corpus: Any,
    teacher: Any,
    teacher_fingerprint: str,
    config: LabelConfig,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Any:
    """Teacher margins for every mined (query, positive, negative), stored in resumable parts."""
    from tasks.store import chunked, stage_key

    settings = config.model_dump(mode="json")
    key = stage_key("labels", settings, inputs=[negatives_ref.key, queries_ref.key], models=[teacher_fingerprint])
    if store.is_complete("labels", key):
        return store.ref("labels", key)
    queries = store.read_pandas("queries", queries_ref.key).set_index("query_id")
    negatives = store.read("negatives", negatives_ref.key)
    texts = dict(zip(corpus.ids, corpus.texts(), strict=True))
    writer = store.open("labels", key, config=settings, inputs=[negatives_ref.key, queries_ref.key],
                        models=[teacher_fingerprint])
    parts = list(chunked(range(negatives.num_rows), config.part_size))
    for part, rows in parts:
        if not writer.has_part(part):
            block = negatives.slice(rows.start, len(rows))
            writer.write_part(part, label_triples(
                block,
                query_text=lambda q: queries.at[q, "text"],
                positive_text=lambda q: positive_passage(queries.loc[q], texts),
                doc_text=texts.__getitem__,
                teacher=teacher,
            ))
        if progress:
            progress(part + 1, len(parts))
    return writer.commit(empty_schema=LABELS_SCHEMA, teacher=getattr(teacher, "name", "teacher"))
