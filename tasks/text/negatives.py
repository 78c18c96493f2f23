"""Negative mining: hard negatives per query from a FAISS index of the corpus (and BM25).

Each query's negatives come from the top candidates of one or several retrievers (dense and BM25,
as GPL used two retrievers), with the query's own document removed, sampled from a rank window.
The corpus embeddings come from :func:`tasks.core.embeddings.embed_corpus`, the index from
:func:`tasks.core.index.ann_index` (exact below ``exact_max_docs``, HNSW or IVF above).

Mining is written here rather than with ``sentence_transformers.util.mine_hard_negatives``:
that function works on texts (deduplicated, positives added to the corpus), so it cannot keep
document ids, cannot leave out the source document when the positive is a passage made from it
(an inverse-cloze query's document minus the sentence), and supports one dense retriever only.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.corpus import Corpus
from tasks.core.embeddings import load_embeddings
from tasks.core.index import ann_index
from tasks.core.store import StageRef, Store, chunked, selection_digest, stage_key

log = logging.getLogger(__name__)


NEGATIVES_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("pos_id", pa.string()),
        ("neg_ids", pa.list_(pa.string())),
        ("neg_scores", pa.list_(pa.float32())),
    ]
)


class MineConfig(BaseModel):
    """Negative mining settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    retrievers: list[Literal["dense", "bm25"]] = Field(
        default_factory=lambda: ["dense", "bm25"], description="retrievers whose top candidates are negatives"
    )
    candidates: int = Field(
        50, ge=2, le=1000, description="top candidates taken from each retriever (GPL: 50)"
    )
    rank_min: int = Field(
        0, ge=0, description="skip this many top candidates of each retriever (likely positives)"
    )
    num_negatives: int = Field(4, ge=1, le=100, description="negatives sampled per query")
    index: Literal["auto", "exact", "hnsw", "ivf"] = Field(
        "auto", description="FAISS index kind; auto: exact up to exact-max-docs, HNSW above"
    )
    exact_max_docs: int = Field(200_000, ge=1, description="largest corpus searched exactly under index=auto")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW search breadth")
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists visited per search")
    batch_size: int = Field(64, ge=1, description="encoding batch size")
    max_seq_length: int = Field(256, ge=8, le=8192, description="tokens kept per passage when encoding")
    part_size: int = Field(2048, ge=1, description="queries (or documents, for embeddings) per stored part")
    seed: int = Field(13, description="random seed for sampling negatives")


def mine_negatives(
    queries: Any,
    doc_ids: Sequence[str],
    doc_embeddings: np.ndarray,
    query_embeddings: np.ndarray,
    index: Any,
    config: MineConfig,
    *,
    bm25: Any = None,
) -> pa.Table:
    """Negatives for a block of queries (a DataFrame with query_id, doc_id, text).

    Candidates: each retriever's top ``candidates`` after skipping ``rank_min``, merged, the query's
    own document removed; ``num_negatives`` are sampled from them (all of them if fewer).
    ``neg_scores`` are the dense cosine scores when the dense retriever is used, else BM25 scores.
    """
    position = {d: i for i, d in enumerate(doc_ids)}
    depth = min(config.candidates + config.rank_min + 1, len(doc_ids))
    dense_scores = dense_positions = None
    if "dense" in config.retrievers:
        dense_scores, dense_positions = index.search(
            np.ascontiguousarray(query_embeddings, dtype=np.float32), depth
        )
    bm25_positions = bm25_scores = None
    if "bm25" in config.retrievers:
        if bm25 is None:
            raise ValueError("the bm25 retriever needs a BM25 index")
        bm25_positions, bm25_scores = bm25.search(queries["text"].tolist(), depth)
    rows: dict[str, list[Any]] = {name: [] for name in NEGATIVES_SCHEMA.names}
    for row, query in enumerate(queries.itertuples(index=False)):
        own = position.get(query.doc_id, -1)
        merged: dict[int, float] = {}
        for positions, scores in ((dense_positions, dense_scores), (bm25_positions, bm25_scores)):
            if positions is None:
                continue
            ranked = [int(p) for p, s in zip(positions[row], scores[row], strict=True) if p >= 0 and p != own]
            for p in ranked[config.rank_min : config.rank_min + config.candidates]:
                merged.setdefault(p, 0.0)
        candidates = sorted(merged)
        rng = random.Random(f"{config.seed}:{query.query_id}")
        chosen = rng.sample(candidates, min(config.num_negatives, len(candidates)))
        if dense_positions is not None:
            scores = [float(doc_embeddings[p] @ query_embeddings[row]) for p in chosen]
        else:
            lookup = {int(p): float(s) for p, s in zip(bm25_positions[row], bm25_scores[row], strict=True)}
            scores = [lookup.get(p, 0.0) for p in chosen]
        rows["query_id"].append(query.query_id)
        rows["pos_id"].append(query.doc_id)
        rows["neg_ids"].append([doc_ids[p] for p in chosen])
        rows["neg_scores"].append(scores)
    return pa.Table.from_pydict(rows, schema=NEGATIVES_SCHEMA)


def mine_stage(
    store: Store,
    queries_ref: StageRef,
    query_ids: Sequence[str],
    corpus: Corpus,
    embeddings_ref: StageRef,
    cache: Any,
    config: MineConfig,
    *,
    bm25: Any = None,
    progress: Callable[[int, int], None] | None = None,
) -> StageRef:
    """Negatives for the given queries (a subset of a queries stage), stored in resumable parts."""
    selection = selection_digest(query_ids)
    key = stage_key(
        "negatives",
        {**config.model_dump(mode="json"), "selection": selection},
        inputs=[queries_ref.key, embeddings_ref.key],
        models=[cache.fingerprint],
    )
    if store.is_complete("negatives", key):
        return store.ref("negatives", key)
    queries = (
        store.read_pandas("queries", queries_ref.key).set_index("query_id").loc[list(query_ids)].reset_index()
    )
    doc_ids, _, doc_embeddings = load_embeddings(store, embeddings_ref)
    index = ann_index(doc_embeddings, config)
    writer = store.open(
        "negatives",
        key,
        config=config.model_dump(mode="json"),
        inputs=[queries_ref.key, embeddings_ref.key],
        models=[cache.fingerprint],
    )
    parts = list(chunked(range(len(queries)), config.part_size))
    for part, rows in parts:
        if not writer.has_part(part):
            block = queries.iloc[list(rows)]
            vectors = cache.embed(block["text"].tolist(), desc="encoding queries")
            writer.write_part(
                part, mine_negatives(block, doc_ids, doc_embeddings, vectors, index, config, bm25=bm25)
            )
        if progress:
            progress(part + 1, len(parts))
    return writer.commit(empty_schema=NEGATIVES_SCHEMA, queries=len(queries), index=type(index).__name__)
