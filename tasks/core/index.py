"""FAISS indexes: every index the project builds, searches or saves.

* :func:`exact_index` / :func:`ann_index`: an inner-product index over unit vectors, exact or
  approximate (HNSW, IVF) for mining large corpora;
* :func:`search_index`: the top k of each query as a run (``query_id -> {doc_id: score}``), with
  per-query exclusions (a query never retrieves itself);
* :func:`save_index` / :func:`index_corpus`: the search index saved next to a model version
  (``index.faiss``, ``docs.parquet``, ``meta.json``), replaced atomically so a reader never sees
  half of one.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.store import write_json_atomic

Run = dict[str, dict[str, float]]
Qrels = Mapping[str, Mapping[str, int]]
INDEX_DIR = "index"
IMAGE_INDEX_DIR = "image-index"


def exact_index(embeddings: np.ndarray):
    """Exact inner-product FAISS index over unit vectors."""
    import faiss

    index = faiss.IndexFlatIP(embeddings.shape[1])
    index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    return index


def search_index(
    index: Any,
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    query_embeddings: np.ndarray,
    *,
    top_k: int,
    exclude: Mapping[str, set[str]] | None = None,
) -> Run:
    """Top-k per query as a run; ``exclude`` drops given docs for a query (e.g. the query itself)."""
    extra = max((len(v) for v in exclude.values()), default=0) if exclude else 0
    depth = min(top_k + extra, index.ntotal)
    scores, positions = index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32), depth)
    run: Run = {}
    for row, query_id in enumerate(query_ids):
        skip = exclude.get(query_id, set()) if exclude else set()
        hits: dict[str, float] = {}
        for score, pos in zip(scores[row], positions[row], strict=True):
            if pos < 0:
                continue
            doc_id = doc_ids[pos]
            if doc_id in skip:
                continue
            hits[doc_id] = float(score)
            if len(hits) == top_k:
                break
        run[query_id] = hits
    return run


INDEX_CLASSES = {"exact": "IndexFlatIP", "hnsw": "IndexHNSWFlat", "ivf": "IndexIVFFlat"}


def index_kind(n: int, config: Any) -> str:
    """The index :func:`ann_index` builds over ``n`` documents: ``config.index``, or for ``auto``
    exact up to ``config.exact_max_docs`` documents and HNSW above."""
    if config.index != "auto":
        return config.index
    return "exact" if n <= config.exact_max_docs else "hnsw"


def ann_index(embeddings: np.ndarray, config: Any):
    """A FAISS inner-product index of the embeddings (exact, HNSW or IVF, as ``config.index`` says;
    ``config`` is a :class:`tasks.text.negatives.MineConfig` or anything with its index fields)."""
    import faiss

    n, dim = embeddings.shape
    kind = index_kind(n, config)
    vectors = np.ascontiguousarray(embeddings, dtype=np.float32)
    if kind == "exact":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = max(config.hnsw_ef_search, config.candidates + config.rank_min + 1)
    else:
        lists = max(1, min(int(4 * np.sqrt(n)), n // 39))  # FAISS wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(config.ivf_nprobe, lists)
    index.add(vectors)
    return index


def index_corpus(
    model: Any,
    corpus: Any,
    folder: str | Path,
    *,
    batch_size: int = 64,
    max_seq_length: int = 256,
    cache: Any = None,
) -> Path:
    """Encode ``corpus`` with ``model`` and save the index into ``folder`` (atomically replaced)."""
    folder = Path(folder)
    texts = corpus.texts()
    if cache is not None:
        vectors = cache.embed(texts, desc="encoding corpus for the search index")
    else:
        model.max_seq_length = max_seq_length
        from tasks.core.embeddings import encode_texts

        vectors = encode_texts(
            model, texts, batch_size=batch_size, show_progress=sys.stderr.isatty(), desc="indexing"
        )
    docs = corpus.docs
    return save_index(
        folder,
        vectors,
        pa.table(
            {
                "doc_id": docs["doc_id"].tolist(),
                "title": [t or "" for t in docs["title"].tolist()],
                "snippet": [(x or "")[:200] for x in docs["text"].tolist()],
            }
        ),
        {
            "corpus": str(corpus.source),
            "corpus_key": corpus.key,
            "documents": len(corpus),
            "dimension": int(vectors.shape[1]),
            "max_seq_length": max_seq_length,
        },
    )


def save_index(folder: Path, vectors: np.ndarray, docs: pa.Table, meta: dict[str, Any]) -> Path:
    """Write an exact inner-product index with its rows and meta into ``folder``, replacing it atomically."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = exact_index(vectors)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    faiss.write_index(index, str(staging / "index.faiss"))
    pq.write_table(docs, staging / "docs.parquet")
    write_json_atomic(staging / "meta.json", meta)
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def load_index(folder: str | Path) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """(FAISS index, its rows in index order, its meta) of a saved index folder (see :func:`save_index`)."""
    import faiss

    folder = Path(folder)
    meta = folder / "meta.json"
    return (
        faiss.read_index(str(folder / "index.faiss")),
        pq.read_table(folder / "docs.parquet").to_pylist(),
        json.loads(meta.read_text()) if meta.is_file() else {},
    )
