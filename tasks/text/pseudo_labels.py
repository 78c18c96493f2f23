"""Pseudo-labels: a teacher scores (query, positive) and (query, negative); margin = pos - neg.

The labels stage reads the negatives stage and writes the labels table of the data contract
(``query_id, pos_id, neg_id, score_pos, score_neg, margin``) in parts, so a crash resumes at the
last finished part. The teachers are in :mod:`tasks.text.teachers`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.core.defaults import DEFAULT_BM25_WEIGHT
from tasks.core.parts import LOCAL, PartRunner, resumed_progress
from tasks.text.teachers import OFFLINE, TEACHER_SPECS, built

log = logging.getLogger(__name__)


LABELS_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("pos_id", pa.string()),
        ("neg_id", pa.string()),
        ("score_pos", pa.float32()),
        ("score_neg", pa.float32()),
        ("margin", pa.float32()),
    ]
)


class LabelConfig(BaseModel):
    """Teacher settings."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    teacher: str = Field(
        OFFLINE,
        description="'offline' (BM25 + dense hybrid, no model), or a cross-encoder: "
        "directory, bundled name or hub id",
    )
    bm25_weight: float | Literal["auto"] = Field(
        "auto",
        description="offline teacher and hybrid search: weight of BM25 against the dense score (both "
        "z-scored per query); auto: chosen per corpus on probe queries of held-out documents",
    )
    default_bm25_weight: float = Field(
        DEFAULT_BM25_WEIGHT,
        ge=0,
        le=1,
        description="the BM25 weight auto starts from and keeps when the probes show no clear better one",
    )
    probe_queries: int = Field(
        500,
        ge=10,
        description="auto: most probe queries (title and inverse-cloze queries of held-out documents)",
    )
    pool: int = Field(
        100,
        ge=10,
        description="offline teacher: candidates per retriever whose scores set the per-query normalisation",
    )
    batch_size: int = Field(32, ge=1, description="cross-encoder batch size")

    @field_validator("bm25_weight")
    @classmethod
    def _weight_range(cls, value: float | str) -> float | str:
        if value != "auto" and not 0.0 <= float(value) <= 1.0:
            raise ValueError("the BM25 weight is a number from 0 to 1, or auto")
        return value

    max_length: int = Field(350, ge=16, description="cross-encoder: tokens per (query, passage) pair")
    part_size: int = Field(2048, ge=1, description="queries per stored part (the unit of crash recovery)")


def label_triples(
    negatives: pa.Table,
    query_text: Callable[[str], str],
    positive_text: Callable[[str], str],
    doc_text: Callable[[str], str],
    teacher: Any,
) -> pa.Table:
    """Labels for a block of mined negatives: one row per (query, positive, negative)."""
    query_ids, pos_ids, neg_ids, queries, positives, passages = [], [], [], [], [], []
    for query_id, pos_id, negs in zip(
        negatives.column("query_id").to_pylist(),
        negatives.column("pos_id").to_pylist(),
        negatives.column("neg_ids").to_pylist(),
        strict=True,
    ):
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
    pos_scores = dict(
        zip(unique_pos, teacher.score([q for q, _ in unique_pos], [p for _, p in unique_pos]), strict=True)
    )
    score_pos = np.asarray(
        [pos_scores[(q, p)] for q, p in zip(queries, positives, strict=True)], dtype=np.float32
    )
    score_neg = np.asarray(teacher.score(queries, passages), dtype=np.float32)
    return pa.Table.from_pydict(
        {
            "query_id": query_ids,
            "pos_id": pos_ids,
            "neg_id": neg_ids,
            "score_pos": score_pos,
            "score_neg": score_neg,
            "margin": score_pos - score_neg,
        },
        schema=LABELS_SCHEMA,
    )


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
    parts: PartRunner = LOCAL,
    shared_corpus: Any = None,
) -> Any:
    """Teacher margins for every mined (query, positive, negative), stored in resumable parts.

    Each unfinished part is a job (:class:`LabelPart`). With a distributed ``parts`` runner, a
    ``teacher`` that is a spec (it has ``build()``: :class:`tasks.text.teachers.TeacherSpec` or
    ``CrossEncoderSpec``) and ``shared_corpus`` (:class:`tasks.text.shared.SharedCorpus`, the passages
    a worker reads) the jobs run on the workers, else here.
    """
    from tasks.core.store import chunked, stage_key

    settings = config.model_dump(mode="json")
    key = stage_key(
        "labels", settings, inputs=[negatives_ref.key, queries_ref.key], models=[teacher_fingerprint]
    )
    if store.is_complete("labels", key):
        return store.ref("labels", key)
    queries = store.read_pandas("queries", queries_ref.key).set_index("query_id")
    negatives = store.read("negatives", negatives_ref.key)
    writer = store.open(
        "labels",
        key,
        config=settings,
        inputs=[negatives_ref.key, queries_ref.key],
        models=[teacher_fingerprint],
    )
    chunks = list(chunked(range(negatives.num_rows), config.part_size))
    todo = [(part, rows) for part, rows in chunks if not writer.has_part(part)]
    remote = parts.distributed and isinstance(teacher, TEACHER_SPECS) and shared_corpus is not None
    passages: Any = shared_corpus
    if not remote:
        teacher = built(teacher)
        passages = dict(zip(corpus.ids, corpus.texts(), strict=True)) if todo else None
    jobs = []
    for part, rows in todo:
        block = negatives.slice(rows.start, len(rows))
        own = queries.loc[list(dict.fromkeys(block.column("query_id").to_pylist()))]
        jobs.append(LabelPart(teacher, passages, str(writer.path), part, block, own))
    progress = resumed_progress(progress, len(chunks) - len(jobs), len(chunks))
    (parts if remote else LOCAL).run("pseudo-labels", jobs, progress)
    return writer.commit(empty_schema=LABELS_SCHEMA, teacher=getattr(teacher, "name", "teacher"))


@dataclass(frozen=True)
class LabelPart:
    """One part of the labels stage: the teacher scores each mined (query, positive) and (query,
    negative) of the part, and the part is written. Does nothing when the part exists.

    ``teacher`` is the teacher or a spec a worker builds it from; ``passages`` the corpus's texts by
    id, or a :class:`tasks.text.shared.SharedCorpus` a worker reads them from; ``queries`` the part's
    rows of the queries stage, by query id (a query's positive: :func:`positive_passage`).
    """

    teacher: Any
    passages: Any
    stage_dir: str
    index: int
    negatives: pa.Table
    queries: pd.DataFrame

    def __call__(self) -> None:
        from tasks.core.store import part_name, write_parquet_atomic

        target = Path(self.stage_dir) / part_name(self.index)
        if target.is_file():
            return
        teacher = built(self.teacher)
        texts = self.passages.text_of() if hasattr(self.passages, "text_of") else self.passages
        table = label_triples(
            self.negatives,
            query_text=lambda q: self.queries.at[q, "text"],
            positive_text=lambda q: positive_passage(self.queries.loc[q], texts),
            doc_text=texts.__getitem__,
            teacher=teacher,
        )
        write_parquet_atomic(target, table)
