"""Negative mining: corpus embeddings (cached), a FAISS index, hard negatives per query.

The corpus is encoded once per (model fingerprint, document content): embeddings are a store
stage, and rows of an earlier stage with the same model and settings are reused by content hash,
so an edited corpus only encodes what changed. The index is exact below ``exact_max_docs`` and
HNSW or IVF above it (or as configured). Each query's negatives come from the top candidates of
one or several retrievers (dense and BM25, as GPL used two retrievers), with the query's own
document removed, sampled from a rank window.

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

from tasks.corpus import Corpus
from tasks.store import StageRef, Store, chunked, stage_key

log = logging.getLogger(__name__)

NEGATIVES_SCHEMA = pa.schema([
    ("query_id", pa.string()),
    ("pos_id", pa.string()),
    ("neg_ids", pa.list_(pa.string())),
    ("neg_scores", pa.list_(pa.float32())),
])


class MineConfig(BaseModel):
    """Negative mining settings."""

    model_config = ConfigDict(extra="forbid")

    retrievers: list[Literal["dense", "bm25"]] = Field(
        default_factory=lambda: ["dense", "bm25"], description="retrievers whose top candidates are negatives")
    candidates: int = Field(50, ge=2, le=1000, description="top candidates taken from each retriever (GPL: 50)")
    rank_min: int = Field(0, ge=0, description="skip this many top candidates of each retriever (likely positives)")
    num_negatives: int = Field(4, ge=1, le=100, description="negatives sampled per query")
    index: Literal["auto", "exact", "hnsw", "ivf"] = Field("auto", description="FAISS index kind; auto: exact up "
                                                                               "to exact-max-docs, HNSW above")
    exact_max_docs: int = Field(200_000, ge=1, description="largest corpus searched exactly under index=auto")
    hnsw_m: int = Field(32, ge=4, description="HNSW graph degree")
    hnsw_ef_search: int = Field(128, ge=8, description="HNSW search breadth")
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists visited per search")
    batch_size: int = Field(64, ge=1, description="encoding batch size")
    max_seq_length: int = Field(256, ge=8, le=8192, description="tokens kept per passage when encoding")
    part_size: int = Field(2048, ge=1, description="queries (or documents, for embeddings) per stored part")
    seed: int = Field(13, description="random seed for sampling negatives")


# ------------------------------------------------------------------------------------ encoding


def embed_corpus(corpus: Corpus, cache: Any, store: Store, *, part_size: int = 2048,
                 progress: Callable[[int, int], None] | None = None) -> StageRef:
    """Embeddings of every document as a stage (doc_id, content_hash, embedding), keyed by model and content.

    Encoding goes through the persistent EmbeddingCache, so a document whose text was encoded
    before by the same model (in this run, an earlier run, or before a crash) is not encoded again.
    """
    settings = {"max_seq_length": cache.max_seq_length, "part_size": part_size}
    key = stage_key("embeddings", settings, inputs=[corpus.key], models=[cache.fingerprint])
    if store.is_complete("embeddings", key):
        return store.ref("embeddings", key)
    writer = store.open("embeddings", key, config=settings, inputs=[corpus.key], models=[cache.fingerprint])
    docs = corpus.docs
    texts = corpus.texts()
    parts = list(chunked(range(len(docs)), part_size))
    before = cache.encoded
    for index, positions in parts:
        if not writer.has_part(index):
            vectors = cache.embed([texts[p] for p in positions], desc="encoding documents")
            writer.write_part(index, _embedding_table([docs["doc_id"].iat[p] for p in positions],
                                                      [docs["content_hash"].iat[p] for p in positions], vectors))
        if progress:
            progress(index + 1, len(parts))
    encoded = cache.encoded - before
    log.info("embeddings: %d documents encoded, %d taken from the cache", encoded, len(docs) - encoded)
    return writer.commit(encoded=encoded, reused=len(docs) - encoded)


def _embedding_table(doc_ids: Sequence[str], hashes: Sequence[str], vectors: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    column = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
    return pa.table({"doc_id": list(doc_ids), "content_hash": list(hashes), "embedding": column})


def load_embeddings(store: Store, ref: StageRef) -> tuple[list[str], list[str], np.ndarray]:
    """(doc ids, content hashes, unit embeddings as one float32 matrix) of an embeddings stage."""
    table = store.read(ref.stage, ref.key)
    column = table.column("embedding").combine_chunks()
    dim = column.type.list_size
    matrix = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return table.column("doc_id").to_pylist(), table.column("content_hash").to_pylist(), matrix


# --------------------------------------------------------------------------------------- index


def build_index(embeddings: np.ndarray, config: MineConfig):
    """A FAISS inner-product index of the embeddings (exact, HNSW or IVF; see MineConfig.index)."""
    import faiss

    n, dim = embeddings.shape
    kind = config.index
    if kind == "auto":
        kind = "exact" if n <= config.exact_max_docs else "hnsw"
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


# ------------------------------------------------------------------------------------- mining


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
        dense_scores, dense_positions = index.search(np.ascontiguousarray(query_embeddings, dtype=np.float32), depth)
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
            for p in ranked[config.rank_min:config.rank_min + config.candidates]:
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
    import hashlib

    selection = hashlib.sha256("\n".join(query_ids).encode()).hexdigest()[:16]
    key = stage_key("negatives", {**config.model_dump(mode="json"), "selection": selection},
                    inputs=[queries_ref.key, embeddings_ref.key], models=[cache.fingerprint])
    if store.is_complete("negatives", key):
        return store.ref("negatives", key)
    queries = store.read_pandas("queries", queries_ref.key).set_index("query_id").loc[list(query_ids)].reset_index()
    doc_ids, _, doc_embeddings = load_embeddings(store, embeddings_ref)
    index = build_index(doc_embeddings, config)
    writer = store.open("negatives", key, config=config.model_dump(mode="json"),
                        inputs=[queries_ref.key, embeddings_ref.key], models=[cache.fingerprint])
    parts = list(chunked(range(len(queries)), config.part_size))
    for part, rows in parts:
        if not writer.has_part(part):
            block = queries.iloc[list(rows)]
            vectors = cache.embed(block["text"].tolist(), desc="encoding queries")
            writer.write_part(part, mine_negatives(block, doc_ids, doc_embeddings, vectors, index, config, bm25=bm25))
        if progress:
            progress(part + 1, len(parts))
    return writer.commit(empty_schema=NEGATIVES_SCHEMA, queries=len(queries), index=type(index).__name__)
