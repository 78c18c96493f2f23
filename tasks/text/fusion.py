"""The BM25 weight of the hybrid, chosen per corpus without labels.

How much BM25 should count against the dense score differs by corpus (lexical scientific claims
want more of it than argument retrieval or keyword-poor abstracts), so one fixed weight is wrong
somewhere. The weight is chosen on *probe* queries: title and inverse-cloze queries of held-out
documents (never trained on), each made by the offline generator *before* any consistency filter
(that filter ranks with the teacher, so using its output would favour the weight it already has).
A probe's relevant document is its own positive passage: the document with the query text taken out
(the body without the title, the passage without the sentence), scored in place of the document,
so neither retriever can match the query's words verbatim.

For every weight of the grid the probes' nDCG (over the whole ranking) is computed; the best weight is
taken only as far as the evidence carries: its paired gain over the default, in standard errors (t),
moves the weight ``(t - 1) / 2`` of the way from the default to the best (t <= 1 keeps the default,
t >= 3 takes the best). The offset of 1 pays for picking the best of nine: on pure noise the best
weight's t can pass 1 (``tests/test_listwise.py`` has a case at 1.2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from tasks.core.hybrid import fuse, pool_stats

log = logging.getLogger(__name__)

GRID: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class Probes:
    """Probe queries: text, the corpus row of the source document, and the positive passage."""

    texts: list[str]
    sources: list[int]
    positives: list[str]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class WeightChoice:
    weight: float
    best: float
    default: float
    t: float
    probes: int
    ndcg: dict[str, float] = field(default_factory=dict)  # weight -> probes' nDCG (whole ranking)

    def describe(self) -> str:
        if self.probes == 0:
            return f"BM25 weight {self.default:g} (the default: no probe queries)"
        return (
            f"BM25 weight {self.weight:g}: best on {self.probes} probe queries {self.best:g} "
            f"(nDCG {self.ndcg[f'{self.best:g}']:.3f}) against the default {self.default:g} "
            f"({self.ndcg[f'{self.default:g}']:.3f}), t = {self.t:.1f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_probes(
    corpus: Any, doc_rows: Sequence[int], generator: Any, *, limit: int, seed: int = 13
) -> Probes:
    """Title and inverse-cloze queries of the documents at ``doc_rows`` (at most ``limit``, a seeded
    sample), from an :class:`tasks.text.queries.OfflineGenerator`."""
    docs = corpus.docs
    texts, sources, positives = [], [], []
    for row in doc_rows:
        doc = docs.iloc[row]
        for draft in generator.generate(doc.doc_id, doc.title, doc.text):
            if draft.source in ("title", "ict") and draft.positive:
                texts.append(draft.text)
                sources.append(int(row))
                positives.append(draft.positive)
    if len(texts) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
        texts, sources, positives = (
            [texts[i] for i in keep],
            [sources[i] for i in keep],
            [positives[i] for i in keep],
        )
    return Probes(texts, sources, positives)


def probe_rows(
    probes: Probes,
    bm25: Any,
    query_vectors: np.ndarray,
    positive_vectors: np.ndarray,
    doc_vectors: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Dense and BM25 scores of each probe against every document, its source replaced by its positive."""
    dense = np.asarray(query_vectors @ doc_vectors.T, dtype=np.float32)
    lexical = bm25.score_rows(probes.texts)
    own = np.arange(len(probes)), np.asarray(probes.sources, dtype=np.int64)
    dense[own] = np.einsum("ij,ij->i", query_vectors, positive_vectors)
    lexical[own] = bm25.score_pairs(probes.texts, probes.positives)
    return dense, lexical


def probe_ndcg(
    dense: np.ndarray,
    lexical: np.ndarray,
    sources: Sequence[int],
    weight: float,
    stats: np.ndarray | None = None,
) -> np.ndarray:
    """Each probe's nDCG over the whole ranking (one relevant document: 1 / log2(rank + 2)); no cut-off,
    so a probe whose source ranks 11th still tells one weight from another (less noise than @10).
    ``stats``: the rows' :func:`pool_stats`, which do not depend on the weight (computed when not given)."""
    fused = fuse(dense, lexical, weight, pool_stats(dense, lexical) if stats is None else stats)
    idx = np.arange(len(fused))
    own = fused[idx, np.asarray(sources)]
    rank = (fused > own[:, None]).sum(axis=1)
    return 1.0 / np.log2(rank + 2.0)


def choose_weight(
    dense: np.ndarray,
    lexical: np.ndarray,
    sources: Sequence[int],
    *,
    default: float,
    grid: Sequence[float] = GRID,
) -> WeightChoice:
    """The weight for these probes' score rows (see the module docstring for the rule)."""
    if len(sources) == 0:
        return WeightChoice(default, default, default, 0.0, 0)
    grid = sorted(set(grid) | {default})
    stats = pool_stats(dense, lexical)  # once: the pools are the same for every weight
    gains = {w: probe_ndcg(dense, lexical, sources, w, stats) for w in grid}
    best = max(grid, key=lambda w: (round(float(gains[w].mean()), 6), -abs(w - default)))
    diff = gains[best] - gains[default]
    spread = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
    t = float(diff.mean() / (spread / np.sqrt(len(diff)))) if spread > 0 else 0.0
    share = min(1.0, max(0.0, (t - 1.0) / 2.0))
    weight = round(default + share * (best - default), 2)
    choice = WeightChoice(
        weight,
        best,
        default,
        round(t, 2),
        len(sources),
        {f"{w:g}": float(g.mean()) for w, g in gains.items()},
    )
    log.info("%s", choice.describe())
    return choice
