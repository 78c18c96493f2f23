"""Candidate lists: per training query, the documents the listwise student learns to order.

Each query's list is the offline teacher's top ``top`` documents of the whole corpus plus
``sampled`` documents drawn uniformly from the rest (meant to teach that the tail belongs below the
head; on SciFact's train claims 32 of them did not keep Recall@100, see benchmarks/README.md, so the
default is none), each with the teacher's score.
With a cross-encoder teacher the same candidates are chosen by the offline ranking and scored by the
cross-encoder. The stage writes ``query_id, doc_ids, scores`` in parts, so a crash resumes at the
last finished part and a rerun with the same inputs does no work.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.corpus import Corpus
from tasks.core.parts import LOCAL, PartRunner, resumed_progress
from tasks.core.store import StageRef, Store, chunked, selection_digest, stage_key
from tasks.text.teachers import TeacherSpec, built

log = logging.getLogger(__name__)

LISTS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_ids", pa.list_(pa.string())),
        ("scores", pa.list_(pa.float32())),
    ]
)


class ListConfig(BaseModel):
    """Candidate-list settings of the listwise training method."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    top: int = Field(32, ge=2, le=1000, description="the teacher's best documents in each query's list")
    sampled: int = Field(
        0, ge=0, le=1000, description="documents drawn at random from the rest of the corpus into each list"
    )
    include_source: bool = Field(
        True,
        description="keep the document a query was generated from in its list (off: the list teaches "
        "only how the other documents rank, not the verbatim match with its source)",
    )
    part_size: int = Field(2048, ge=1, description="queries per stored part (the unit of crash recovery)")
    seed: int = Field(13, description="random seed for the sampled documents")


def choose_candidates(
    rows: np.ndarray, top: int, sampled: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) per row: its ``top`` best columns, best first, then ``sampled`` random others;
    a column scored -inf is never chosen."""
    width = top + sampled
    positions = np.empty((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        allowed = np.flatnonzero(np.isfinite(row))  # -inf: a document left out of this list
        k = min(top, len(allowed))
        best = allowed[np.argpartition(-row[allowed], k - 1)[:k]]
        best = best[np.argsort(-row[best], kind="stable")]
        rest = np.setdiff1d(allowed, best, assume_unique=True)
        extra = rng.choice(rest, size=min(sampled, len(rest)), replace=False) if sampled else rest[:0]
        positions[i] = np.resize(np.concatenate([best, extra]), width)  # a tiny corpus repeats
    return positions, np.take_along_axis(rows, positions, axis=1)


def list_stage(
    store: Store,
    queries_ref: StageRef,
    query_ids: Sequence[str],
    corpus: Corpus,
    ranker: Any,
    fingerprint: str,
    config: ListConfig,
    *,
    rescore: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None,
    progress: Callable[[int, int], None] | None = None,
    parts: PartRunner = LOCAL,
) -> StageRef:
    """Candidate lists for ``query_ids`` (a subset of a queries stage).

    ``ranker.rank_rows(texts)`` scores texts against every corpus document (the offline teacher, in
    corpus order); ``rescore(queries, passages)`` re-scores the chosen pairs (a cross-encoder), else
    the ranker's scores are the labels. ``fingerprint`` names the teacher (it keys the stage). With a
    distributed ``parts`` runner and a ranker that is a spec (:class:`tasks.text.teachers.TeacherSpec`)
    each part is a job for a worker; a cross-encoder's re-scoring runs here.
    """
    selection = selection_digest(query_ids)
    settings = {**config.model_dump(mode="json"), "selection": selection}
    key = stage_key("lists", settings, inputs=[queries_ref.key, corpus.key], models=[fingerprint])
    if store.is_complete("lists", key):
        return store.ref("lists", key)
    queries = (
        store.read_pandas("queries", queries_ref.key).set_index("query_id").loc[list(query_ids)].reset_index()
    )
    writer = store.open(
        "lists", key, config=settings, inputs=[queries_ref.key, corpus.key], models=[fingerprint]
    )
    chunks = list(chunked(range(len(queries)), config.part_size))
    remote = parts.distributed and rescore is None and isinstance(ranker, TeacherSpec)
    jobs = [
        ListPart(
            ranker if remote else built(ranker),
            str(writer.path),
            part,
            queries["query_id"].iloc[list(members)].tolist(),
            queries["text"].iloc[list(members)].tolist(),
            queries["doc_id"].iloc[list(members)].tolist(),
            config,
            corpus.ids if not remote else None,
            rescore,
            corpus.texts() if rescore is not None else None,
        )
        for part, members in chunks
        if not writer.has_part(part)
    ]
    progress = resumed_progress(progress, len(chunks) - len(jobs), len(chunks))
    (parts if remote else LOCAL).run("candidate lists", jobs, progress)
    return writer.commit(empty_schema=LISTS_SCHEMA, queries=len(queries), width=config.top + config.sampled)


@dataclass(frozen=True)
class ListPart:
    """One part of the lists stage: the teacher ranks the part's queries against the whole corpus,
    each keeps its best and sampled candidates (with the teacher's scores, or ``rescore``'s), and the
    part is written. ``ranker`` is the teacher, or a spec a worker builds it from (with the corpus's
    ids from the workspace). Does nothing when the part exists."""

    ranker: Any
    stage_dir: str
    index: int
    query_ids: list[str]
    texts: list[str]
    sources: list[str]
    config: ListConfig
    doc_ids: list[str] | None = None  # None: read from the teacher's corpus-texts stage
    rescore: Callable[[Sequence[str], Sequence[str]], np.ndarray] | None = None
    passages: list[str] | None = None

    def __call__(self) -> None:
        from pathlib import Path

        from tasks.core.store import part_name, write_parquet_atomic

        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return
        ranker = built(self.ranker)
        doc_ids = self.doc_ids if self.doc_ids is not None else self.ranker.corpus.ids()
        row_of = {d: i for i, d in enumerate(doc_ids)}
        config = self.config
        rng = np.random.default_rng([config.seed, self.index])
        rows = np.array(ranker.rank_rows(self.texts), dtype=np.float32)
        if not config.include_source:
            rows[np.arange(len(rows)), [row_of[d] for d in self.sources]] = -np.inf
        positions, scores = choose_candidates(rows, config.top, config.sampled, rng)
        if self.rescore is not None:
            pairs_q = [q for q in self.texts for _ in range(positions.shape[1])]
            pairs_p = [self.passages[p] for p in positions.reshape(-1)]
            scores = np.asarray(self.rescore(pairs_q, pairs_p), dtype=np.float32).reshape(positions.shape)
        table = pa.Table.from_pydict(
            {
                "query_id": self.query_ids,
                "doc_ids": [[doc_ids[p] for p in row] for row in positions],
                "scores": [row.tolist() for row in scores],
            },
            schema=LISTS_SCHEMA,
        )
        write_parquet_atomic(target, table)
