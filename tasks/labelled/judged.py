"""Judged queries over a corpus: a BEIR split or a click log, the split carved by query, and the
candidate lists a judged query trains on.

A click log is rows of ``query, doc_id[, clicks]`` (CSV, TSV, JSONL or Parquet). The same query text
on several rows is one query (its id is a digest of the text); a row with 0 clicks is read but is no
judgment. Bad rows raise :class:`tasks.core.corpus.DataError` with the file, the line and what was
expected; a row naming a document the corpus reader left out (empty) is counted and dropped, since
that document can never be retrieved; a document id the corpus never had is an error.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.core.corpus import (
    BeirData,
    Corpus,
    DataError,
    field_text,
    iter_records,
    pick_field,
    read_judged_queries,
    record_unit,
    require_field,
)
from tasks.core.heldout import heldout_mask

log = logging.getLogger(__name__)

CLICK_QUERY_FIELDS = ("query", "query_text", "search", "search_query", "q")
CLICK_DOC_FIELDS = ("doc_id", "corpus-id", "corpus_id", "document_id", "product_id", "item_id", "clicked")
CLICK_COUNT_FIELDS = ("clicks", "count", "n_clicks", "score")


def query_id_of(text: str) -> str:
    """A click-log query's id: a digest of its text, so the same text is one query."""
    return "q" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_click_log(path: str | Path, corpus: Corpus) -> BeirData:
    """A click log over ``corpus`` as judged queries (grade 1 for every clicked document)."""
    path = Path(path)
    unit = record_unit(path)
    known = set(corpus.ids)
    empty = {s.doc_id for s in corpus.skipped}
    texts: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    dropped = 0
    for line, record in iter_records(path):
        query_name = require_field(
            path, line, record, pick_field(record, None, CLICK_QUERY_FIELDS), "query", CLICK_QUERY_FIELDS
        )
        doc_name = require_field(
            path, line, record, pick_field(record, None, CLICK_DOC_FIELDS), "document id", CLICK_DOC_FIELDS
        )
        text = field_text(path, line, query_name, record[query_name], required=True).strip()
        doc_id = field_text(path, line, doc_name, record[doc_name], required=True).strip()
        if not text:
            raise DataError(path, line, "empty query text", unit=unit)
        clicks = 1.0
        count_name = pick_field(record, None, CLICK_COUNT_FIELDS)
        if count_name is not None and count_name in record and record[count_name] not in (None, ""):
            try:
                clicks = float(record[count_name])
            except (TypeError, ValueError):
                raise DataError(
                    path, line, f"{count_name} '{record[count_name]}' is not a number of clicks", unit=unit
                ) from None
            if not math.isfinite(clicks) or clicks < 0:
                raise DataError(
                    path, line, f"{count_name} '{record[count_name]}' is not a count (0 or more)", unit=unit
                )
        if doc_id in empty:
            dropped += 1
            continue
        if doc_id not in known:
            raise DataError(path, line, f"document id '{doc_id}' is not in the corpus", unit=unit)
        if clicks <= 0:
            continue
        query_id = query_id_of(text)
        texts[query_id] = text
        qrels.setdefault(query_id, {})[doc_id] = 1
    if not qrels:
        raise DataError(path, None, "no clicked (query, document) row in the click log")
    if dropped:
        log.warning("%s: %d row(s) name a document left out of the corpus (empty); dropped", path, dropped)
    queries = pd.DataFrame([(q, texts[q]) for q in qrels], columns=["query_id", "text"])  # first-seen order
    return BeirData(corpus, queries, qrels, str(path), "clicks", dropped_judgments=dropped)


def read_training_judgments(path: str | Path, split: str, corpus: Corpus) -> BeirData:
    """Judged training queries: a BEIR folder's ``qrels/<split>.tsv`` or a click log file."""
    path = Path(path)
    if path.is_dir():
        return read_judged_queries(path, split, corpus)
    return read_click_log(path, corpus)


def subset(data: BeirData, query_ids: set[str], split: str) -> BeirData:
    """The queries of ``data`` whose id is in ``query_ids`` (with their judgments)."""
    queries = data.queries[data.queries["query_id"].isin(query_ids)].reset_index(drop=True)
    qrels = {q: data.qrels[q] for q in queries["query_id"]}
    return BeirData(data.corpus, queries, qrels, data.folder, split, data.dropped_judgments)


