"""Hybrid retrieval: dense cosine and BM25 scores fused per query.

Each score is z-scored over the query's candidate pool (the union of both retrievers' top ``pool``
documents), then mixed: ``weight * z_bm25 + (1 - weight) * z_dense``. The same rule makes the
offline teacher's scores (:class:`tasks.text.teachers.OfflineTeacher`) and the hybrid search that
`adapt search --mode hybrid` serves, so the weight chosen for one means the same for the other.
Written by hand: FAISS and bm25s each rank with one score; neither fuses two.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tasks.core.index import Run


def pool_stats(dense: np.ndarray, bm25: np.ndarray, pool: int = 100) -> np.ndarray:
    """(bm25 mean, bm25 std, dense mean, dense std) over each row's pool, shape (n, 4)."""
    dense, bm25 = np.atleast_2d(dense), np.atleast_2d(bm25)
    n_docs = dense.shape[1]
    stats = np.empty((len(dense), 4), dtype=np.float64)
    for i in range(len(dense)):
        if pool < n_docs:
            members = np.union1d(
                np.argpartition(-dense[i], pool)[:pool], np.argpartition(-bm25[i], pool)[:pool]
            )
        else:  # a corpus smaller than the pool: every document
            members = np.arange(n_docs)
        b, d = bm25[i, members], dense[i, members]
        stats[i] = (b.mean(), b.std() + 1e-6, d.mean(), d.std() + 1e-6)
    return stats


def fuse(dense: np.ndarray, bm25: np.ndarray, weight: float, stats: np.ndarray) -> np.ndarray:
    """Fused scores of rows of dense and BM25 scores, with their :func:`pool_stats`."""
    stats = stats.astype(np.float32)
    z_bm25 = (np.atleast_2d(bm25) - stats[:, :1]) / stats[:, 1:2]
    z_dense = (np.atleast_2d(dense) - stats[:, 2:3]) / stats[:, 3:4]
    return weight * z_bm25 + (1 - weight) * z_dense


def hybrid_rows(dense: np.ndarray, bm25: np.ndarray, weight: float, pool: int = 100) -> np.ndarray:
    """Fused scores of each query (row) against every document (column)."""
    return fuse(dense, bm25, weight, pool_stats(dense, bm25, pool))


def run_from_rows(
    rows: np.ndarray,
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    *,
    top_k: int = 100,
    exclude: Mapping[str, set[str]] | None = None,
) -> Run:
    """The top ``top_k`` documents of each row, leaving out ``exclude[query_id]``."""
    position = {d: i for i, d in enumerate(doc_ids)} if exclude else {}
    run: Run = {}
    k = min(top_k, rows.shape[1])
    for row, query_id in zip(rows, query_ids, strict=True):
        skip = [position[d] for d in (exclude or {}).get(query_id, ()) if d in position]
        if skip:
            row = row.copy()
            row[skip] = -np.inf
        best = np.argpartition(-row, k - 1)[:k]
        best = best[np.argsort(-row[best])]
        run[query_id] = {doc_ids[p]: float(row[p]) for p in best if np.isfinite(row[p])}
    return run


def hybrid_run(
    query_vectors: np.ndarray,
    query_texts: Sequence[str],
    query_ids: Sequence[str],
    doc_vectors: np.ndarray,
    doc_ids: Sequence[str],
    bm25: Any,
    weight: float,
    *,
    pool: int = 100,
    top_k: int = 100,
    exclude: Mapping[str, set[str]] | None = None,
    block: int = 64,
) -> Run:
    """Hybrid top ``top_k`` of each query over every document (``bm25`` indexes the same documents in
    the same order), a block of queries at a time so memory stays ``block`` x documents."""
    run: Run = {}
    for start in range(0, len(query_ids), block):
        stop = start + block
        dense = np.asarray(query_vectors[start:stop] @ doc_vectors.T, dtype=np.float32)
        lexical = bm25.score_rows(list(query_texts[start:stop]))
        rows = hybrid_rows(dense, lexical, weight, pool)
        run.update(run_from_rows(rows, doc_ids, query_ids[start:stop], top_k=top_k, exclude=exclude))
    return run
