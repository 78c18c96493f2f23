"""The evaluation set of labelled data: every evaluation query against all evaluation texts.

A retrieval set (each query against an index of all evaluation texts, the query itself left out;
judged by ir-measures) and a pair classification set (the labelled pairs and their 0/1 labels).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import pandas as pd

from tasks.core.corpus import CORPUS_COLUMNS, BeirData, Corpus, DataError, content_hash
from tasks.labelled.readers import LabelledData
from tasks.labelled.splits import group_members, labelled_pairs

log = logging.getLogger(__name__)


@dataclass
class EvalSet:
    """What a model is evaluated on: retrieval over all eval texts, and labelled pairs."""

    retrieval: BeirData
    exclude: dict[str, set[str]]  # query id -> its own text's id: a query never retrieves its own text
    pairs: pd.DataFrame  # text1, text2, label (0/1)
    source: str
    # query id -> id of the corpus text that is the query (None: query ids are corpus text ids)
    query_docs: dict[str, str] | None = None

    def query_doc(self, query_id: str) -> str:
        return self.query_docs[query_id] if self.query_docs else query_id

    @property
    def summary(self) -> str:
        positives = int(self.pairs["label"].sum())
        return (
            f"{len(self.retrieval.queries)} queries over {len(self.retrieval.corpus)} texts; "
            f"{len(self.pairs)} pairs ({positives} duplicates)"
        )


def _text_id(text: str) -> str:
    return "t" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def build_eval_set(data: LabelledData, *, seed: int = 0, queries: str = "texts") -> EvalSet:
    """The retrieval and pair-classification sets of labelled evaluation data.

    Retrieval: the corpus is every distinct text. Pairs: each first text of a duplicate pair is a
    query and its duplicates are relevant. Groups: each text of a group of two or more is a query,
    the rest of its group relevant. Triplets: each query, its positives relevant.
    ``queries="rows"`` (pairs only): each duplicate row is a query of its own, with only that row's
    second text relevant (a first text with several partners is then several queries, each judging
    the other partners not relevant).
    Pair classification: the rows of ``labelled_pairs``.
    """
    if queries not in ("texts", "rows"):
        raise ValueError(f"queries must be 'texts' or 'rows', not {queries!r}")
    if queries == "rows" and data.kind != "pairs":
        raise ValueError(f"queries='rows' needs labelled pairs; {data.source} holds {data.kind}")
    texts = data.texts()
    ids = {t: _text_id(t) for t in texts}
    docs = pd.DataFrame(
        {
            "doc_id": [ids[t] for t in texts],
            "title": "",
            "text": texts,
            "image": None,
            "content_hash": [content_hash("", t) for t in texts],
            "attributes": None,
        },
        columns=CORPUS_COLUMNS,
    )
    corpus = Corpus(docs=docs, source=data.source)
    qrels: dict[str, dict[str, int]] = {}
    query_docs: dict[str, str] | None = None  # rows: query id -> id of its own text
    rows = data.rows

    def judge(query: str, relevant: str) -> None:
        if query != relevant:
            qrels.setdefault(ids[query], {})[ids[relevant]] = 1

    if data.kind == "pairs" and queries == "rows":
        query_docs = {}
        duplicates = rows.loc[rows["label"] == 1, ["text1", "text2"]]
        for row, (text1, text2) in zip(duplicates.index, duplicates.itertuples(index=False), strict=True):
            if text1 != text2:
                qrels[f"row{row}"] = {ids[text2]: 1}
                query_docs[f"row{row}"] = ids[text1]
    elif data.kind == "pairs":
        for text1, text2 in rows.loc[rows["label"] == 1, ["text1", "text2"]].itertuples(index=False):
            judge(text1, text2)
    elif data.kind == "groups":
        for group in group_members(data):
            for query in group:
                for other in group:
                    judge(query, other)
    else:
        for query, positive in rows[["query", "positive"]].itertuples(index=False):
            judge(query, positive)
    if not qrels:
        raise DataError(
            data.source,
            None,
            "no duplicates to evaluate retrieval with; expected at least one "
            "pair labelled 1, one group of two texts, or one (query, positive) row",
        )
    text_of = dict(zip(docs["doc_id"], docs["text"], strict=True))
    own = query_docs or {q: q for q in qrels}  # query id -> id of its own text
    table = pd.DataFrame({"query_id": list(qrels), "text": [text_of[own[q]] for q in qrels]})
    retrieval = BeirData(corpus=corpus, queries=table, qrels=qrels, folder=data.source, split="eval")
    return EvalSet(
        retrieval=retrieval,
        exclude={q: {own[q]} for q in qrels},
        pairs=labelled_pairs(data, seed=seed),
        source=data.source,
        query_docs=query_docs,
    )
