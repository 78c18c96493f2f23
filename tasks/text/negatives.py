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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.corpus import Corpus
from tasks.core.embeddings import load_embeddings
from tasks.core.index import INDEX_CLASSES, ann_index, index_kind
from tasks.core.parts import LOCAL, PartRunner, resumed_progress
from tasks.core.store import (
    StageRef,
    Store,
    chunked,
    part_name,
    selection_digest,
    stage_key,
    write_parquet_atomic,
)

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
    part_size: int = Field(
        2048, ge=1, description="queries per stored part (the unit of crash recovery and of a worker's task)"
    )
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
    parts: PartRunner = LOCAL,
    shared: MineInputs | None = None,
) -> StageRef:
    """Negatives for the given queries (a subset of a queries stage), stored in resumable parts.

    Each unfinished part is a job (:class:`MinePart`); with a distributed ``parts`` runner and
    ``shared`` (what a worker rebuilds the embeddings, index, BM25 and query encoder from) the jobs
    run on the workers, else here.
    """
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
    writer = store.open(
        "negatives",
        key,
        config=config.model_dump(mode="json"),
        inputs=[queries_ref.key, embeddings_ref.key],
        models=[cache.fingerprint],
    )
    chunks = list(chunked(range(len(queries)), config.part_size))
    todo = [(part, rows) for part, rows in chunks if not writer.has_part(part)]
    remote = parts.distributed and shared is not None
    inputs: Any = shared
    if todo and not remote:  # the flow's own objects (loaded only when there is work)
        doc_ids, _, doc_embeddings = load_embeddings(store, embeddings_ref)
        inputs = LocalMineInputs(doc_ids, doc_embeddings, ann_index(doc_embeddings, config), bm25, cache)
    jobs = [
        MinePart(
            inputs,
            str(writer.path),
            part,
            queries["query_id"].iloc[list(rows)].tolist(),
            queries["doc_id"].iloc[list(rows)].tolist(),
            queries["text"].iloc[list(rows)].tolist(),
            config,
        )
        for part, rows in todo
    ]
    progress = resumed_progress(progress, len(chunks) - len(jobs), len(chunks))
    (parts if remote else LOCAL).run("mine negatives", jobs, progress)
    index = INDEX_CLASSES[index_kind(len(corpus), config)]  # the FAISS index the parts searched
    return writer.commit(empty_schema=NEGATIVES_SCHEMA, queries=len(queries), index=index)


@dataclass(frozen=True)
class LocalMineInputs:
    """What mining needs, as the flow holds it."""

    doc_ids: list[str]
    doc_embeddings: np.ndarray
    index: Any
    bm25: Any
    cache: Any

    def get(self, config: MineConfig) -> LocalMineInputs:
        return self


@dataclass(frozen=True)
class MineInputs:
    """What mining needs, as a worker rebuilds it (once per process) from the shared workspace:
    the embeddings stage and its FAISS index, the corpus's BM25 index, the query encoder's cache."""

    embeddings: Any  # tasks.text.shared.SharedEmbeddings
    corpus: Any  # tasks.text.shared.SharedCorpus
    cache: Any  # tasks.core.embeddings.CacheSpec

    def get(self, config: MineConfig) -> LocalMineInputs:
        doc_ids, vectors = self.embeddings.load()
        bm25 = self.corpus.bm25() if "bm25" in config.retrievers else None
        return LocalMineInputs(doc_ids, vectors, self.embeddings.index(config), bm25, self.cache.build())


@dataclass(frozen=True)
class MinePart:
    """One part of the negatives stage: encode the part's queries, search, sample, write the part.
    Does nothing when the part exists."""

    inputs: Any  # LocalMineInputs or MineInputs
    stage_dir: str
    index: int
    query_ids: list[str]
    sources: list[str]  # the document each query was made from
    texts: list[str]
    config: MineConfig

    def __call__(self) -> None:
        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return
        got = self.inputs.get(self.config)
        block = pd.DataFrame({"query_id": self.query_ids, "doc_id": self.sources, "text": self.texts})
        vectors = got.cache.embed(self.texts, desc="encoding queries")
        table = mine_negatives(
            block, got.doc_ids, got.doc_embeddings, vectors, got.index, self.config, bm25=got.bm25
        )
        write_parquet_atomic(target, table)