def carve_by_query(data: BeirData, fraction: float, *, salt: str = "judged") -> tuple[BeirData, BeirData]:
    """(training, held-out) queries of ``data``: a query is held out by a salted hash of its id, so the
    two share no query and a query's side does not depend on the others."""
    ids = data.queries["query_id"].tolist()
    held = heldout_mask(ids, fraction, salt=salt)
    if held.all() or not held.any():  # a handful of queries: hold out a fixed share by hash order
        order = np.argsort([hashlib.sha256(f"{salt}\x1f{q}".encode()).hexdigest() for q in ids])
        held = np.zeros(len(ids), dtype=bool)
        held[order[: max(1, int(round(fraction * len(ids))))]] = True
    if held.all():
        raise DataError(
            data.folder, None, f"{len(ids)} judged quer(ies): too few to carve an evaluation split"
        )
    train_ids = {q for q, h in zip(ids, held, strict=True) if not h}
    eval_ids = set(ids) - train_ids
    return subset(data, train_ids, f"{data.split} (training part)"), subset(
        data, eval_ids, f"{data.split} (carved off)"
    )


@dataclass
class JudgedLists:
    """Candidate lists of judged queries, in the shape :class:`finetune.listwise.CandidateLists` takes."""

    queries: list[str]
    candidates: np.ndarray
    scores: np.ndarray
    relevance: np.ndarray
    filtered: int  # unjudged candidates left out of the contrastive term (above every judged one)
    positives_added: int  # judged documents outside the teacher's top, put into their lists


def judged_lists(data: BeirData, rows: np.ndarray, row_of: dict[str, int], top: int) -> JudgedLists:
    """Per judged query: the teacher's best ``top`` documents of the whole corpus, with every judged
    document put in (in place of the lowest ones) and marked relevant; ``rows`` are the teacher's
    scores of each query against every corpus document (corpus order), ``row_of`` a document's
    column. An unjudged candidate the teacher scores above every judged document of its query is
    marked -1: likely relevant but unjudged, it stays in the teacher's KL but is no negative of the
    contrastive term (``mine_hard_negatives``' margin filter, at a margin of 0)."""
    n = len(data.queries)
    positives = [
        [row_of[d] for d, grade in data.qrels[q].items() if grade > 0] for q in data.queries["query_id"]
    ]
    width = max(top, max((len(p) for p in positives), default=0))
    candidates = np.empty((n, width), dtype=np.int64)
    relevance = np.zeros((n, width), dtype=np.int8)
    added = 0
    for i, own in enumerate(positives):
        row = rows[i]
        best = np.argpartition(-row, width - 1)[:width] if width < len(row) else np.arange(len(row))
        best = best[np.argsort(-row[best], kind="stable")].tolist()
        judged = set(own)
        added += len(judged.difference(best))
        keep = [b for b in best if b not in judged][: width - len(own)]
        chosen = np.asarray(sorted(keep + own, key=lambda c: -row[c]), dtype=np.int64)
        chosen = np.resize(chosen, width)  # a corpus smaller than the list repeats
        candidates[i] = chosen
        relevance[i][np.isin(chosen, own)] = 1
    scores = np.take_along_axis(np.asarray(rows, dtype=np.float32), candidates, axis=1)
    filtered = filter_unjudged(relevance, scores)
    return JudgedLists(
        data.queries["text"].tolist(), candidates, scores, relevance, filtered=filtered, positives_added=added
    )


def filter_unjudged(relevance: np.ndarray, scores: np.ndarray) -> int:
    """Mark -1 (in place) each unjudged candidate scored above every judged document of its list
    (again from scratch, so a re-scoring teacher decides); returns how many are marked."""
    relevance[relevance < 0] = 0
    best = np.where(relevance > 0, scores, -np.inf).max(axis=1, keepdims=True)
    above = (relevance == 0) & (scores > best)
    relevance[above] = -1
    return int(above.sum())


def describe(data: BeirData) -> dict[str, Any]:
    """Counts of a judged set for the report."""
    return {
        "queries": len(data.queries),
        "judgments": sum(len(v) for v in data.qrels.values()),
        "dropped_judgments": data.dropped_judgments,
        "source": f"{data.folder} [{data.split}]",
    }
