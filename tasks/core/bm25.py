"""BM25 over a corpus (bm25s: Lucene BM25, English stemmer, stop words removed).

Used as an evaluation baseline, as a retriever for negative mining, and as half of the offline
teacher (:class:`tasks.text.teachers.OfflineTeacher`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from tasks.core.corpus import Corpus
from tasks.core.index import Run

log = logging.getLogger(__name__)


class BM25Index:
    """A bm25s index over a corpus (Lucene BM25, stemmed, English stop words removed)."""

    def __init__(self, texts: Sequence[str], *, k1: float = 0.9, b: float = 0.4, show_progress: bool = False):
        import bm25s
        import Stemmer
        from bm25s.tokenization import Tokenizer

        self.k1, self.b = k1, b
        self.tokenizer = Tokenizer(stopwords="en", stemmer=Stemmer.Stemmer("english").stemWord)
        tokens = self.tokenizer.tokenize(
            list(texts), update_vocab=True, return_as="ids", show_progress=show_progress
        )
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(tokens, show_progress=show_progress)
        self.size = len(texts)
        # Corpus statistics for scoring texts that are not in the index (see score_pairs).
        vocab_size = len(self.tokenizer.get_vocab_dict())
        self.doc_freq = np.zeros(vocab_size, dtype=np.int64)
        for ids in tokens.ids if hasattr(tokens, "ids") else tokens:
            self.doc_freq[np.unique(np.asarray(ids, dtype=np.int64))] += 1
        lengths = [len(ids) for ids in (tokens.ids if hasattr(tokens, "ids") else tokens)]
        self.avg_length = float(np.mean(lengths)) if lengths else 1.0

    def query_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer.tokenize(list(texts), update_vocab=False, return_as="ids", show_progress=False)

    def search(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores), each (len(texts), k); queries with no known word score 0 everywhere."""
        ids = self.query_ids(texts)
        k = min(k, self.size)
        positions, scores = self.retriever.retrieve(ids, k=k, show_progress=False, n_threads=1)
        return np.asarray(positions), np.asarray(scores, dtype=np.float32)

    def all_scores(self, query_ids: Sequence[int]) -> np.ndarray:
        """BM25 score of one (tokenized) query against every indexed document."""
        if not query_ids:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self.retriever.get_scores(list(query_ids)), dtype=np.float32)

    def score_rows(self, texts: Sequence[str]) -> np.ndarray:
        """BM25 of each text (a query) against every indexed document: shape (len(texts), documents)."""
        rows = np.zeros((len(texts), self.size), dtype=np.float32)
        for i, ids in enumerate(self.query_ids(texts) if len(texts) else []):
            rows[i] = self.all_scores(ids)
        return rows

    def score_pairs(self, queries: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """BM25 of (query, text) pairs under this corpus's statistics, for texts that need not be indexed.

        Written by hand because bm25s scores only the documents it indexed; a teacher must also score
        passages made for training (a document with its inverse-cloze sentence removed). Same Lucene
        formula and tokenizer as bm25s, so an indexed document gets the same score either way.
        """
        query_ids = self.query_ids(queries)
        text_tokens = self.tokenizer.tokenize(
            list(texts), update_vocab=False, return_as="string", show_progress=False
        )
        vocab = self.tokenizer.get_vocab_dict()
        scores = np.zeros(len(queries), dtype=np.float32)
        for row, (q_ids, tokens) in enumerate(zip(query_ids, text_tokens, strict=True)):
            if not q_ids:
                continue
            counts: dict[int, int] = {}
            for token in tokens:
                token_id = vocab.get(token)
                if token_id is not None:
                    counts[token_id] = counts.get(token_id, 0) + 1
            norm = self.k1 * ((1 - self.b) + self.b * len(tokens) / self.avg_length)
            total = 0.0
            for token_id in q_ids:
                tf = counts.get(token_id, 0)
                if tf:
                    df = self.doc_freq[token_id]
                    idf = math.log(1 + (self.size - df + 0.5) / (df + 0.5))
                    total += idf * tf / (norm + tf)
            scores[row] = total
        return scores


def bm25_search(
    corpus: Corpus,
    queries: pd.DataFrame,
    *,
    top_k: int = 100,
    k1: float = 0.9,
    b: float = 0.4,
    exclude: Mapping[str, set[str]] | None = None,
) -> Run:
    """BM25 run over the corpus (title + text)."""
    index = BM25Index(corpus.texts(), k1=k1, b=b)
    extra = max((len(v) for v in exclude.values()), default=0) if exclude else 0
    positions, scores = index.search(queries["text"].tolist(), top_k + extra)
    ids = corpus.ids
    run: Run = {}
    for row, query_id in enumerate(queries["query_id"]):
        skip = exclude.get(query_id, set()) if exclude else set()
        hits = {
            ids[p]: float(s)
            for p, s in zip(positions[row], scores[row], strict=True)
            if s > 0 and ids[p] not in skip
        }
        run[query_id] = dict(list(hits.items())[:top_k])
    return run
